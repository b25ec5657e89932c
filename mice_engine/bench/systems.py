"""Running one benchmark system over a query set: rankings, stage timings and peak memory.

Stages timed per query, in seconds:

- every system: ``first_stage`` (candidate retrieval) and ``end_to_end`` (the whole call, with
  ranking and bookkeeping);
- MICE: ``query_encoding`` (lower layers on the query), ``load_states`` (reading, padding and
  converting the candidates' stored states) and ``interaction`` (interaction layers and head);
- cross-encoder: ``load_texts`` (reading the candidates' texts) and ``interaction``
  (tokenisation and the full forward pass).

Before the timed queries, each system runs its first query once, untimed, so that the one-off
work of a model's first call (lazy initialisation, first allocations) stays out of the
latencies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..evaluation import Run
from ..search import Searcher, rank_order
from ..sources import Query
from .probes import PeakMemory
from .suite import SystemSpec

MICE_STAGES = ("first_stage", "query_encoding", "load_states", "interaction")
CROSS_ENCODER_STAGES = ("first_stage", "load_texts", "interaction")


@dataclass
class SystemRun:
    """Rankings, timings and memory of one system on its queries."""

    run: Run
    # One {stage: seconds} per query, in query order; every entry has "end_to_end".
    timings: list[dict[str, float]]
    stages: tuple[str, ...]
    seconds: float
    memory: dict[str, Any]
    candidates: list[int] = field(default_factory=list)
    # Seconds of the untimed warm-up call on the first query, or None without queries.
    warm_up_seconds: float | None = None


def search_options(system: SystemSpec) -> dict[str, Any]:
    """Keyword arguments of ``Searcher.search`` that the system's settings add."""
    options = dict(system.search_options)
    if system.first_stage != "bm25":
        options["first_stage"] = system.first_stage
    return options


def run_system(system: SystemSpec, searcher: Searcher, queries: Sequence[Query], depth: int, *,
               device: str, cross_encoder: Any = None, batch_size: int = 32,
               on_query: Callable[[], None] | None = None) -> SystemRun:
    """Run ``system`` on every query with ``searcher`` (the index it reads) and time it.

    ``cross_encoder`` is the model of a cross-encoder system; ``batch_size`` is its number of
    pairs per forward pass.
    """
    if system.reranker == "cross-encoder":
        query_function = _cross_encoder_query(system, searcher, cross_encoder, depth, batch_size)
        stages = CROSS_ENCODER_STAGES
    elif system.reranker == "mice":
        query_function = _mice_query(system, searcher, depth)
        stages = MICE_STAGES
    else:
        query_function = _first_stage_query(system, searcher, depth)
        stages = ("first_stage",)

    warm_up_seconds = None
    if queries:
        tick = time.perf_counter()
        query_function(queries[0].text)
        warm_up_seconds = time.perf_counter() - tick

    run: Run = {}
    timings = []
    candidates = []
    memory = PeakMemory(device)
    with memory:
        started = time.perf_counter()
        for query in queries:
            tick = time.perf_counter()
            ranking, stage_seconds, count = query_function(query.text)
            stage_seconds["end_to_end"] = time.perf_counter() - tick
            run[query.id] = ranking
            timings.append(stage_seconds)
            candidates.append(count)
            if on_query is not None:
                on_query()
        seconds = time.perf_counter() - started
    return SystemRun(run, timings, stages, seconds, memory.record(), candidates,
                     warm_up_seconds)


def _first_stage_query(system: SystemSpec, searcher: Searcher, depth: int):
    options = search_options(system)

    def query_function(text: str):
        result = searcher.search(text, k=depth, candidates=depth, first_stage_only=True, **options)
        ranking = [(hit.doc_id, hit.score) for hit in result.hits]
        return ranking, {"first_stage": result.timings["first_stage"]}, result.candidates

    return query_function


def _mice_query(system: SystemSpec, searcher: Searcher, depth: int):
    options = search_options(system)

    def query_function(text: str):
        result = searcher.search(text, k=depth, candidates=system.candidates, **options)
        ranking = [(hit.doc_id, hit.score) for hit in result.hits]
        return ranking, {stage: result.timings[stage] for stage in MICE_STAGES}, result.candidates

    return query_function


def _cross_encoder_query(system: SystemSpec, searcher: Searcher, model: Any, depth: int,
                         batch_size: int):
    from ..cross_encoder import score_texts

    options = search_options(system)
    store = searcher.index.store

    def query_function(text: str):
        result = searcher.search(text, k=system.candidates, candidates=system.candidates,
                                 first_stage_only=True, **options)
        seconds = {"first_stage": result.timings["first_stage"]}
        tick = time.perf_counter()
        doc_ids = [hit.doc_id for hit in result.hits]
        texts = [store.document(store.position(doc_id)).full_text() for doc_id in doc_ids]
        seconds["load_texts"] = time.perf_counter() - tick
        tick = time.perf_counter()
        scores = score_texts(model, text, texts, batch_size=batch_size) if texts else np.zeros(0)
        seconds["interaction"] = time.perf_counter() - tick
        if not np.isfinite(scores).all():
            raise FloatingPointError(f"the cross-encoder gave non-finite scores for query {text!r}")
        order = rank_order(doc_ids, scores)[:depth]
        return [(doc_ids[i], float(scores[i])) for i in order], seconds, len(doc_ids)

    return query_function
