"""The cross-encoder and its masked variants, `score_texts`, `load_reranker` and `mice rerank`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel
from typer.testing import CliRunner

from cli.main import app
from mice_engine.cross_encoder import (
    CLS,
    DOC,
    QUERY,
    SEP1,
    SEP2,
    CrossEncoderModel,
    allowed_attention,
    load_reranker,
    score_texts,
)
from mice_engine.encoding import pad, tokenize
from mice_engine.model import MiceModel, ModelError

QUERIES = ["cells protein gene", "heat flow in the boundary layer of a wing"]
DOCUMENTS = [
    "the effect of high pressure on the boundary layer",
    "protein and gene data in cancer cells",
    "a study",
    "information retrieval: a search system with an index of document data and a query model",
]
# Tolerance for float32 on CPU, where results differ only by summation order.
ATOL = 1e-5
QUERY_MAX, DOC_MAX = 16, 32

# The rules of the masking study of Vast et al., "MICE: Minimal Interaction Cross-Encoders for
# efficient Re-ranking" (arXiv 2602.16299, 2026), segment by segment. A 1 means that the row
# segment may attend to the column segment. Rows and columns: [CLS], q, [SEP1], d, [SEP2].
SEGMENT_RULES = {
    "none": ["11111",
             "11111",
             "11111",
             "11111",
             "11111"],
    # Only [CLS] reads [CLS]; d -/-> [SEP1]; q -/-> [SEP2]; each [SEP] reads only itself.
    "mask0": ["11111",
              "01110",
              "00100",
              "01011",
              "00001"],
    # + [CLS] -/-> {d, [SEP2]}
    "mask1": ["11100",
              "01110",
              "00100",
              "01011",
              "00001"],
    # + d -/-> q
    "mask2": ["11100",
              "01110",
              "00100",
              "00011",
              "00001"],
    # Mask3-lk below layer k: + q -/-> d
    "mask3-lower": ["11100",
                    "01100",
                    "00100",
                    "00011",
                    "00001"],
}


def expand_rules(rules: list[str], query_length: int, doc_length: int) -> torch.Tensor:
    """Token-level (L, L) pattern from a segment table, written without the module's code."""
    segments = [0] + [1] * query_length + [2] + [3] * doc_length + [4]
    size = len(segments)
    pattern = torch.zeros(size, size, dtype=torch.bool)
    for row in range(size):
        for column in range(size):
            pattern[row, column] = rules[segments[row]][segments[column]] == "1"
    return pattern


def tokens(model, texts, max_length):
    tokenized = tokenize(model.tokenizer, texts, max_length)
    return pad(tokenized.input_ids, model.tokenizer.pad_token_id)


def build(backbone, mask="none", mask3_layers=None, num_layers=None, seed=3):
    model = CrossEncoderModel.from_backbone(
        backbone, mask=mask, mask3_layers=mask3_layers, num_layers=num_layers,
        query_max_length=QUERY_MAX, doc_max_length=DOC_MAX, seed=seed,
    )
    with torch.no_grad():  # a head of unit scale, so that score differences are not hidden
        model.scorer.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(5))
    return model


MASK_SETTINGS = [("none", None), ("mask0", None), ("mask1", None), ("mask2", None), ("mask3", 2)]


@pytest.fixture(scope="module")
def models(tiny_backbone):
    return {mask: build(tiny_backbone, mask, k) for mask, k in MASK_SETTINGS}


# --------------------------------------------------------------------------------------------
# Attention patterns
@pytest.mark.parametrize(("mask", "rules"), [
    ("none", "none"), ("mask0", "mask0"), ("mask1", "mask1"), ("mask2", "mask2"),
])
@pytest.mark.parametrize(("query_length", "doc_length"), [(2, 3), (0, 1), (4, 0)])
def test_pattern_matches_mask_rules(mask, rules, query_length, doc_length):
    for layer in (0, 5):
        actual = allowed_attention(query_length, doc_length, mask, layer)
        expected = expand_rules(SEGMENT_RULES[rules], query_length, doc_length)
        assert actual.shape == (query_length + doc_length + 3,) * 2
        assert torch.equal(actual, expected)


def test_mask3_switches_at_layer_k():
    lower = expand_rules(SEGMENT_RULES["mask3-lower"], 2, 3)
    upper = expand_rules(SEGMENT_RULES["mask2"], 2, 3)
    for layer in range(4):
        actual = allowed_attention(2, 3, "mask3", layer, mask3_layers=3)
        assert torch.equal(actual, lower if layer < 3 else upper), f"layer {layer}"


def test_pattern_entries_by_position():
    # [CLS] q1 q2 [SEP1] d1 d2 d3 [SEP2] = positions 0 1 2 3 4 5 6 7
    mask0 = allowed_attention(2, 3, "mask0", 0)
    assert mask0[0].all()                      # [CLS] reads everything
    assert not mask0[1:, 0].any()              # no other token reads [CLS]
    assert not mask0[4:7, 3].any()             # d -/-> [SEP1]
    assert not mask0[1:3, 7].any()             # q -/-> [SEP2]
    assert mask0[3].tolist() == [False, False, False, True, False, False, False, False]
    assert mask0[7].tolist() == [False] * 7 + [True]
    assert mask0[1:3, 4:7].all()
    assert mask0[4:7, 1:3].all()
    mask1 = allowed_attention(2, 3, "mask1", 0)
    assert mask1[0].tolist() == [True, True, True, True, False, False, False, False]
    mask2 = allowed_attention(2, 3, "mask2", 0)
    assert not mask2[4:7, 0:4].any()
    assert mask2[4:7, 4:8].all()
    assert mask2[1:3, 4:7].all()
    mask3 = allowed_attention(2, 3, "mask3", 1, mask3_layers=2)
    assert not mask3[1:3, 4:7].any()
    assert allowed_attention(2, 3, "mask3", 2, mask3_layers=2)[1:3, 4:7].all()


@pytest.mark.parametrize(("arguments", "message"), [
    (("mask4", 0, None), "unknown attention mask 'mask4'"),
    (("mask3", 0, None), "mask3 needs mask3_layers"),
    (("mask3", 0, 0), "for k = 0 use mask2"),
    (("mask1", 0, 2), "applies only to mask3"),
])
def test_pattern_rejects_bad_arguments(arguments, message):
    mask, layer, k = arguments
    with pytest.raises(ModelError, match=message):
        allowed_attention(2, 3, mask, layer, mask3_layers=k)


@pytest.mark.parametrize(("mask", "k"), MASK_SETTINGS)
def test_model_masks_equal_pattern_and_skip_padding(models, mask, k):
    model = models[mask]
    query_ids, query_mask = tokens(model, [QUERIES[0], QUERIES[1], QUERIES[0]], QUERY_MAX)
    doc_ids, doc_mask = tokens(model, DOCUMENTS[:3], DOC_MAX)
    _, segments = model.join_pairs(query_ids, query_mask, doc_ids, doc_mask)
    for layer in range(len(model.layers)):
        bias = model.attention_bias(segments, layer)
        allowed = bias[:, 0] == 0
        for row in range(3):
            query_length = int(query_mask[row].sum()) - 2
            doc_length = int(doc_mask[row].sum()) - 2
            size = query_length + doc_length + 3
            expected = allowed_attention(query_length, doc_length, mask, layer, k)
            assert torch.equal(allowed[row, :size, :size], expected), f"row {row} layer {layer}"
            assert not allowed[row, :size, size:].any(), "a token attends to padding"
            # Each padding token attends to itself only.
            width = allowed.shape[1]
            padding_rows = torch.zeros(width - size, width, dtype=torch.bool)
            padding_rows[:, size:] = torch.eye(width - size, dtype=torch.bool)
            assert torch.equal(allowed[row, size:], padding_rows)


# --------------------------------------------------------------------------------------------
# The model against Hugging Face's BERT
@pytest.mark.parametrize("num_layers", [4, 3])
def test_full_model_equals_hf_bert_on_pairs(tiny_backbone, num_layers):
    model = build(tiny_backbone, num_layers=num_layers)
    bert = AutoModel.from_pretrained(str(tiny_backbone), attn_implementation="eager").eval()
    bert.encoder.layer = bert.encoder.layer[:num_layers]
    queries = [QUERIES[0], QUERIES[1], QUERIES[1], QUERIES[0]]
    reference_input = model.tokenizer(queries, DOCUMENTS, padding=True, return_tensors="pt")
    query_ids, query_mask = tokens(model, queries, QUERY_MAX)
    doc_ids, doc_mask = tokens(model, DOCUMENTS, DOC_MAX)
    with torch.no_grad():
        expected = model.scorer(bert(**reference_input).pooler_output).squeeze(-1)
        actual = model(query_ids, query_mask, doc_ids, doc_mask)
        input_ids, segments = model.join_pairs(query_ids, query_mask, doc_ids, doc_mask)
    assert torch.equal(input_ids, reference_input["input_ids"])
    token_types = ((segments == DOC) | (segments == SEP2)).long()
    assert torch.equal(token_types, reference_input["token_type_ids"])
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_pair_segments_label_special_tokens(models):
    model = models["none"]
    query_ids, query_mask = tokens(model, ["cells protein"], QUERY_MAX)
    doc_ids, doc_mask = tokens(model, ["a study"], DOC_MAX)
    input_ids, segments = model.join_pairs(query_ids, query_mask, doc_ids, doc_mask)
    tokenizer = model.tokenizer
    assert segments[0].tolist() == [CLS, QUERY, QUERY, SEP1, DOC, DOC, SEP2]
    assert tokenizer.convert_ids_to_tokens(input_ids[0].tolist()) == [
        "[CLS]", "cells", "protein", "[SEP]", "a", "study", "[SEP]"]


@pytest.mark.parametrize(("mask", "k"), MASK_SETTINGS)
def test_padded_batch_equals_one_pair_at_a_time(models, mask, k):
    model = models[mask]
    queries = [QUERIES[1], QUERIES[0], QUERIES[1], QUERIES[0]]
    query_ids, query_mask = tokens(model, queries, QUERY_MAX)
    doc_ids, doc_mask = tokens(model, DOCUMENTS, DOC_MAX)
    with torch.no_grad():
        batched = model(query_ids, query_mask, doc_ids, doc_mask)
        single = []
        for row in range(len(DOCUMENTS)):
            q, d = int(query_mask[row].sum()), int(doc_mask[row].sum())
            single.append(model(query_ids[row : row + 1, :q], query_mask[row : row + 1, :q],
                                doc_ids[row : row + 1, :d], doc_mask[row : row + 1, :d]))
    torch.testing.assert_close(batched, torch.cat(single), atol=ATOL, rtol=0)


def test_query_broadcast_equals_repeated_query(models):
    model = models["mask1"]
    query_ids, query_mask = tokens(model, QUERIES[1:], QUERY_MAX)
    doc_ids, doc_mask = tokens(model, DOCUMENTS, DOC_MAX)
    batch = len(DOCUMENTS)
    with torch.no_grad():
        broadcast = model(query_ids, query_mask, doc_ids, doc_mask)
        repeated = model(query_ids.repeat(batch, 1), query_mask.repeat(batch, 1), doc_ids,
                         doc_mask)
    torch.testing.assert_close(broadcast, repeated, atol=ATOL, rtol=0)


def document_rows(states):
    keep = (states.segments == DOC) | (states.segments == SEP2)
    return states.hidden[keep]


@pytest.mark.parametrize(("mask", "independent"), [("mask2", True), ("mask3", True),
                                                    ("mask1", False), ("none", False)])
def test_document_states_ignore_query_from_mask2(models, mask, independent):
    """Two queries of the same token length: from Mask2 on, the document's last-layer states
    are the same for both."""
    model = models[mask]
    query_ids, query_mask = tokens(model, ["cells protein gene", "heat flow wing"], QUERY_MAX)
    assert query_mask[0].sum() == query_mask[1].sum()
    doc_ids, doc_mask = tokens(model, [DOCUMENTS[1]] * 2, DOC_MAX)
    with torch.no_grad():
        states = model.encode_pairs(query_ids, query_mask, doc_ids, doc_mask)
    first, second = document_rows(states).chunk(2)
    if independent:
        torch.testing.assert_close(first, second, atol=1e-6, rtol=0)
    else:
        assert (first - second).abs().max() > 1e-2


def test_mask3_query_ignores_document_below_k(models):
    model = models["mask3"]  # Mask3-l2 on 4 layers
    query_ids, query_mask = tokens(model, [QUERIES[0]] * 2, QUERY_MAX)
    doc_ids, doc_mask = tokens(model, ["protein and gene data", "heat flow pressure wing"],
                               DOC_MAX)
    assert doc_mask[0].sum() == doc_mask[1].sum()

    def query_rows(num_layers):
        states = model.encode_pairs(query_ids, query_mask, doc_ids, doc_mask, num_layers)
        keep = states.segments <= SEP1
        return states.hidden[keep].chunk(2)

    with torch.no_grad():
        below = query_rows(2)
        above = query_rows(3)
        scores = model(query_ids, query_mask, doc_ids, doc_mask)
    torch.testing.assert_close(below[0], below[1], atol=1e-6, rtol=0)
    assert (above[0] - above[1]).abs().max() > 1e-2
    assert abs(float(scores[0] - scores[1])) > 1e-3


def test_long_pair_is_cut_to_positions(tiny_backbone):
    # The tiny backbone has 128 positions, so a 16-token query leaves 111 document tokens.
    model = CrossEncoderModel.from_backbone(tiny_backbone, query_max_length=QUERY_MAX,
                                            doc_max_length=128)
    long_document = " ".join(["protein gene cells"] * 60)
    query_ids, query_mask = tokens(model, [QUERIES[1]], QUERY_MAX)
    doc_ids, doc_mask = tokens(model, [long_document], 128)
    input_ids, segments = model.join_pairs(query_ids, query_mask, doc_ids, doc_mask)
    query_length = int(query_mask.sum())
    doc_tokens_kept = 128 - query_length - 1
    assert input_ids.shape == (1, 128)
    assert int(segments[0, -1]) == SEP2
    assert int(input_ids[0, -1]) == model.tokenizer.sep_token_id
    assert torch.equal(input_ids[0, query_length:-1], doc_ids[0, 1 : doc_tokens_kept + 1])
    with torch.no_grad():
        cut = model(query_ids, query_mask, doc_ids, doc_mask)
    expected = score_texts(model, QUERIES[1], [long_document])
    torch.testing.assert_close(cut, torch.from_numpy(expected), atol=ATOL, rtol=0)


def test_inputs_not_cls_text_sep_are_rejected(models):
    model = models["none"]
    query_ids, query_mask = tokens(model, QUERIES[:1], QUERY_MAX)
    doc_ids, doc_mask = tokens(model, DOCUMENTS[:1], DOC_MAX)
    with pytest.raises(ValueError, match=r"doc row 0 is not \[CLS\] text \[SEP\]"):
        model(query_ids, query_mask, doc_ids[:, 1:], doc_mask[:, 1:])
    left_padded = torch.cat([torch.zeros_like(query_mask[:, :1]), query_mask[:, :-1]], dim=1)
    with pytest.raises(ValueError, match="padding before tokens"):
        model(query_ids, left_padded, doc_ids, doc_mask)
    with pytest.raises(ValueError, match="query batch 2 must be 1 or equal"):
        model(query_ids.repeat(2, 1), query_mask.repeat(2, 1), doc_ids.repeat(3, 1),
              doc_mask.repeat(3, 1))


# --------------------------------------------------------------------------------------------
# Training behaviour, identity, saving
def test_forward_trains_and_dropout_follows_mode(tiny_backbone):
    model = build(tiny_backbone, "mask1")
    query_ids, query_mask = tokens(model, QUERIES[:1] * 2, QUERY_MAX)
    doc_ids, doc_mask = tokens(model, DOCUMENTS[:2], DOC_MAX)
    model.train()
    torch.manual_seed(0)
    first = model(query_ids, query_mask, doc_ids, doc_mask)
    second = model(query_ids, query_mask, doc_ids, doc_mask)
    assert (first - second).abs().max() > 1e-4, "dropout is off in train mode"
    first.sum().backward()
    assert model.scorer.weight.grad.abs().sum() > 0
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.layers[0].attention.self.query.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        third = model(query_ids, query_mask, doc_ids, doc_mask)
        fourth = model(query_ids, query_mask, doc_ids, doc_mask)
    assert torch.equal(third, fourth)


def test_head_seed_is_deterministic_and_shared_with_mice(tiny_backbone):
    first = CrossEncoderModel.from_backbone(tiny_backbone, seed=7)
    again = CrossEncoderModel.from_backbone(tiny_backbone, seed=7)
    other = CrossEncoderModel.from_backbone(tiny_backbone, seed=8)
    assert first.weights_sha256() == again.weights_sha256()
    assert first.weights_sha256() != other.weights_sha256()
    mice = MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2, seed=7)
    assert torch.equal(first.scorer.weight, mice.scorer.weight)
    assert torch.equal(first.pooler.dense.weight, mice.pooler.dense.weight)


def test_defaults_keep_every_layer(tiny_backbone):
    model = CrossEncoderModel.from_backbone(tiny_backbone)
    assert len(model.layers) == 4
    assert model.config.num_layers == 4
    assert model.config.name == "CE-4L"
    assert model.config.trained is False
    assert model.config.query_max_length == 64
    assert model.config.doc_max_length == 128


def test_save_load_round_trip(models, tmp_path):
    model = models["mask3"]
    model.save(tmp_path / "ce")
    loaded = CrossEncoderModel.load(tmp_path / "ce")
    assert loaded.weights_sha256() == model.weights_sha256()
    assert loaded.config == model.config
    assert loaded.config.name == "CE-4L-Mask3-l2"
    saved = json.loads((tmp_path / "ce" / "cross_encoder_config.json").read_text())
    assert saved["mask"] == "mask3"
    assert saved["mask3_layers"] == 2
    query_ids, query_mask = tokens(model, QUERIES[:1] * 4, QUERY_MAX)
    doc_ids, doc_mask = tokens(model, DOCUMENTS, DOC_MAX)
    with torch.no_grad():
        assert torch.equal(loaded(query_ids, query_mask, doc_ids, doc_mask),
                           model(query_ids, query_mask, doc_ids, doc_mask))


@pytest.mark.parametrize("missing", ["model.safetensors", "cross_encoder_config.json",
                                     "backbone_config.json"])
def test_load_names_folder_and_missing_file(models, tmp_path, missing):
    folder = models["none"].save(tmp_path / "ce")
    (folder / missing).unlink()
    with pytest.raises(ModelError, match=f"{folder} is not a cross-encoder folder: {missing} is "
                                         "missing"):
        CrossEncoderModel.load(folder)


@pytest.mark.parametrize(("options", "message"), [
    ({"mask": "mask9"}, "unknown attention mask 'mask9'"),
    ({"mask": "mask3"}, "mask3 needs mask3_layers"),
    ({"mask": "mask3", "mask3_layers": 4}, "mask3_layers=4 is invalid for 4 layers"),
    ({"mask": "mask2", "mask3_layers": 1}, "applies only to mask3"),
    ({"num_layers": 5}, "num_layers=5 is invalid"),
    ({"query_max_length": 127}, "query_max_length=127 is invalid"),
])
def test_invalid_settings_are_rejected(tiny_backbone, options, message):
    with pytest.raises(ModelError, match=message):
        CrossEncoderModel.from_backbone(tiny_backbone, **options)


# --------------------------------------------------------------------------------------------
# score_texts and load_reranker
@pytest.fixture(scope="module")
def tiny_mice(tiny_backbone):
    return MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                   query_max_length=QUERY_MAX, doc_max_length=DOC_MAX, seed=3)


@pytest.mark.parametrize("kind", ["mice", "cross-encoder"])
def test_score_texts_equals_forward(models, tiny_mice, kind):
    model = tiny_mice if kind == "mice" else models["mask2"]
    query_ids, query_mask = tokens(model, QUERIES[1:] * len(DOCUMENTS), QUERY_MAX)
    doc_ids, doc_mask = tokens(model, DOCUMENTS, DOC_MAX)
    with torch.no_grad():
        expected = model(query_ids, query_mask, doc_ids, doc_mask).numpy()
    actual = score_texts(model, QUERIES[1], DOCUMENTS, batch_size=3)
    assert actual.dtype == "float32"
    assert actual.shape == (len(DOCUMENTS),)
    torch.testing.assert_close(torch.from_numpy(actual), torch.from_numpy(expected), atol=ATOL,
                               rtol=0)
    assert score_texts(model, QUERIES[1], []).shape == (0,)


def test_score_texts_restores_train_mode(models):
    model = models["none"]
    model.train()
    try:
        first = score_texts(model, QUERIES[0], DOCUMENTS)
        second = score_texts(model, QUERIES[0], DOCUMENTS)
        assert model.training
    finally:
        model.eval()
    assert (first == second).all()


def test_load_reranker_picks_model_kind(models, tiny_mice, tiny_backbone, tmp_path):
    models["mask1"].save(tmp_path / "ce")
    tiny_mice.save(tmp_path / "mice")
    cross_encoder = load_reranker(tmp_path / "ce")
    assert isinstance(cross_encoder, CrossEncoderModel)
    assert cross_encoder.config.mask == "mask1"
    assert isinstance(load_reranker(tmp_path / "mice"), MiceModel)
    # A backbone goes to load_model, whose default MICE-l3+3 split needs 6 layers.
    with pytest.raises(ModelError, match=r"MICE-l3\+3 needs 6 layers but the backbone has 4"):
        load_reranker(tiny_backbone)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a cross-encoder folder"):
        load_reranker(tmp_path / "empty")


# --------------------------------------------------------------------------------------------
# mice rerank, end to end on a small collection written here
CORPUS = {
    "d1": ("Boundary layers", "heat flow in the boundary layer of a wing"),
    "d2": ("", "protein and gene data in cancer cells"),
    "d3": ("Pressure", "the effect of high pressure on the boundary layer"),
    "d4": ("", "a study of blood cells"),
    "d5": ("Search", "information retrieval with an index of document data"),
    "d6": ("", "protein and gene data in cancer cells"),  # same text as d2
    "d7": ("", "low pressure wing test"),
}
QUERY_TEXTS = {"q1": "protein gene cells", "q2": "pressure on a wing", "q3": "document index"}
# First-stage candidates with their scores; q1 lists a tie that trec_eval orders by id.
FIRST_STAGE = {
    "q1": [("d2", 9.0), ("d6", 9.0), ("d4", 5.0), ("d1", 2.0), ("d5", 1.0)],
    "q2": [("d7", 7.5), ("d3", 6.0), ("d1", 4.0)],
    "q3": [("d5", 3.0)],
}
runner = CliRunner()


@pytest.fixture()
def collection(tmp_path):
    folder = tmp_path / "collection"
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as corpus:
        for doc_id, (title, text) in CORPUS.items():
            corpus.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as queries:
        for query_id, text in QUERY_TEXTS.items():
            queries.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td2\t1\nq2\td3\t1\nq3\td5\t1\n")
    return folder


def write_run(path, run):
    with open(path, "w") as stream:
        for query_id, results in run.items():
            for rank, (doc_id, score) in enumerate(results, start=1):
                stream.write(f"{query_id} Q0 {doc_id} {rank} {score} bm25\n")
    return path


def read_lines(path):
    rows = {}
    for line in path.read_text().splitlines():
        query_id, q0, doc_id, rank, score, tag = line.split()
        rows.setdefault(query_id, []).append((doc_id, int(rank), float(score), q0, tag))
    return rows


@pytest.mark.parametrize("kind", ["cross-encoder", "mice"])
def test_rerank_command_reorders_every_candidate(models, tiny_mice, collection, tmp_path, kind):
    model = models["none"] if kind == "cross-encoder" else tiny_mice
    model_folder = model.save(tmp_path / "model")
    run = write_run(tmp_path / "first.trec", FIRST_STAGE)
    output = tmp_path / "out" / "reranked.trec"
    result = runner.invoke(app, [
        "rerank", "--model", str(model_folder), "--run", str(run), "--queries", str(collection),
        "--collection", str(collection), "-o", str(output), "--depth", "100", "--quiet",
        # One document per forward pass, so that d2 and d6 (same text) get identical scores.
        "--batch-size", "1",
    ])
    assert result.exit_code == 0, result.output
    assert "re-ranking time per query: p50" in result.output
    assert "untrained" in result.output
    rows = read_lines(output)
    assert list(rows) == ["q1", "q2", "q3"]
    for query_id, first_stage in FIRST_STAGE.items():
        ranked = rows[query_id]
        assert sorted(doc_id for doc_id, *_ in ranked) == sorted(d for d, _ in first_stage)
        assert [rank for _, rank, *_ in ranked] == list(range(1, len(first_stage) + 1))
        keys = [(score, doc_id) for doc_id, _, score, *_ in ranked]
        assert keys == sorted(keys, reverse=True), f"{query_id} is not in trec_eval order"
        assert all(q0 == "Q0" and tag == "rerank" for *_, q0, tag in ranked)
        texts = [" ".join(part for part in CORPUS[doc_id] if part) for doc_id, *_ in ranked]
        expected = score_texts(model, QUERY_TEXTS[query_id], texts, batch_size=1)
        for (doc_id, _, score, *_), value in zip(ranked, expected):
            assert score == pytest.approx(float(value), abs=1e-6), doc_id
    # d2 and d6 hold the same text, so they tie, and the larger id comes first.
    scores = {doc_id: score for doc_id, _, score, *_ in rows["q1"]}
    assert scores["d2"] == scores["d6"]
    order = [doc_id for doc_id, *_ in rows["q1"]]
    assert order.index("d6") < order.index("d2")


def test_rerank_depth_keeps_first_candidates(models, collection, tmp_path):
    model_folder = models["mask2"].save(tmp_path / "model")
    run = write_run(tmp_path / "first.trec", FIRST_STAGE)
    output = tmp_path / "reranked.trec"
    result = runner.invoke(app, [
        "rerank", "--model", str(model_folder), "--run", str(run), "--queries", str(collection),
        "--collection", str(collection), "-o", str(output), "--depth", "2", "--quiet",
        "--timings", str(tmp_path / "timings.json"),
    ])
    assert result.exit_code == 0, result.output
    rows = read_lines(output)
    # trec_eval order puts d6 before d2 (tie at 9.0), then d4: depth 2 keeps d6 and d2.
    assert sorted(doc_id for doc_id, *_ in rows["q1"]) == ["d2", "d6"]
    assert sorted(doc_id for doc_id, *_ in rows["q2"]) == ["d3", "d7"]
    assert [doc_id for doc_id, *_ in rows["q3"]] == ["d5"]
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert sorted(timings["per_query_seconds"]) == ["q1", "q2", "q3"]
    assert timings["summary_ms"]["p95_ms"] >= timings["summary_ms"]["p50_ms"] > 0


def test_rerank_missing_document_is_an_error(models, collection, tmp_path):
    model_folder = models["none"].save(tmp_path / "model")
    run = write_run(tmp_path / "first.trec", {"q1": [("d2", 3.0), ("d99", 2.0)]})
    output = tmp_path / "reranked.trec"
    result = runner.invoke(app, [
        "rerank", "--model", str(model_folder), "--run", str(run), "--queries", str(collection),
        "--collection", str(collection), "-o", str(output), "--quiet",
    ])
    assert result.exit_code == 2
    assert "1 document ids of the run are not in" in result.output
    assert "'d99'" in result.output
    assert not output.exists()


def test_rerank_missing_query_is_an_error(models, collection, tmp_path):
    model_folder = models["none"].save(tmp_path / "model")
    run = write_run(tmp_path / "first.trec", {"q7": [("d2", 3.0)]})
    result = runner.invoke(app, [
        "rerank", "--model", str(model_folder), "--run", str(run), "--queries", str(collection),
        "--collection", str(collection), "-o", str(tmp_path / "out.trec"), "--quiet",
    ])
    assert result.exit_code == 2
    assert "query ids of the run are not in" in result.output
    assert "'q7'" in result.output


BLENDS = {
    "standardised": {"first_stage": "bm25", "mode": "standardised-blend",
                     "first_stage_weight": 0.4},
    "sum": {"first_stage": "bm25", "mode": "sum", "first_stage_scale": 0.7},
    "maxsim": {"first_stage": "bm25", "mode": "standardised-blend", "first_stage_weight": 0.4,
               "maxsim_weight": 0.3},
}


def direct_maxsim(model, query: str, texts: list[str]) -> list[float]:
    """MaxSim of each text, one document at a time, from the model's lower layers."""
    from mice_engine.encoding import pad, tokenize
    from mice_engine.model import maxsim_scores

    pad_id = model.tokenizer.pad_token_id or 0
    query_ids, query_mask = pad(tokenize(model.tokenizer, [query],
                                         model.config.query_max_length).input_ids, pad_id, "cpu")
    values = []
    with torch.no_grad():
        query_states = model.encode(query_ids, query_mask)
        for text in texts:
            ids, mask = pad(tokenize(model.tokenizer, [text], model.config.doc_max_length).input_ids,
                            pad_id, "cpu")
            values.append(float(maxsim_scores(query_states, query_mask, model.encode(ids, mask),
                                              mask)[0]))
    return values


@pytest.mark.parametrize("mode", sorted(BLENDS))
def test_rerank_applies_model_blend(tiny_mice, collection, tmp_path, mode):
    import numpy as np

    from mice_engine.search import fuse_scores

    model_folder = tiny_mice.save(tmp_path / "model")
    config_path = model_folder / "mice_config.json"
    config = json.loads(config_path.read_text())
    config["fusion"] = BLENDS[mode]
    config_path.write_text(json.dumps(config))
    run = write_run(tmp_path / "first.trec", FIRST_STAGE)
    outputs = {}
    for fusion in ("--fusion", "--no-fusion"):
        outputs[fusion] = tmp_path / f"reranked{fusion}.trec"
        result = runner.invoke(app, [
            "rerank", "--model", str(model_folder), "--run", str(run), "--queries",
            str(collection), "--collection", str(collection), "-o", str(outputs[fusion]),
            "--batch-size", "1", fusion,
        ])
        assert result.exit_code == 0, result.output
        announced = "with the run's scores as the BM25 scores" in result.stderr
        assert announced == (fusion == "--fusion"), result.stderr
    blended, alone = read_lines(outputs["--fusion"]), read_lines(outputs["--no-fusion"])
    for query_id, first_stage in FIRST_STAGE.items():
        doc_ids = [doc_id for doc_id, _ in first_stage]
        texts = [" ".join(part for part in CORPUS[doc_id] if part) for doc_id in doc_ids]
        mice = score_texts(tiny_mice, QUERY_TEXTS[query_id], texts, batch_size=1)
        first_scores = np.array([score for _, score in first_stage])
        if mode == "sum":
            expected = mice + 0.7 * first_scores
        elif mode == "maxsim":
            maxsim = np.array(direct_maxsim(tiny_mice, QUERY_TEXTS[query_id], texts))
            expected = fuse_scores(mice, first_scores, 0.4, maxsim, 0.3)
        else:
            expected = fuse_scores(mice, first_scores, 0.4)
        blended_scores = {doc_id: score for doc_id, _, score, *_ in blended[query_id]}
        alone_scores = {doc_id: score for doc_id, _, score, *_ in alone[query_id]}
        for doc_id, blend_value, mice_value in zip(doc_ids, expected, mice):
            assert blended_scores[doc_id] == pytest.approx(float(blend_value), abs=1e-5), doc_id
            assert alone_scores[doc_id] == pytest.approx(float(mice_value), abs=1e-6), doc_id
        keys = [(score, doc_id) for doc_id, _, score, *_ in blended[query_id]]
        assert keys == sorted(keys, reverse=True), f"{query_id} is not in trec_eval order"


def test_cross_encoder_rerank_announces_no_blend(models, collection, tmp_path):
    model_folder = models["none"].save(tmp_path / "model")
    run = write_run(tmp_path / "first.trec", FIRST_STAGE)
    result = runner.invoke(app, [
        "rerank", "--model", str(model_folder), "--run", str(run), "--queries", str(collection),
        "--collection", str(collection), "-o", str(tmp_path / "out.trec"),
    ])
    assert result.exit_code == 0, result.output
    assert not any(line.startswith("ranking:") for line in result.stderr.splitlines())
