"""Dense first stage: nearest stored token states of the query's own tokens, with FAISS.

The index (``dense.faiss``) contains one vector per stored token state, in store order, so a FAISS
id is a row of the state store and the store's offsets map it to its document. Vectors are
L2-normalised and compared by inner product, so similarities are cosines. The lower-layer
states of a BERT model have a few dimensions of large magnitude and norms that vary from token to
token, so unnormalised inner products would rank tokens mostly by norm. ColBERT normalises its
token vectors too.

Index kinds:

- ``flat``: ``IndexFlatIP``, exact search, 4 bytes per dimension and token;
- ``ivfpq``: ``IndexIVFPQ`` with inner product. The number of inverted lists is derived from the
  token count by :func:`inverted_lists`. Vectors are stored as product-quantisation codes of
  ``hidden / 8`` bytes (48 at hidden size 384), plus the 8-byte id that FAISS keeps per vector.
- ``auto``: ``flat`` below :data:`MIN_IVF_TOKENS` token states, where the codebooks cannot be
  trained, else ``ivfpq``.

Candidate generation (:meth:`DenseFirstStage.retrieve`) approximates late interaction as
ColBERT's first stage does. Each query token takes its ``token_candidates`` nearest stored
tokens (by default 256, or the number of candidates requested when that is larger). A document's score is the sum over query tokens of the best similarity among that
token's neighbours that belong to the document. A query token with no neighbour in the document
adds 0. Query tokens are the query's lower-layer states without ``[CLS]`` and ``[SEP]``:
their states are alike across texts and would match every document's own ``[CLS]`` and
``[SEP]``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .compression import (DEFAULT_MAX_TRAIN_MIB, DEFAULT_MAX_TRAIN_VECTORS,
                          MIN_POINTS_PER_CENTROID, MIN_PQ_TRAINING_VECTORS, sample_rows,
                          training_sample_size, write_faiss_index)

logger = logging.getLogger(__name__)

DENSE_FILE = "dense.faiss"
DENSE_KINDS = ("auto", "ivfpq", "flat")
MIN_IVF_TOKENS = MIN_PQ_TRAINING_VECTORS
MAX_INVERTED_LISTS = 65_536
DEFAULT_NPROBE = 32
DEFAULT_TOKEN_CANDIDATES = 256
# Rows read, normalised and added per step while the index is built (48 MiB of float32 at 384).
_ADD_ROWS = 1 << 15


class DenseIndexError(ValueError):
    """A dense index setting or file that cannot be used."""


def inverted_lists(tokens: int, training_vectors: int) -> int:
    """Number of inverted lists of an ``ivfpq`` dense index.

    The largest power of two at most ``4 * sqrt(tokens)``, at most 65,536, and small enough that
    each list's centroid has 39 training vectors. With the default sample of 131,072 vectors this gives 2,048 lists for
    Cranfield (297,346 tokens) and for SciFact (1,693,234).
    """
    by_size = 2 ** int(math.log2(max(4 * math.sqrt(tokens), 1)))
    by_sample = 2 ** int(math.log2(max(training_vectors // MIN_POINTS_PER_CENTROID, 1)))
    return max(1, min(MAX_INVERTED_LISTS, by_size, by_sample))


@dataclass(frozen=True)
class DensePlan:
    kind: str
    lists: int = 0
    pq_bytes: int = 0
    training_vectors: int = 0
    reason: str | None = None


def plan_dense_index(tokens: int, hidden_size: int, kind: str = "auto", *,
                     max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
                     max_train_mib: float = DEFAULT_MAX_TRAIN_MIB) -> DensePlan:
    """Choose the dense index for a corpus of ``tokens`` token states."""
    if kind not in DENSE_KINDS:
        raise DenseIndexError(f"unknown dense index kind {kind!r}; use one of {DENSE_KINDS}")
    if kind == "flat":
        return DensePlan("flat", reason="requested")
    size = training_sample_size(tokens, hidden_size, max_train_vectors, max_train_mib)
    if size < MIN_IVF_TOKENS:
        reason = (f"{tokens:,} token states (training sample {size:,}) are fewer than the "
                  f"{MIN_IVF_TOKENS:,} that ivfpq's codebooks need")
        if kind == "ivfpq":
            logger.warning("%s; building an exact flat index instead", reason)
        return DensePlan("flat", reason=reason)
    # One byte per 8 dimensions, or the next smaller divisor of the hidden size.
    pq_bytes = max(1, hidden_size // 8)
    while hidden_size % pq_bytes:
        pq_bytes -= 1
    return DensePlan("ivfpq", inverted_lists(tokens, size), pq_bytes, size)


def build_dense_index(store: Any, path: Path, kind: str = "auto", *,
                      max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
                      max_train_mib: float = DEFAULT_MAX_TRAIN_MIB, seed: int = 0,
                      show_progress: bool = False) -> dict[str, Any]:
    """Build the dense index of every token state of ``store`` and write it at ``path``.

    Rows are read from the store (decoded when it holds codes), normalised and added in blocks,
    so memory holds one block and the training sample besides the index itself.

    Returns the manifest's record of the index.
    """
    import faiss
    from tqdm.auto import tqdm

    started = time.perf_counter()
    tokens, hidden = store.num_tokens, store.hidden_size
    plan = plan_dense_index(tokens, hidden, kind, max_train_vectors=max_train_vectors,
                            max_train_mib=max_train_mib)
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(hidden)
    else:
        quantizer = faiss.IndexFlatIP(hidden)
        index = faiss.IndexIVFPQ(quantizer, hidden, plan.lists, plan.pq_bytes, 8,
                                 faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.niter = 20
        index.pq.cp.seed = seed + 1
        source = _DecodedRows(store)
        sample = sample_rows(source, tokens, plan.training_vectors, seed)
        faiss.normalize_L2(sample)
        logger.info("training the dense index (%d lists) on %d of %d token states",
                    plan.lists, len(sample), tokens)
        index.train(sample)
        del sample
    trained = time.perf_counter()
    with tqdm(total=tokens, unit="token", desc="dense index", disable=not show_progress,
              dynamic_ncols=True) as bar:
        for start in range(0, tokens, _ADD_ROWS):
            block = store.rows(start, min(start + _ADD_ROWS, tokens)).astype(np.float32)
            faiss.normalize_L2(block)
            index.add(block)
            bar.update(len(block))
    write_faiss_index(faiss, index, path)
    return {
        "path": path.name,
        "kind": plan.kind,
        "requested": kind,
        "reason": plan.reason,
        "metric": "inner product of L2-normalised states",
        "query_tokens": "without [CLS] and [SEP]",
        "tokens": int(index.ntotal),
        "inverted_lists": plan.lists or None,
        "pq_bytes": plan.pq_bytes or None,
        "training_vectors": plan.training_vectors or None,
        "seed": seed,
        "training_seconds": round(trained - started, 3),
        "adding_seconds": round(time.perf_counter() - trained, 3),
        "built_from": store.encoding,
    }


class _DecodedRows:
    """Row access with fancy indexing over a store, decoding codes when the store contains them."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.shape = (store.num_tokens, store.hidden_size)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        stored = self._store.stored_rows_source()[rows]
        if self._store.codec is None:
            return stored
        return self._store.codec.decode(np.asarray(stored))


def read_mapped(faiss: Any, path: Path, kind: str) -> Any:
    """Read a dense index with its vectors memory-mapped rather than loaded.

    FAISS maps an IVF index's inverted lists with ``IO_FLAG_MMAP``, and a flat index's vectors
    with ``IO_FLAG_MMAP_IFC`` (FAISS 1.8 and later; older versions load them).
    """
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    if kind == "flat":
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | faiss.IO_FLAG_READ_ONLY
    return faiss.read_index(str(path), flags)


class DenseFirstStage:
    """Search a dense index; rows it returns are documents of the state store.

    The FAISS index is read with memory mapping, so opening it does not load the vectors into
    memory. Search parameters are passed per call; the index itself is never changed.
    """

    def __init__(self, index: Any, offsets: np.ndarray, record: dict[str, Any]) -> None:
        self._index = index
        self._offsets = offsets
        self.record = record

    @classmethod
    def load(cls, path: Path, offsets: np.ndarray, record: dict[str, Any]) -> DenseFirstStage:
        import faiss

        if not path.is_file():
            raise DenseIndexError(f"dense index {path} is missing; rebuild the index with --dense")
        index = read_mapped(faiss, path, record.get("kind", "ivfpq"))
        if index.ntotal != offsets[-1]:
            raise DenseIndexError(f"dense index {path} holds {index.ntotal} token states but the "
                                  f"store holds {offsets[-1]}; rebuild the index")
        return cls(index, offsets, record)

    @property
    def is_exact(self) -> bool:
        return self.record.get("kind") == "flat"

    def search_tokens(self, vectors: np.ndarray, k: int,
                      nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest stored tokens of normalised query vectors: (similarities, rows), each (n, k).

        Missing neighbours (fewer than ``k`` reachable tokens) have row -1.
        """
        import faiss

        k = max(1, min(k, int(self._index.ntotal)))
        if self.is_exact:
            return self._index.search(vectors, k)
        nprobe = DEFAULT_NPROBE if nprobe is None else nprobe
        if nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, got {nprobe}")
        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self._index.nlist))
        return self._index.search(vectors, k, params=params)

    def retrieve(self, query_states: np.ndarray, candidates: int, *, nprobe: int | None = None,
                 token_candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (document rows, scores) of the best ``candidates`` documents, best first.

        ``query_states`` are the (length, hidden) lower-layer states of the query,
        ``[CLS]`` first and ``[SEP]`` last, without padding. ``token_candidates`` defaults to
        256 or ``candidates``, whichever is larger. Equal scores are ordered by ascending
        document row.
        """
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        if token_candidates is None:
            token_candidates = max(DEFAULT_TOKEN_CANDIDATES, candidates)
        if token_candidates < 1:
            raise ValueError(f"token_candidates must be at least 1, got {token_candidates}")
        vectors = query_token_vectors(query_states)
        if len(vectors) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        similarities, rows = self.search_tokens(vectors, token_candidates, nprobe)
        documents, scores = aggregate_token_matches(similarities, rows, self._offsets)
        order = np.lexsort((documents, -scores))[:candidates]
        return documents[order], scores[order]


def query_token_vectors(query_states: np.ndarray) -> np.ndarray:
    """Return the query's token states without ``[CLS]`` and ``[SEP]``, L2-normalised, as
    float32."""
    vectors = np.ascontiguousarray(query_states[1:-1], dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def aggregate_token_matches(similarities: np.ndarray, rows: np.ndarray,
                            offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score documents from the token neighbours of each query token.

    ``similarities`` and ``rows`` are (query tokens, k); row -1 marks no neighbour. A document's
    score is the sum over query tokens of the best similarity among that token's neighbours in
    the document. Returns (document rows, scores), documents in ascending order.
    """
    tokens, k = rows.shape
    valid = rows >= 0
    token_of = np.repeat(np.arange(tokens, dtype=np.int64), k).reshape(tokens, k)[valid]
    document_of = np.searchsorted(offsets, rows[valid], side="right") - 1
    similarity = similarities[valid].astype(np.float64)
    if len(similarity) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    # Best neighbour per (document, query token): sort by that pair, then by descending
    # similarity, and keep the first entry of each pair.
    order = np.lexsort((-similarity, token_of, document_of))
    document_of, token_of, similarity = document_of[order], token_of[order], similarity[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (document_of[1:] != document_of[:-1]) | (token_of[1:] != token_of[:-1])
    documents, inverse = np.unique(document_of[first], return_inverse=True)
    scores = np.bincount(inverse, weights=similarity[first], minlength=len(documents))
    return documents.astype(np.int64), scores.astype(np.float32)


def maxsim_scores(query_states: np.ndarray, document_states: list[np.ndarray]) -> np.ndarray:
    """Exact late-interaction scores: per document, the sum over query tokens (without
    ``[CLS]`` and ``[SEP]``) of the best cosine with any of the document's token states."""
    vectors = query_token_vectors(query_states)
    scores = np.zeros(len(document_states), dtype=np.float32)
    for position, states in enumerate(document_states):
        states = states.astype(np.float32)
        states /= np.maximum(np.linalg.norm(states, axis=1, keepdims=True), 1e-12)
        scores[position] = (vectors @ states.T).max(axis=1).sum() if len(vectors) else 0.0
    return scores


def reciprocal_rank_fusion(rankings: list[np.ndarray], depth: int,
                           k: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Fuse rankings of document rows by reciprocal rank fusion.

    Reference: G. V. Cormack, C. L. A. Clarke and S. Büttcher, "Reciprocal rank fusion
    outperforms Condorcet and individual rank learning methods", SIGIR 2009.

    A document's score is the sum of ``1 / (k + rank)`` over the rankings that contain it, with
    ranks from 1. Returns the best ``depth`` (rows, scores), equal scores by ascending row.
    """
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, row in enumerate(ranking.tolist(), start=1):
            fused[row] = fused.get(row, 0.0) + 1.0 / (k + rank)
    if not fused:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    rows = np.fromiter(fused.keys(), dtype=np.int64, count=len(fused))
    scores = np.fromiter(fused.values(), dtype=np.float64, count=len(fused))
    order = np.lexsort((rows, -scores))[:depth]
    return rows[order], scores[order].astype(np.float32)
