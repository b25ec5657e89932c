"""Write and read TREC run files, and score runs against relevance judgments.

A run maps each query id to its ranked results, best first. Metrics come from
ir_measures, named as it names them (``nDCG@10``, ``RR@10``, ``R@100``).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sources import SourceError, iter_lines

logger = logging.getLogger(__name__)

DEFAULT_METRICS: tuple[str, ...] = ("nDCG@10", "RR@10", "R@100")

# Query id -> ranked list of (document id, score), best first.
Run = dict[str, list[tuple[str, float]]]

_METRIC_EXAMPLES = "nDCG@10, RR@10, R@100, P@5, AP, Judged@10"


@dataclass
class Evaluation:
    """Metric values of a run, averaged over every judged query."""

    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    judged_queries: int
    missing_queries: list[str]
    unjudged_queries: int


# ---------------------------------------------------------------------------
# TREC run files


def write_trec_run(path: str | os.PathLike, run: Run, tag: str) -> None:
    """Write a run in TREC format, one ``qid Q0 docid rank score tag`` line per result.

    Ranks start at 1 and follow each list's order. Scores are written with 9 significant
    digits (``format(score, ".9g")``). The file is written to a temporary file in the
    same folder and then renamed over ``path``, so readers never see a partial file.
    A query with an empty list writes no line, so it is absent when the file is read back.

    Raises ValueError when a query id, document id or tag is empty or contains
    whitespace, which the format cannot hold, when a query lists a document twice, or
    when a score is NaN. Raises TypeError when an id is not a string.
    """
    _check_token("tag", tag)
    target = Path(path)
    temporary_path = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    reordered_queries = 0

    # os.open with mode 0o666 lets the umask set the permissions, as open() would.
    descriptor = os.open(temporary_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(descriptor, "w", encoding="utf-8", newline="\n") as stream:
            for query_id, results in run.items():
                lines = _format_query_results(query_id, results, tag)
                stream.writelines(lines)
                if _differs_from_score_order(lines):
                    reordered_queries += 1
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary_path, target)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise

    if reordered_queries:
        logger.warning(
            "%s: %d queries list results in an order that differs from the order by "
            "written score (descending, ties by document id descending). trec_eval and "
            "read_trec_run re-sort by score, so their metrics can differ from evaluate() on "
            "the run in memory. Sort each list by (score, document id) descending, or break "
            "score ties, before writing",
            target,
            reordered_queries,
        )


def read_trec_run(path: str | os.PathLike) -> Run:
    """Read a TREC run file of ``qid Q0 docid rank score tag`` lines.

    Ids are kept as strings. Each query's results are sorted by score descending, and
    ties by document id descending, which is how trec_eval orders them. The rank column
    is checked to be an integer but does not affect the order. Queries keep the order in
    which they first appear.

    Raises SourceError with the line number on a line without 6 columns, a non-integer
    rank, a score that is not a finite number, and a repeated (qid, docid) pair.
    """
    source = Path(path)
    if not source.is_file():
        raise SourceError(f"run file not found: {source}. Pass the path of a TREC run file.")
    run: Run = {}
    first_lines: dict[tuple[str, str], int] = {}

    for number, line in iter_lines(source):
        query_id, document_id, score = _parse_run_line(source, number, line)
        pair = (query_id, document_id)
        if pair in first_lines:
            raise SourceError(
                f"{source}, line {number}: query {query_id!r} lists document {document_id!r} "
                f"again, first on line {first_lines[pair]}. Remove the duplicate line."
            )
        first_lines[pair] = number
        run.setdefault(query_id, []).append((document_id, score))

    for results in run.values():
        results.sort(key=_score_order_key, reverse=True)
    return run


def _parse_run_line(path: Path, number: int, line: str) -> tuple[str, str, float]:
    fields = line.split()
    if len(fields) != 6:
        raise SourceError(
            f"{path}, line {number}: expected 6 whitespace-separated columns "
            f"(qid Q0 docid rank score tag), found {len(fields)}. Fix the line."
        )
    query_id, _q0, document_id, rank_text, score_text, _tag = fields

    try:
        int(rank_text)
    except ValueError:
        raise SourceError(
            f"{path}, line {number}: rank {rank_text!r} of query {query_id!r} is not an "
            "integer. Write the rank as an integer in the fourth column."
        ) from None

    try:
        score = float(score_text)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise SourceError(
            f"{path}, line {number}: score {score_text!r} of query {query_id!r} is not a "
            "finite number. Write the score as a finite number in the fifth column."
        )
    return query_id, document_id, score


def _format_query_results(query_id: str, results: list[tuple[str, float]], tag: str) -> list[str]:
    _check_token("query id", query_id)
    lines = []
    seen: set[str] = set()
    for rank, (document_id, score) in enumerate(results, start=1):
        _check_token("document id", document_id)
        if document_id in seen:
            raise ValueError(
                f"query {query_id!r} lists document {document_id!r} twice. "
                "Keep one result per document."
            )
        seen.add(document_id)
        if math.isnan(score):
            raise ValueError(
                f"query {query_id!r}, document {document_id!r}: the score is NaN, "
                "so the result cannot be ranked. Fix the scoring."
            )
        # NOTE: 9 significant digits round-trip float32 scores but not float64 ones, so
        # float64 scores that differ only past the 9th digit are written as ties.
        lines.append(f"{query_id} Q0 {document_id} {rank} {format(score, '.9g')} {tag}\n")
    return lines


def _check_token(name: str, value: Any) -> None:
    """Raise unless value is a non-empty string without whitespace, as TREC columns require."""
    if not isinstance(value, str):
        raise TypeError(f"{name} {value!r} is {type(value).__name__}, not a string.")
    if not value or any(character.isspace() for character in value):
        raise ValueError(
            f"{name} {value!r} is empty or contains whitespace, which the TREC run format "
            "cannot hold. Remove the whitespace or map the id to one without it."
        )


def _score_order_key(result: tuple[str, float]) -> tuple[float, str]:
    """Return the key that, with reverse=True, orders by score, then document id, descending."""
    document_id, score = result
    return score, document_id


def _differs_from_score_order(lines: list[str]) -> bool:
    """Return whether re-sorting the written lines by score would change their order."""
    written = []
    for line in lines:
        _query_id, _q0, document_id, _rank, score_text, _tag = line.split()
        written.append((document_id, float(score_text)))
    return written != sorted(written, key=_score_order_key, reverse=True)


# ---------------------------------------------------------------------------
# Metrics


def evaluate(
    run: Run,
    qrels: dict[str, dict[str, int]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> Evaluation:
    """Score a run against qrels with ir_measures and average over every judged query.

    A judged query that is absent from the run, or has no results, scores 0 on every
    metric and is listed in ``missing_queries``. Queries of the run that qrels do not
    judge are ignored and counted in ``unjudged_queries``.

    The ranking evaluated is each list's order, whatever its scores. ir_measures 0.4.3
    computes each measure with one of several providers, and they break score ties
    differently. pytrec_eval puts tied documents in descending id order, and the msmarco
    provider, which computes RR@10, in ascending id order. So each result is passed with
    a score made from its rank.

    Raises ValueError for an unknown or unsupported metric name, empty qrels, and a
    query that lists a document twice.
    """
    import ir_measures  # imported here because importing it is slow

    if not qrels:
        raise ValueError("qrels are empty, so there is no judged query to average over.")
    names = list(dict.fromkeys(metrics))
    if not names:
        raise ValueError(f"no metrics given. Pass metric names such as {_METRIC_EXAMPLES}.")
    measures = {name: _parse_metric(ir_measures, name) for name in names}

    judged_run: dict[str, dict[str, float]] = {}
    missing_queries: list[str] = []
    for query_id in qrels:
        results = run.get(query_id)
        if results:
            judged_run[query_id] = _rank_scores(query_id, results)
        else:
            missing_queries.append(query_id)
    unjudged_queries = sum(1 for query_id in run if query_id not in qrels)

    values: dict[Any, dict[str, float]] = {measure: {} for measure in measures.values()}
    if judged_run:
        unique_measures = list(dict.fromkeys(measures.values()))
        for metric in ir_measures.iter_calc(unique_measures, qrels, judged_run):
            values[metric.measure][metric.query_id] = float(metric.value)

    per_query: dict[str, dict[str, float]] = {}
    means: dict[str, float] = {}
    for name, measure in measures.items():
        computed = values[measure]
        per_query[name] = {query_id: computed.get(query_id, 0.0) for query_id in qrels}
        means[name] = math.fsum(per_query[name].values()) / len(qrels)

    _log_coverage(len(qrels), missing_queries, unjudged_queries)
    return Evaluation(
        metrics=means,
        per_query=per_query,
        judged_queries=len(qrels),
        missing_queries=missing_queries,
        unjudged_queries=unjudged_queries,
    )


def _parse_metric(ir_measures: Any, name: str) -> Any:
    if not isinstance(name, str):
        raise TypeError(f"metric name {name!r} is {type(name).__name__}, not a string.")
    try:
        measure = ir_measures.parse_measure(name)
    except (NameError, ValueError, SyntaxError, TypeError, AssertionError) as error:
        raise ValueError(
            f"unknown metric {name!r} ({error}). Use ir_measures names such as {_METRIC_EXAMPLES}."
        ) from None
    if not ir_measures.DefaultPipeline.supports(measure):
        raise ValueError(
            f"metric {name!r} is valid, but no installed ir_measures provider computes it. "
            f"Install the provider it needs, or use a metric such as {_METRIC_EXAMPLES}."
        )
    return measure


def _rank_scores(query_id: str, results: list[tuple[str, float]]) -> dict[str, float]:
    """Return scores n, n-1, ..., 1 in list order, so every provider ranks as the list does."""
    scores: dict[str, float] = {}
    for rank, (document_id, _score) in enumerate(results):
        if document_id in scores:
            raise ValueError(
                f"query {query_id!r} lists document {document_id!r} twice. "
                "Keep one result per document."
            )
        scores[document_id] = float(len(results) - rank)
    return scores


def _log_coverage(judged: int, missing_queries: list[str], unjudged: int) -> None:
    if missing_queries:
        logger.warning(
            "%d of %d judged queries have no results in the run and score 0, for example %s",
            len(missing_queries),
            judged,
            ", ".join(repr(query_id) for query_id in missing_queries[:5]),
        )
    if unjudged:
        logger.info("ignored %d queries of the run that the qrels do not judge", unjudged)
