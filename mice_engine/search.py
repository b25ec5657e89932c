"""Query time: first-stage candidates, their stored states, MICE interaction scoring, ranking.

The first stage is BM25, the dense index over the stored token states, or both fused by
reciprocal rank fusion (``hybrid``). Rankings are sorted by descending score. Equal scores are
ordered by descending document id, which is trec_eval's order, so a written run and its
evaluation agree on ranks.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dense import DENSE_FILE, DenseFirstStage, reciprocal_rank_fusion
from .first_stage import BM25_DIR, BM25FirstStage
from .indexing import MiceIndexError, read_manifest, resolve_device
from .model import (
    DEFAULT_MODEL_NAME,
    MiceModel,
    ModelError,
    load_model,
    maxsim_from_maxima,
    maxsim_token_maxima,
)
from .sources import Query
from .store import StateStore

logger = logging.getLogger(__name__)

STAGES = ("first_stage", "query_encoding", "load_states", "interaction")
FIRST_STAGES = ("bm25", "dense", "hybrid")
# The k of reciprocal rank fusion: 60, the value of its authors (Cormack, Clarke and Büttcher,
# SIGIR 2009), which Elasticsearch and LanceDB also use by default.
RRF_K = 60


@dataclass
class Hit:
    rank: int
    doc_id: str
    score: float
    first_stage_rank: int
    first_stage_score: float
    title: str | None = None
    text: str | None = None


@dataclass
class SearchResult:
    query: str
    hits: list[Hit]
    candidates: int
    # Seconds spent in each of STAGES for this query.
    timings: dict[str, float] = field(default_factory=dict)
    query_truncated: bool = False
    first_stage: str = "bm25"


def rank_order(doc_ids: list[str], scores: np.ndarray) -> list[int]:
    """Indices that sort by descending score, equal scores by descending document id."""
    order = sorted(range(len(doc_ids)), key=lambda i: doc_ids[i], reverse=True)
    return sorted(order, key=lambda i: -float(scores[i]))


def length_batches(lengths: np.ndarray, max_batch: int,
                   max_padding: float = 0.1) -> list[np.ndarray]:
    """Group positions into batches of similar length, longest first.

    A batch contains at most ``max_batch`` positions, and padding every member to the batch's
    longest adds at most ``max_padding`` of its real length. Cross-attention costs time per
    stored token, so padded tokens cost as much as real ones.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = int(lengths[order[start]])
        end, real = start + 1, width
        while end < len(order) and end - start < max_batch:
            candidate = real + int(lengths[order[end]])
            if width * (end - start + 1) > (1 + max_padding) * candidate:
                break
            real = candidate
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


class Index:
    """A complete index folder opened for search: manifest, state store, BM25 and, when the
    index has one, the dense index (opened on first use)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.store = StateStore(self.folder / self.manifest["states"]["file"])
        if len(self.store) != self.manifest["counts"]["documents"]:
            raise MiceIndexError(
                f"index {self.folder}: the manifest lists {self.manifest['counts']['documents']} "
                f"documents but the store holds {len(self.store)}; rebuild it with --overwrite"
            )
        try:
            self.bm25 = BM25FirstStage.load(self.folder / BM25_DIR)
        except (OSError, ValueError) as error:
            raise MiceIndexError(f"index {self.folder}: the BM25 index in {BM25_DIR}/ cannot be "
                                 f"read ({error}); rebuild the index with --overwrite") from None
        if self.bm25.num_documents != len(self.store):
            raise MiceIndexError(
                f"index {self.folder}: BM25 covers {self.bm25.num_documents} documents but the "
                f"store holds {len(self.store)}; rebuild it with --overwrite"
            )
        self._dense: DenseFirstStage | None = None

    @property
    def has_dense(self) -> bool:
        return "dense" in self.manifest["first_stage"]

    @property
    def dense(self) -> DenseFirstStage:
        """The dense first stage, memory-mapped on first use."""
        if self._dense is None:
            record = self.manifest["first_stage"].get("dense")
            if record is None:
                raise MiceIndexError(
                    f"index {self.folder} has no dense index; derive one with `mice compress "
                    f"{self.folder} --output DIR --dense`, or use --first-stage bm25")
            self._dense = DenseFirstStage.load(self.folder / record.get("path", DENSE_FILE),
                                               self.store.offsets, record)
        return self._dense

    def __len__(self) -> int:
        return len(self.store)

    def load_model(self, model: MiceModel | str | None = None) -> MiceModel:
        """Load the model that scores this index: the one it was built with, or ``model``.

        Another model is accepted only if its lower layers are identical, since the stored
        states came from them.
        """
        record = self.manifest["model"]
        if model is None:
            if record["source"] is None:
                raise MiceIndexError(f"index {self.folder} does not record where its model is; "
                                 "pass --model")
            source = record["source"]
            if source == DEFAULT_MODEL_NAME or (Path(source) / "mice_config.json").is_file():
                model = load_model(source)
            else:
                model = load_model(
                    source,
                    merge_layer=record["merge_layer"],
                    interaction_layers=record["interaction_layers"],
                    query_max_length=record["query_max_length"],
                    doc_max_length=record["doc_max_length"],
                    seed=record["head_seed"],
                )
            if model.weights_sha256() != record["sha256"]:
                raise MiceIndexError(
                    f"the model at {source} has changed since index {self.folder} was built "
                    "(weights hash differs); rebuild the index or pass the original model with "
                    "--model"
                )
            return model
        if not isinstance(model, MiceModel):
            model = load_model(model)
        if model.weights_sha256(lower_only=True) != record["encoder_sha256"]:
            raise MiceIndexError(
                f"model {model.source} has other lower layers than the model that built index "
                f"{self.folder} ({record['source']}); its stored states would be meaningless. "
                "Rebuild the index with this model"
            )
        return model

    def close(self) -> None:
        self._dense = None
        self.store.close()


def fuse_scores(mice_scores: np.ndarray, first_stage_scores: np.ndarray,
                first_stage_weight: float, maxsim_scores: np.ndarray | None = None,
                maxsim_weight: float = 0.0) -> np.ndarray:
    """Blend MICE and first-stage scores of one query's candidates, and optionally their
    MaxSim scores (see :func:`mice_engine.model.maxsim_scores`).

    Each list is standardised over the candidates (zero mean, unit deviation; a constant list
    becomes zeros), then ``(1 - w - m) * mice + w * first_stage + m * maxsim``, with ``w`` the
    first-stage weight and ``m`` the MaxSim weight. ``w = m = 0`` keeps the MICE ranking.
    """
    def standardise(values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        deviation = values.std()
        return (values - values.mean()) / deviation if deviation > 0 else np.zeros_like(values)

    w = float(first_stage_weight)
    m = float(maxsim_weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"first_stage_weight must be between 0 and 1, got {w}")
    if not 0.0 <= m <= 1.0 - w + 1e-9:
        raise ValueError(f"maxsim_weight must be between 0 and 1 - first_stage_weight "
                         f"({1.0 - w:g}), got {m}")
    if m > 0.0 and maxsim_scores is None:
        raise ValueError("maxsim_weight is above 0 but no MaxSim scores were given")
    if w == 0.0 and m == 0.0:
        return np.asarray(mice_scores, dtype=np.float32)
    blended = max(0.0, 1 - w - m) * standardise(mice_scores) + w * standardise(first_stage_scores)
    if m > 0.0:
        blended = blended + m * standardise(maxsim_scores)
    return blended.astype(np.float32)


@dataclass(frozen=True)
class FirstStageBlend:
    """The combination of MICE and BM25 scores that a model ranks by, read from its
    ``mice_config.json`` (``fusion``).

    A model tuned with ``--fuse-first-stage`` carries ``weight`` and ranks by
    :func:`fuse_scores`; tuned with ``--fuse-maxsim`` as well, it also carries
    ``maxsim_weight``, and the blend adds the MaxSim score of the candidates' stored states. A
    model trained with ``--first-stage-feature`` carries ``scale`` and ranks by
    ``MICE + scale * BM25``. All were fitted on BM25 scores of this engine's index.
    """

    weight: float | None = None
    scale: float | None = None
    # Candidates per held-out query on which ``weight`` was tuned; None when not recorded.
    tuned_candidates: int | None = None
    maxsim_weight: float = 0.0

    @classmethod
    def for_model(cls, model: Any, enabled: bool = True) -> FirstStageBlend | None:
        """Return the blend that ``model`` carries, or None when it carries none (cross-encoders
        never do) or when ``enabled`` is False."""
        settings = getattr(model.config, "fusion", None) or {}
        source = getattr(model, "source", None) or "the model"
        if not isinstance(settings, dict):
            raise ModelError(f"fusion of {source} is {settings!r}, not an object of weights; fix "
                             "mice_config.json or retrain the model")

        weight = settings.get("first_stage_weight")
        scale = settings.get("first_stage_scale")
        maxsim = settings.get("maxsim_weight")
        if not enabled or not (weight or scale or maxsim):
            return None

        if scale:
            if maxsim:
                raise ModelError(f"fusion of {source} has both first_stage_scale and "
                                 "maxsim_weight, but the sum mode takes no MaxSim term; fix "
                                 "mice_config.json or retrain the model")
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                scale = math.nan
            if not math.isfinite(scale):
                written = settings["first_stage_scale"]
                raise ModelError(f"first_stage_scale of {source} is {written!r}, not a finite "
                                 "number; fix mice_config.json or retrain the model")
            return cls(scale=scale)

        try:
            weight, maxsim = float(weight or 0.0), float(maxsim or 0.0)
        except (TypeError, ValueError):
            raise ModelError(f"fusion weights of {source} are not numbers (first_stage_weight="
                             f"{weight!r}, maxsim_weight={maxsim!r}); fix mice_config.json or "
                             "retrain the model") from None
        if not (0.0 <= weight <= 1.0 and 0.0 <= maxsim <= 1.0 and weight + maxsim <= 1.0 + 1e-9):
            raise ModelError(f"fusion weights of {source} are invalid: first_stage_weight="
                             f"{weight} and maxsim_weight={maxsim} must each lie in [0, 1] and "
                             "sum to 1 at most; fix mice_config.json or retrain the model")

        training = getattr(model.config, "training", None) or {}
        tuned = (training.get("settings") or {}).get("eval_candidates")
        return cls(weight=weight, tuned_candidates=int(tuned) if tuned else None,
                   maxsim_weight=maxsim)

    @property
    def needs_maxsim(self) -> bool:
        """Whether :meth:`apply` needs the candidates' MaxSim scores."""
        return self.maxsim_weight > 0.0

    def apply(self, mice_scores: np.ndarray, first_stage_scores: np.ndarray,
              maxsim_scores: np.ndarray | None = None) -> np.ndarray:
        """Combine one query's MICE scores with the first-stage scores of the same candidates
        (and their MaxSim scores, which a blend with :attr:`needs_maxsim` requires)."""
        if len(mice_scores) != len(first_stage_scores):
            raise ValueError(f"{len(mice_scores)} MICE scores but {len(first_stage_scores)} "
                             "first-stage scores; pass one of each per candidate")
        if self.scale is not None:
            first_stage = np.asarray(first_stage_scores, dtype=np.float32)
            return (np.asarray(mice_scores, dtype=np.float32)
                    + np.float32(self.scale) * first_stage).astype(np.float32)
        if self.needs_maxsim and (maxsim_scores is None
                                  or len(maxsim_scores) != len(mice_scores)):
            raise ValueError("this blend needs one MaxSim score per candidate; compute them "
                             "with mice_engine.model.maxsim_scores")
        return fuse_scores(mice_scores, first_stage_scores, self.weight or 0.0,
                           maxsim_scores, self.maxsim_weight)

    def describe(self) -> str:
        """Say what a ranking with this blend ranks by, for a log line."""
        if self.scale is not None:
            return f"MICE score + {self.scale:.3f} x BM25 score, as the model was trained"
        if self.needs_maxsim:
            mice = max(0.0, 1.0 - (self.weight or 0.0) - self.maxsim_weight)
            return (f"MICE ({mice:.2f}) blended with BM25 ({self.weight or 0.0:.2f}) and the "
                    f"MaxSim of the merge-layer states ({self.maxsim_weight:.2f}), weights tuned "
                    "on held-out training queries")
        return (f"MICE blended with BM25 (weight {self.weight:.2f}, tuned on held-out training "
                "queries)")


class Searcher:
    """Search an index: BM25 candidates re-scored by the MICE interaction layers.

    Example::

        searcher = Searcher("indexes/scifact")
        for hit in searcher.search("microbiome and obesity", k=5).hits:
            print(hit.rank, hit.doc_id, hit.score)
    """

    def __init__(self, index: Index | str | os.PathLike, model: MiceModel | str | None = None,
                 device: str | None = None, batch_size: int = 128, fusion: bool = True) -> None:
        import torch

        self.index = index if isinstance(index, Index) else Index(index)
        self.device = resolve_device(device)
        self.model = self.index.load_model(model).to(self.device).eval()
        self.batch_size = batch_size
        # A model that carries a BM25 blend ranks by it unless ``fusion`` is False, which
        # gives the MICE scores alone.
        self.blend = FirstStageBlend.for_model(self.model, enabled=fusion)
        self._torch = torch
        self._warned_untrained = False

    def search(self, query: str, k: int = 10, candidates: int = 100,
               first_stage_only: bool = False, with_text: bool = False,
               first_stage: str = "bm25", nprobe: int | None = None,
               token_candidates: int | None = None) -> SearchResult:
        """Rank documents for one query text.

        Args:
            query: the query text.
            k: number of hits returned (fewer when fewer documents match).
            candidates: documents that the first stage passes to the interaction stage; at
                least ``k``.
            first_stage_only: return the first-stage ranking itself, without MICE.
            with_text: fill each hit's title and text from the store.
            first_stage: ``bm25``, ``dense`` (the dense index over the stored token states) or
                ``hybrid`` (both lists, each ``candidates`` deep, fused by reciprocal rank
                fusion with k = 60).
            nprobe: inverted lists the dense index visits per query token [default: 32].
            token_candidates: nearest stored tokens per query token [default: 256 or
                ``candidates``, whichever is larger].
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if candidates < k:
            raise ValueError(f"candidates ({candidates}) must be at least k ({k})")
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"first_stage must be one of {', '.join(FIRST_STAGES)}, got "
                             f"{first_stage!r}")
        timings = dict.fromkeys(STAGES, 0.0)
        encoded = None
        if first_stage != "bm25":
            encoded = self._encode_query(query, timings)
        tick = time.perf_counter()
        rows, first_scores = self._first_stage(query, first_stage, candidates, encoded, nprobe,
                                               token_candidates)
        doc_ids = [self.index.store.doc_ids[row] for row in rows]
        first_order = rank_order(doc_ids, first_scores)
        first_rank = {int(rows[i]): rank for rank, i in enumerate(first_order, start=1)}
        timings["first_stage"] = time.perf_counter() - tick

        truncated = encoded[2] if encoded is not None else False
        if first_stage_only or len(rows) == 0:
            scores, order = first_scores, first_order
        else:
            with_maxsim = self.blend is not None and self.blend.needs_maxsim
            scores, truncated, maxsim = self._score(query, rows, timings, encoded,
                                                    with_maxsim=with_maxsim)
            if self.blend is not None:
                # The blend was learnt with BM25 scores, whatever the first stage was.
                bm25_scores = (first_scores if first_stage == "bm25"
                               else self.index.bm25.score_all(query)[rows])
                scores = self.blend.apply(scores, bm25_scores, maxsim)
            order = rank_order(doc_ids, scores)
        hits = []
        for rank, i in enumerate(order[:k], start=1):
            row = int(rows[i])
            hit = Hit(rank, doc_ids[i], float(scores[i]), first_rank[row], float(first_scores[i]))
            if with_text:
                document = self.index.store.document(row)
                hit.title, hit.text = document.title, document.text
            hits.append(hit)
        return SearchResult(query, hits, len(rows), timings, truncated, first_stage)

    def _encode_query(self, query: str, timings: dict[str, float]):
        """Run the lower layers on the query: (states, mask, whether it was truncated)."""
        from .encoding import encode_query

        tick = time.perf_counter()
        with self._torch.inference_mode():
            encoded = encode_query(self.model, query)
        timings["query_encoding"] += time.perf_counter() - tick
        return encoded

    def _first_stage(self, query: str, first_stage: str, candidates: int, encoded,
                     nprobe: int | None, token_candidates: int | None):
        """Candidate rows and their first-stage scores (BM25, dense, or fused ranks)."""
        if first_stage == "bm25":
            return self.index.bm25.retrieve(query, candidates)
        states, mask, _ = encoded
        query_states = states[0][mask[0].bool()].float().cpu().numpy()
        dense_rows, dense_scores = self.index.dense.retrieve(
            query_states, candidates, nprobe=nprobe, token_candidates=token_candidates)
        if first_stage == "dense":
            return dense_rows, dense_scores
        bm25_rows, bm25_scores = self.index.bm25.retrieve(query, candidates)
        # Each list in its own rank order (ties by descending id) before the fusion.
        store = self.index.store
        rankings = [rows[rank_order([store.doc_ids[row] for row in rows], scores)]
                    for rows, scores in ((bm25_rows, bm25_scores), (dense_rows, dense_scores))]
        return reciprocal_rank_fusion(rankings, candidates, RRF_K)

    def _score(self, query: str, rows: np.ndarray, timings: dict[str, float], encoded=None,
               with_maxsim: bool = False):
        """Return (MICE scores, whether the query was cut, MaxSim scores or None) of ``rows``.

        With ``with_maxsim``, the MaxSim score of each candidate is computed from the same
        stored states, over all its windows; its time counts as interaction time."""
        torch = self._torch
        if not self.model.config.trained and not self._warned_untrained:
            logger.warning(
                "the MICE head of this model is untrained, so its ranking is close to random; "
                "use --first-stage-only for the BM25 ranking, or a trained model"
            )
            self._warned_untrained = True
        with torch.inference_mode():
            if encoded is None:
                encoded = self._encode_query(query, timings)
            query_states, query_mask, truncated = encoded

            # Each candidate is scored by its best window (one window unless the index split
            # long documents). A forward pass takes up to batch_size windows, longest first,
            # and cross-attention reads them in groups of similar length, to pad little.
            store = self.index.store
            windows = [(i, start, end) for i, row in enumerate(rows)
                       for start, end in store.windows(int(row))]
            lengths = np.array([end - start for _, start, end in windows])
            window_scores = np.empty(len(windows), dtype=np.float32)
            window_maxima = (np.empty((len(windows), query_states.shape[1]), dtype=np.float32)
                             if with_maxsim else None)
            by_length = np.argsort(-lengths, kind="stable")
            for first in range(0, len(windows), self.batch_size):
                members = by_length[first : first + self.batch_size]
                tick = time.perf_counter()
                groups, order = [], []
                for group in length_batches(lengths[members], len(members)):
                    batch = members[group]
                    groups.append(self._load_windows([windows[w] for w in batch],
                                                     query_states.dtype))
                    order.append(batch)
                timings["load_states"] += time.perf_counter() - tick

                tick = time.perf_counter()
                logits = self.model.score_groups(query_states, query_mask, groups)
                window_scores[np.concatenate(order)] = logits.float().cpu().numpy()
                if window_maxima is not None:
                    for (states, mask), batch in zip(groups, order, strict=True):
                        maxima = maxsim_token_maxima(query_states, query_mask, states, mask)
                        window_maxima[batch] = maxima.cpu().numpy()
                timings["interaction"] += time.perf_counter() - tick
            owners = [i for i, _, _ in windows]
            scores = np.full(len(rows), -np.inf, dtype=np.float32)
            np.maximum.at(scores, owners, window_scores)
            maxsim = None
            if window_maxima is not None:
                # A document's token maxima are the maxima over all its windows.
                maxima = np.full((len(rows), query_states.shape[1]), -2.0, dtype=np.float32)
                np.maximum.at(maxima, owners, window_maxima)
                maxsim = maxsim_from_maxima(torch.from_numpy(maxima),
                                            query_mask.cpu()).numpy()
        if not np.isfinite(scores).all():
            raise FloatingPointError(f"non-finite MICE scores for query {query!r}")
        return scores, truncated, maxsim

    def _load_windows(self, windows: list[tuple[int, int, int]], dtype):
        """Read windows' stored states into one zero-padded batch; returns (states, mask)."""
        torch = self._torch
        store = self.index.store
        width = max(end - start for _, start, end in windows)
        padded = np.zeros((len(windows), width, store.hidden_size), dtype=np.float16)
        mask = np.zeros((len(windows), width), dtype=bool)
        # A store of codes decodes all the windows in one call.
        parts = store.row_ranges([(start, end) for _, start, end in windows])
        for slot, part in enumerate(parts):
            padded[slot, : len(part)] = part
            mask[slot, : len(part)] = True
        return (torch.from_numpy(padded).to(self.device, dtype=dtype),
                torch.from_numpy(mask).to(self.device))

    def search_many(self, queries: Iterable[Query], **options: Any) -> Iterator[tuple[Query, SearchResult]]:
        for query in queries:
            yield query, self.search(query.text, **options)

    def close(self) -> None:
        self.index.close()


def resident_memory_mib() -> dict[str, float]:
    """Measure the resident memory of this process now and at its peak, in MiB.

    Both include the pages of memory-mapped files (states, codes, BM25, dense index) that the
    process has touched; the kernel can drop those pages under memory pressure. On Linux the
    current figure is also split into anonymous memory and file-backed pages.
    """
    import resource

    import psutil

    # ru_maxrss is in KiB on Linux (in bytes on macOS). Linux keeps it across fork and exec,
    # so a search started by a large Python process would report that process's peak.
    # Where /proc is readable, VmHWM (the peak of this process's own memory) replaces it.
    memory = {"rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return memory
    names = {"VmHWM": "peak_rss_mib", "RssAnon": "anonymous_mib", "RssFile": "file_backed_mib"}
    for line in status:
        key, _, value = line.partition(":")
        if key in names:
            memory[names[key]] = round(int(value.split()[0]) / 1024, 1)
    return memory


def latency_summary(timings: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50/p95/mean in milliseconds for each stage and for the total, over many queries."""
    summary = {}
    for stage in (*STAGES, "total"):
        values = np.array([
            sum(t.values()) if stage == "total" else t.get(stage, 0.0) for t in timings
        ]) * 1000
        if len(values) == 0:
            continue
        summary[stage] = {"p50_ms": float(np.percentile(values, 50)),
                          "p95_ms": float(np.percentile(values, 95)),
                          "mean_ms": float(values.mean())}
    return summary
