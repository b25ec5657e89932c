"""Re-rank a first-stage TREC run with any model that scores texts: MICE or a cross-encoder.

Each query's candidates are the first ``depth`` results of the run, in trec_eval's order
(score descending, equal scores by document id descending). Their texts come from the
collection, looked up by id, and are scored afresh with
:func:`mice_engine.cross_encoder.score_texts`; no index is needed. A MICE model that carries a
BM25 blend combines its scores with the run's scores, as search combines them with BM25. The
re-ranked run contains those candidates only, ordered as :func:`mice_engine.search.rank_order`
orders scores.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .evaluation import Run, read_trec_run
from .sources import Query, SourceError, open_documents

logger = logging.getLogger(__name__)


@dataclass
class RerankResult:
    """A re-ranked run and the time spent on each query."""

    run: Run
    # Seconds spent tokenising and scoring each query's candidates, by query id.
    seconds: dict[str, float] = field(default_factory=dict)

    def latency_ms(self) -> dict[str, float]:
        """p50, p95 and mean of the per-query times, in milliseconds."""
        values = np.array(list(self.seconds.values())) * 1000
        if len(values) == 0:
            return {}
        return {"p50_ms": float(np.percentile(values, 50)),
                "p95_ms": float(np.percentile(values, 95)),
                "mean_ms": float(values.mean())}


def read_candidates(run_path: str | os.PathLike, depth: int) -> Run:
    """Read a TREC run and keep each query's first ``depth`` results (document id and score),
    in trec_eval's order."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    run = read_trec_run(run_path)
    return {query_id: results[:depth] for query_id, results in run.items()}


def match_queries(candidates: Run, queries: Iterable[Query],
                  source: str) -> dict[str, str]:
    """Map each query id of the run to its text. Raise SourceError naming the ids that the
    query source lacks."""
    texts = {query.id: query.text for query in queries}
    missing = [query_id for query_id in candidates if query_id not in texts]
    if missing:
        raise SourceError(
            f"{len(missing)} query ids of the run are not in {source}, for example "
            f"{', '.join(repr(query_id) for query_id in missing[:5])}. Pass the query source "
            "that produced the run, or the matching --split"
        )
    return {query_id: texts[query_id] for query_id in candidates}


def load_documents(collection: str | os.PathLike, doc_ids: Iterable[str],
                   show_progress: bool = False) -> dict[str, str]:
    """Read the texts (title and body, as indexing joins them) of ``doc_ids`` from a collection.

    Raises SourceError naming the ids that the collection lacks, and an id that the collection
    contains twice.
    """
    from tqdm.auto import tqdm

    requested = set(doc_ids)
    documents = open_documents(collection)
    texts: dict[str, str] = {}
    progress = tqdm(documents, total=documents.count(), unit="doc", desc="reading documents",
                    disable=not show_progress, dynamic_ncols=True)
    for document in progress:
        if document.id not in requested:
            continue
        if document.id in texts:
            raise SourceError(
                f"document id {document.id!r} appears twice in {collection}, so its text is "
                "ambiguous; remove the duplicate"
            )
        texts[document.id] = document.full_text()
    missing = sorted(requested - texts.keys())
    if missing:
        raise SourceError(
            f"{len(missing)} document ids of the run are not in {collection}, for example "
            f"{', '.join(repr(doc_id) for doc_id in missing[:5])}. Pass the collection that "
            "produced the run"
        )
    return texts


def rerank(
    model,
    candidates: Run,
    query_texts: dict[str, str],
    documents: dict[str, str],
    batch_size: int = 32,
    on_query: Callable[[str], None] | None = None,
    fusion: bool = True,
) -> RerankResult:
    """Score every query's candidates with ``model`` and sort them.

    ``model`` is a MiceModel or a CrossEncoderModel. ``candidates`` maps each query id to its
    (document id, first-stage score) pairs. A MICE model that carries a BM25 blend (see
    :class:`mice_engine.search.FirstStageBlend`) ranks by it unless ``fusion`` is False, and
    the blend takes the first-stage scores as the BM25 scores it was fitted on. ``on_query``
    is called with each query id once its candidates are scored.
    """
    from .cross_encoder import score_texts
    from .search import FirstStageBlend, rank_order

    blend = FirstStageBlend.for_model(model, enabled=fusion)
    result = RerankResult(run={})
    for query_id, results in candidates.items():
        tick = time.perf_counter()
        doc_ids = [doc_id for doc_id, _ in results]
        texts = [documents[i] for i in doc_ids]
        maxsim = None
        if blend is not None and blend.needs_maxsim:
            scores, maxsim = score_texts(model, query_texts[query_id], texts,
                                         batch_size=batch_size, with_maxsim=True)
        else:
            scores = score_texts(model, query_texts[query_id], texts, batch_size=batch_size)
        if blend is not None:
            first_stage_scores = np.array([score for _, score in results], dtype=np.float64)
            scores = blend.apply(scores, first_stage_scores, maxsim)
        order = rank_order(doc_ids, scores)
        result.seconds[query_id] = time.perf_counter() - tick
        result.run[query_id] = [(doc_ids[i], float(scores[i])) for i in order]
        if on_query is not None:
            on_query(query_id)
    return result
