"""Matrix arithmetic of MICE scoring and of the full cross-encoder, in floating-point operations.

The counts cover the matrix products (projections, attention scores and mixing, feed-forward,
pooler), at 2 operations per multiply-add, over real tokens only: padding is not counted. Softmax,
GELU, layer norms and additions are left out; on a CPU they cost memory traffic rather than
arithmetic. The MICE count follows :meth:`mice_engine.model.MiceModel.score_states` step by
step, including which cross-attention path (folded or projected) the model picks. The model
picks it per batch from the padded length, the count per document from the document's own
length, so the two can differ for a batch whose lengths straddle the point where the paths
cost the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _dimensions(backbone_config: Any) -> tuple[int, int, int]:
    return (backbone_config.hidden_size, backbone_config.num_attention_heads,
            backbone_config.intermediate_size)


def _cross_attention_macs(rows: int, stored: int, hidden: int, heads: int, folded: bool,
                          shared_query: bool) -> tuple[int, int]:
    """Multiply-adds of one cross-attention block: (per query, per document).

    ``rows`` query rows read ``stored`` document tokens. With ``shared_query`` the query rows
    are the same for every document, so the query-side projections count once per query.
    """
    query_side = rows * hidden * hidden  # query projection
    if folded:
        query_side += rows * hidden * hidden  # keys folded into the query side
        per_token = 2 * heads * rows * hidden  # scores and mixing against raw states
        document_side = stored * per_token + rows * hidden * hidden  # + value projection
    else:
        per_token = 2 * hidden * hidden + 2 * rows * hidden  # key/value projection, scores, mix
        document_side = stored * per_token
    document_side += rows * hidden * hidden  # output projection
    if shared_query:
        return query_side, document_side
    return 0, query_side + document_side


def mice_interaction_flops(model: Any, query_length: int,
                           document_lengths: Sequence[int]) -> dict[str, float]:
    """Floating-point operations of scoring documents against one query with MICE.

    ``query_length`` counts the query's tokens with ``[CLS]`` and ``[SEP]``;
    ``document_lengths`` the stored tokens of each document (window). Returns the total, the
    part computed once per query (the engine computes it once per batch of documents, a
    negligible difference) and the mean per document.
    """
    hidden, heads, intermediate = _dimensions(model.backbone_config)
    rows = query_length - 1  # [CLS] skips cross-attention
    layers = model.config.interaction_layers
    projection = hidden * hidden
    feed_forward = 2 * hidden * intermediate  # per row

    per_query = 0
    per_document = [0] * len(document_lengths)
    folded_documents = 0
    # Query-side work of the first layer, done once for each path that some document takes.
    shared_paths: set[bool] = set()
    for depth in range(layers):
        first, last = depth == 0, depth == layers - 1
        if last:
            # [CLS] row only, with the key and value projections folded into its query.
            cls = (projection + projection + 2 * heads * query_length * hidden
                   + projection + projection + feed_forward)
            if first:
                per_query += cls
            else:
                per_document = [macs + cls for macs in per_document]
            break
        self_attention = 4 * query_length * projection + 2 * query_length * query_length * hidden
        if first:
            # One query serves every document until cross-attention, and [CLS], which skips
            # cross-attention, goes through the feed-forward block once.
            per_query += self_attention + feed_forward
        for i, stored in enumerate(document_lengths):
            folded = model._fold_cross_attention(rows, stored, shared_query=first)
            folded_documents += folded and depth == 0
            shared, own = _cross_attention_macs(rows, stored, hidden, heads, folded, first)
            if first and folded not in shared_paths:
                per_query += shared
                shared_paths.add(folded)
            own += rows * feed_forward
            if not first:
                own += self_attention + feed_forward  # the [CLS] row's feed-forward too
            per_document[i] += own
    # The pooler runs on each document's [CLS], or once when a single layer leaves [CLS] the
    # same for every document; the scorer runs per document.
    if layers == 1:
        per_query += hidden * hidden
        per_document = [macs + hidden for macs in per_document]
    else:
        per_document = [macs + hidden * hidden + hidden for macs in per_document]
    total = 2 * (per_query + sum(per_document))
    return {"total": float(total), "per_query": float(2 * per_query),
            "per_document": float(total) / max(len(document_lengths), 1),
            # Documents whose first cross-attention layer takes the folded path.
            "folded_documents": int(folded_documents)}


def cross_encoder_flops(backbone_config: Any, num_layers: int,
                        pair_lengths: Sequence[int]) -> dict[str, float]:
    """Floating-point operations of the full cross-encoder on pairs of the given lengths
    (``[CLS] query [SEP] document [SEP]``, tokens counted without padding)."""
    hidden, _heads, intermediate = _dimensions(backbone_config)
    total = 0
    for length in pair_lengths:
        per_layer = (4 * length * hidden * hidden + 2 * length * length * hidden
                     + 2 * length * hidden * intermediate)
        total += num_layers * per_layer + hidden * hidden + hidden
    total *= 2
    return {"total": float(total), "per_document": float(total) / max(len(pair_lengths), 1)}
