"""The interaction micro-benchmark: the same candidates scored by MICE and by the full
cross-encoder on the same backbone, side by side.

For each query, the first stage gives the candidates. MICE scores them from their stored states
through :meth:`Searcher.search`, and its ``interaction`` timing is the interaction stage alone
(the stored states are already loaded and converted, the query already encoded). The
cross-encoder scores the same documents by its forward pass on pairs tokenised beforehand, in
length-sorted batches with bounded padding, as MICE's are. The two alternate, and which goes
first alternates from query to query, so that a slow spell of a shared machine hits both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..search import Searcher, length_batches
from ..sources import Query
from .flops import cross_encoder_flops, mice_interaction_flops
from .probes import matmul_rate

_WARM_UP_CANDIDATES = 8


def interaction_benchmark(searcher: Searcher, cross_encoder: Any, queries: Sequence[Query], *,
                          candidates: int, cross_encoder_batch_size: int, device: str,
                          matmul_size: int, profile: bool,
                          on_query: Callable[[], None] | None = None) -> dict[str, Any]:
    """Score ``candidates`` first-stage candidates of each query with both models; return every
    per-query timing and arithmetic count, their totals, the speed ratio and a profile.

    MICE scores in forward passes of ``searcher.batch_size`` candidates, the cross-encoder in
    passes of at most ``cross_encoder_batch_size`` pairs."""
    from ..encoding import tokenize

    mice = searcher.model
    store = searcher.index.store
    rate = matmul_rate(matmul_size, device)
    queries = list(queries)

    # Warm-up on a few candidates: the first calls of each model pay for one-off allocations.
    if queries:
        warm_up = min(candidates, _WARM_UP_CANDIDATES)
        _mice_interaction(searcher, queries[0].text, warm_up)
        texts = _candidate_texts(searcher, queries[0].text, warm_up)
        if texts:
            _cross_encoder_forward(cross_encoder, *_cross_encoder_inputs(
                cross_encoder, queries[0].text, texts), cross_encoder_batch_size, device)

    rows = []
    for number, query in enumerate(queries):
        result = searcher.search(query.text, k=candidates, candidates=candidates,
                                 first_stage_only=True)
        if not result.hits:
            continue
        doc_ids = [hit.doc_id for hit in result.hits]
        texts = [store.document(store.position(doc_id)).full_text() for doc_id in doc_ids]
        tick = time.perf_counter()
        inputs = _cross_encoder_inputs(cross_encoder, query.text, texts)
        tokenization = time.perf_counter() - tick

        if number % 2 == 0:
            mice_seconds = _mice_interaction(searcher, query.text, candidates)
            ce_seconds = _cross_encoder_forward(cross_encoder, *inputs, cross_encoder_batch_size,
                                                device)
        else:
            ce_seconds = _cross_encoder_forward(cross_encoder, *inputs, cross_encoder_batch_size,
                                                device)
            mice_seconds = _mice_interaction(searcher, query.text, candidates)

        query_length = len(tokenize(mice.tokenizer, [query.text],
                                    mice.config.query_max_length).input_ids[0])
        stored = [end - start for doc_id in doc_ids
                  for start, end in store.windows(store.position(doc_id))]
        mice_flops = mice_interaction_flops(mice, query_length, stored)
        pair_lengths = inputs[4]
        ce_flops = cross_encoder_flops(cross_encoder.backbone_config, _layers(cross_encoder),
                                       pair_lengths)
        rows.append({
            "query_id": query.id, "query_tokens": query_length, "candidates": len(doc_ids),
            "stored_tokens": int(sum(stored)), "pair_tokens": int(sum(pair_lengths)),
            "mice_seconds": mice_seconds, "cross_encoder_seconds": ce_seconds,
            "cross_encoder_tokenization_seconds": tokenization,
            "ratio": ce_seconds / mice_seconds,
            "mice_gflop": mice_flops["total"] / 1e9, "cross_encoder_gflop": ce_flops["total"] / 1e9,
            "folded_documents": mice_flops["folded_documents"],
        })
        if on_query is not None:
            on_query()

    summary = _summarise(rows, rate)
    summary["candidates"] = candidates
    summary["matmul"] = rate
    summary["queries"] = rows
    summary["mice_batch_size"] = searcher.batch_size
    summary["cross_encoder_batch_size"] = cross_encoder_batch_size
    if profile and rows:
        summary["profile"] = _profile_interaction(searcher, queries[0].text, candidates)
    return summary


def _layers(cross_encoder: Any) -> int:
    return int(getattr(cross_encoder.config, "num_layers", None)
               or cross_encoder.backbone_config.num_hidden_layers)


def _summarise(rows: list[dict[str, Any]], rate: dict[str, Any]) -> dict[str, Any]:
    if not rows:
        return {"mice_seconds": None, "cross_encoder_seconds": None, "ratio": None}
    mice_seconds = sum(row["mice_seconds"] for row in rows)
    ce_seconds = sum(row["cross_encoder_seconds"] for row in rows)
    mice_gflop = sum(row["mice_gflop"] for row in rows)
    ce_gflop = sum(row["cross_encoder_gflop"] for row in rows)
    best = rate["best_gflops"]
    return {
        "query_count": len(rows),
        "mice_seconds": mice_seconds,
        "cross_encoder_seconds": ce_seconds,
        # Total over total: each query weighs by its time.
        "ratio": ce_seconds / mice_seconds,
        "median_query_ratio": float(np.median([row["ratio"] for row in rows])),
        "min_query_ratio": float(min(row["ratio"] for row in rows)),
        "arithmetic_ratio": ce_gflop / mice_gflop,
        "mice_gflop_per_candidate": mice_gflop / sum(row["candidates"] for row in rows),
        "cross_encoder_gflop_per_candidate": ce_gflop / sum(row["candidates"] for row in rows),
        "mice_gflops": mice_gflop / mice_seconds,
        "cross_encoder_gflops": ce_gflop / ce_seconds,
        # Time taken over the time the same arithmetic needs at the measured matmul rate.
        "mice_time_over_arithmetic": mice_seconds / (mice_gflop / best),
        "cross_encoder_time_over_arithmetic": ce_seconds / (ce_gflop / best),
    }


def _mice_interaction(searcher: Searcher, text: str, candidates: int) -> float:
    result = searcher.search(text, k=candidates, candidates=candidates)
    return result.timings["interaction"]


def _candidate_texts(searcher: Searcher, text: str, candidates: int) -> list[str]:
    store = searcher.index.store
    result = searcher.search(text, k=candidates, candidates=candidates, first_stage_only=True)
    return [store.document(store.position(hit.doc_id)).full_text() for hit in result.hits]


def _cross_encoder_inputs(model: Any, query: str, texts: list[str]):
    """Tokenise the pairs the way :func:`mice_engine.cross_encoder.score_texts` does: query and
    documents apart, as ``[CLS] text [SEP]``. Returns the query ids, the documents' ids, the
    pad id, the device and each pair's length in the model's input (``[CLS] q [SEP] d [SEP]``,
    cut to the model's positions)."""
    from ..encoding import tokenize

    config = model.config
    query_ids = tokenize(model.tokenizer, [query], config.query_max_length).input_ids[0]
    documents = tokenize(model.tokenizer, texts, config.doc_max_length).input_ids
    limit = model.backbone_config.max_position_embeddings
    pair_lengths = [min(len(query_ids) + len(ids) - 1, limit) for ids in documents]
    return query_ids, documents, model.tokenizer.pad_token_id or 0, str(model.device), pair_lengths


def _cross_encoder_forward(model: Any, query_ids: list[int], documents: list[list[int]],
                           pad_id: int, model_device: str, pair_lengths: list[int],
                           batch_size: int, device: str) -> float:
    """Seconds of the cross-encoder's forward passes over every pair, tensors built beforehand."""
    import torch

    from ..encoding import pad

    batches = []
    for batch in length_batches(np.asarray(pair_lengths), batch_size):
        doc_ids, doc_mask = pad([documents[i] for i in batch], pad_id, model_device)
        query, query_mask = pad([query_ids], pad_id, model_device)
        batches.append((query.expand(len(batch), -1), query_mask.expand(len(batch), -1),
                        doc_ids, doc_mask))
    seconds = 0.0
    with torch.inference_mode():
        for batch in batches:
            tick = time.perf_counter()
            model(*batch)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds += time.perf_counter() - tick
    return seconds


def _profile_interaction(searcher: Searcher, text: str, candidates: int,
                         top: int = 12) -> dict[str, Any]:
    """Operators of one query's MICE interaction stage, by self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        result = searcher.search(text, k=candidates, candidates=candidates)
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total,
                    reverse=True)
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    operators = [{"name": event.key, "calls": event.count,
                  "self_ms": round(event.self_cpu_time_total / 1000, 3),
                  "share": round(event.self_cpu_time_total / total, 4)}
                 for event in events[:top]]
    return {"query": text, "interaction_seconds": result.timings["interaction"],
            "load_states_seconds": result.timings["load_states"],
            "profiled_ms": round(total / 1000, 3), "operators": operators}
