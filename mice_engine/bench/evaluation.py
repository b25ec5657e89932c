"""Quality and latency of one system's run, significance against the first system, and every
system's quality on the query subsets that some systems ran."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..evaluation import evaluate
from .stats import paired_t_test, percentiles_ms, randomization_test
from .systems import SystemRun


def evaluate_system(outcome: SystemRun, queries: Sequence[Any], qrels: dict[str, dict[str, int]],
                    metrics: Sequence[str]) -> dict[str, Any]:
    """Metrics over the system's queries (every one judged), latency per stage, throughput."""
    query_ids = [query.id for query in queries]
    evaluation = evaluate(outcome.run, {query_id: qrels[query_id] for query_id in query_ids},
                          metrics)
    latency = {stage: percentiles_ms([timing[stage] for timing in outcome.timings])
               for stage in (*outcome.stages, "end_to_end")}
    overhead = [timing["end_to_end"] - sum(timing[stage] for stage in outcome.stages)
                for timing in outcome.timings]
    latency["other"] = percentiles_ms(overhead)
    record: dict[str, Any] = {
        "queries": query_ids,
        "query_count": len(query_ids),
        "queries_without_results": len(evaluation.missing_queries),
        "metrics": evaluation.metrics,
        "per_query": evaluation.per_query,
        "latency_ms": latency,
        "seconds": round(outcome.seconds, 3),
        "queries_per_second": round(len(query_ids) / outcome.seconds, 3),
        "warm_up_seconds": (None if outcome.warm_up_seconds is None
                            else round(outcome.warm_up_seconds, 6)),
        "candidates_mean": float(np.mean(outcome.candidates)) if outcome.candidates else 0.0,
        **outcome.memory,
    }
    if "interaction" in outcome.stages:
        interaction = latency["interaction"]
        end_to_end = latency["end_to_end"]
        record["end_to_end_over_interaction"] = {
            "mean": _ratio(end_to_end["mean"], interaction["mean"]),
            "p50": _ratio(end_to_end["p50"], interaction["p50"]),
        }
    return record


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def significance(system: dict[str, Any], reference: dict[str, Any], reference_name: str,
                 metrics: Sequence[str], test: str, alpha: float, seed: int) -> dict[str, Any]:
    """Paired test of ``system`` against ``reference`` on every metric, over the queries both
    ran."""
    reference_ids = set(reference["queries"])
    common = [query_id for query_id in system["queries"] if query_id in reference_ids]
    results = {}
    for metric in metrics:
        ours = [system["per_query"][metric][query_id] for query_id in common]
        theirs = [reference["per_query"][metric][query_id] for query_id in common]
        if test == "paired-t":
            outcome = paired_t_test(ours, theirs)
        else:
            outcome = randomization_test(ours, theirs, seed=seed)
        p_value = outcome["p_value"]
        outcome["significant"] = None if p_value is None else bool(p_value < alpha)
        results[metric] = outcome
    return {"against": reference_name, "test": test, "alpha": alpha, "queries": len(common),
            "metrics": results}


def compare_subsets(systems: dict[str, dict[str, Any]], ordered_ids: Sequence[str],
                    metrics: Sequence[str]) -> list[dict[str, Any]]:
    """For each query set that a system ran and some other system ran more of, every system's
    metrics on that set.

    Every system's queries are the first N of ``ordered_ids``, so the set of a smaller N lies
    inside the set of every larger one, and systems that ran more queries are scored again on
    the smaller set alone.
    """
    largest = max(record["query_count"] for record in systems.values())
    # A set that every system ran adds nothing to the main table.
    sizes = sorted({record["query_count"] for record in systems.values()
                    if record["query_count"] < largest})
    subsets = []
    for size in sizes:
        subset = list(ordered_ids[:size])
        rows = {}
        for name, record in systems.items():
            if record["query_count"] < size:
                continue
            rows[name] = {metric: math.fsum(record["per_query"][metric][query_id]
                                            for query_id in subset) / size
                          for metric in metrics}
        subsets.append({"query_count": size, "systems": rows,
                        "ran_by": [name for name, record in systems.items()
                                   if record["query_count"] == size]})
    return subsets
