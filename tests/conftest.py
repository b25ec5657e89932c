"""Shared fixtures: a tiny random BERT backbone built on the spot, and the real collections."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A vocabulary small enough to write inline, large enough to tokenise the test sentences.
_WORDS = (
    "the a of and to in is for on with cells protein gene dna study results patients "
    "retrieval information search query document index system model data test flow "
    "wing pressure heat boundary layer high low effect cancer cell blood"
).split()


def shared_collection(name: str) -> Path:
    """Path of a collection in ../shared/data, or skip the test when it is not there."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real collection {path} is not available on this machine")
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A randomly initialised 4-layer BERT (hidden 32, 4 heads) saved as a backbone folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # from_pretrained reads vocab.txt in transformers 4 and 5. The constructor's vocab_file
    # argument is ignored by transformers 5, which then maps every word to [UNK].
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)
    assert tokenizer.tokenize("cells protein") == ["cells", "protein"]
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        # Larger than BERT's 0.02 so that attention is far from uniform and scores are far from
        # zero: a wrong mask must move them well past the tests' tolerances.
        initializer_range=0.2,
    )
    torch.manual_seed(1234)
    model = BertModel(config, add_pooling_layer=True)
    # Random LayerNorm parameters too, so that a wrong norm cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(str(folder))
    return folder
