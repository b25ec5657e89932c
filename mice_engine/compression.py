"""Compressed state storage: FAISS codecs that turn float16 token states into short byte codes.

Codecs, by name (``--compression``):

- ``float16``: the states as computed, 2 bytes per dimension (768 bytes per token at hidden size
  384). No codec file.
- ``int8`` and ``int4``: FAISS scalar quantisation (``ScalarQuantizer`` ``QT_8bit`` and
  ``QT_4bit``). Each dimension gets its own range, learned as the minimum and maximum of that
  dimension over the training sample, split into 256 or 16 levels. Codes take ``hidden`` or
  ``hidden / 2`` bytes per token (384 or 192 at hidden size 384).
- ``ivfpqM`` (for example ``ivfpq64``): FAISS ``IndexIVFPQ`` used as a codec, in the way
  ColBERTv2 and PLAID store their vectors. A coarse k-means codebook assigns each state to its
  nearest centroid, and a product quantiser of ``M`` sub-quantisers with 256 centroids each codes
  the residual (the state minus its centroid), one byte per sub-quantiser. A code is the
  centroid's list number (1 byte up to 256 centroids, 2 up to 65,536) followed by the ``M`` bytes
  of the residual: 66 bytes per token for ``ivfpq64`` with more than 256 centroids. ``M`` must
  divide the hidden size.

Every codec except ``float16`` is a FAISS index object used only through ``sa_encode`` and
``sa_decode`` (FAISS's standalone codec interface) and saved with ``faiss.write_index``. The
file holds only the trained parameters (ranges, centroids, codebooks), never the codes.

Training reads a seeded random sample of the states, bounded both in vectors and in bytes. A
corpus too small for a codec's codebooks falls back to ``int8``, logs a warning and records the
fallback (see :func:`plan_codec`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CODEC_FILE = "codec.faiss"
CODEC_NAMES = ("float16", "int8", "int4", "ivfpqM")
DEFAULT_MAX_TRAIN_VECTORS = 131_072
DEFAULT_MAX_TRAIN_MIB = 256
# k-means in FAISS wants at least 39 training vectors per centroid and warns below that.
MIN_POINTS_PER_CENTROID = 39
# A product quantiser has 256 centroids per sub-quantiser, so it needs at least 39 * 256
# training vectors to train as FAISS recommends.
MIN_PQ_TRAINING_VECTORS = MIN_POINTS_PER_CENTROID * 256
# The coarse codebook of ivfpqM: the largest power of two at most sqrt(tokens), within these
# bounds (see coarse_centroids).
MAX_COARSE_CENTROIDS = 4096
MIN_COARSE_CENTROIDS = 16
_PQ_NAME = re.compile(r"ivfpq(\d+)")


class CodecError(ValueError):
    """A compression setting that is unknown or that the states cannot use."""


@dataclass(frozen=True)
class CodecPlan:
    """Codec that a name resolves to for a given corpus, with the reason of any fallback."""

    requested: str
    name: str
    hidden_size: int
    pq_bytes: int = 0
    coarse_centroids: int = 0
    fallback_reason: str | None = None

    @property
    def is_float16(self) -> bool:
        return self.name == "float16"


def parse_codec_name(name: str, hidden_size: int) -> str:
    """Check that ``name`` is a known codec that fits ``hidden_size``; return it normalised.

    Raises:
        CodecError: the name is unknown, or ``ivfpqM`` has an ``M`` that does not divide the
            hidden size.
    """
    normalised = name.strip().lower()
    if normalised in ("float16", "int8", "int4"):
        if normalised == "int4" and hidden_size % 2:
            raise CodecError(f"int4 packs two dimensions per byte and needs an even hidden size, "
                             f"got {hidden_size}; use int8")
        return normalised
    match = _PQ_NAME.fullmatch(normalised)
    if match is None:
        raise CodecError(f"unknown compression {name!r}; use float16, int8, int4 or ivfpqM with "
                         "M bytes per residual code (for example ivfpq64)")
    pq_bytes = int(match.group(1))
    if pq_bytes < 1 or hidden_size % pq_bytes:
        divisors = [m for m in (8, 16, 24, 32, 48, 64, 96, 128) if m <= hidden_size
                    and hidden_size % m == 0]
        raise CodecError(f"{name}: M = {pq_bytes} must divide the hidden size {hidden_size}; "
                         f"choose M among {divisors or [1]}")
    return normalised


def coarse_centroids(tokens: int, training_vectors: int) -> int:
    """Number of coarse centroids of an ``ivfpqM`` codec.

    The largest power of two at most ``sqrt(tokens)``, between 16 and 4,096, and small enough
    that every centroid has 39 training vectors. For 297,346 tokens (Cranfield) this is 512;
    for 1,693,234 (SciFact), 1,024.
    """
    by_size = 2 ** int(math.log2(max(math.sqrt(tokens), 1)))
    by_sample = 2 ** int(math.log2(max(training_vectors // MIN_POINTS_PER_CENTROID, 1)))
    return max(1, min(MAX_COARSE_CENTROIDS, by_size, by_sample))


def training_sample_size(tokens: int, hidden_size: int, max_vectors: int, max_mib: float) -> int:
    """Vectors in the training sample: all tokens, at most ``max_vectors`` and ``max_mib`` MiB of
    float32."""
    by_bytes = int(max_mib * 2**20) // (4 * hidden_size)
    return max(1, min(tokens, max_vectors, by_bytes))


def plan_codec(name: str, tokens: int, hidden_size: int, *,
               max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
               max_train_mib: float = DEFAULT_MAX_TRAIN_MIB) -> CodecPlan:
    """Resolve a codec name for a corpus of ``tokens`` states, with the fallback for tiny corpora.

    ``ivfpqM`` needs :data:`MIN_PQ_TRAINING_VECTORS` training vectors and at least 16 coarse
    centroids. A smaller corpus or sample falls back to ``int8``, and the plan records the
    reason.
    """
    requested = parse_codec_name(name, hidden_size)
    if not requested.startswith("ivfpq"):
        return CodecPlan(requested, requested, hidden_size)
    sample = training_sample_size(tokens, hidden_size, max_train_vectors, max_train_mib)
    centroids = coarse_centroids(tokens, sample)
    if sample < MIN_PQ_TRAINING_VECTORS or centroids < MIN_COARSE_CENTROIDS:
        reason = (f"{requested} needs at least {MIN_PQ_TRAINING_VECTORS:,} training vectors and "
                  f"{MIN_COARSE_CENTROIDS} coarse centroids, but the corpus has {tokens:,} "
                  f"token states and the training sample {sample:,}")
        return CodecPlan(requested, "int8", hidden_size, fallback_reason=reason)
    return CodecPlan(requested, requested, hidden_size,
                     pq_bytes=int(requested.removeprefix("ivfpq")), coarse_centroids=centroids)


class StateCodec:
    """A trained FAISS codec between float states (rows of ``dimension``) and uint8 codes."""

    def __init__(self, index: Any, name: str) -> None:
        self._index = index
        self.name = name

    @property
    def dimension(self) -> int:
        return int(self._index.d)

    @property
    def code_size(self) -> int:
        """Bytes per coded state."""
        return int(self._index.sa_code_size())

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """(n, dimension) float rows to (n, code_size) uint8 codes."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        return self._index.sa_encode(rows)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, code_size) uint8 codes to (n, dimension) float32 rows."""
        if len(codes) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return self._index.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8))

    def save(self, path: Path) -> None:
        """Write the codec to a temporary name, sync it and rename it to ``path``."""
        import faiss

        write_faiss_index(faiss, self._index, path)

    @classmethod
    def load(cls, path: Path, name: str) -> StateCodec:
        import faiss

        if not path.is_file():
            raise CodecError(f"codec file {path} is missing; the index is incomplete, rebuild it")
        return cls(faiss.read_index(str(path)), name)


def write_faiss_index(faiss: Any, index: Any, path: Path) -> None:
    """Write a FAISS index atomically: temporary name, fsync, rename."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        faiss.write_index(index, str(temporary))
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def file_record(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, as the manifest records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def train_codec(plan: CodecPlan, sample: np.ndarray, seed: int = 0) -> StateCodec:
    """Train the codec of ``plan`` on ``sample``, (n, hidden) float32 rows."""
    import faiss

    if plan.is_float16:
        raise CodecError("float16 states need no codec")
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    hidden = plan.hidden_size
    if plan.name in ("int8", "int4"):
        kind = (faiss.ScalarQuantizer.QT_8bit if plan.name == "int8"
                else faiss.ScalarQuantizer.QT_4bit)
        index = faiss.IndexScalarQuantizer(hidden, kind, faiss.METRIC_L2)
        index.train(sample)
        return StateCodec(index, plan.name)
    quantizer = faiss.IndexFlatL2(hidden)
    index = faiss.IndexIVFPQ(quantizer, hidden, plan.coarse_centroids, plan.pq_bytes, 8)
    index.cp.seed = seed
    index.cp.niter = 20
    index.pq.cp.seed = seed + 1
    index.train(sample)
    return StateCodec(index, plan.name)


def sample_rows(rows: Any, total: int, size: int, seed: int) -> np.ndarray:
    """Draw a seeded random sample of ``size`` rows of ``rows`` (an array or memory map), as
    float32.

    Rows are read in ascending order, so that a memory-mapped file is read front to back.
    """
    generator = np.random.default_rng(seed)
    if size >= total:
        chosen = np.arange(total)
    else:
        chosen = np.sort(generator.choice(total, size=size, replace=False))
    sample = np.empty((len(chosen), rows.shape[1]), dtype=np.float32)
    step = 1 << 14
    for start in range(0, len(chosen), step):
        sample[start : start + step] = rows[chosen[start : start + step]]
    return sample


def reconstruction_error(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """Relative squared error and mean cosine similarity of decoded rows against the originals."""
    original = original.astype(np.float32)
    decoded = decoded.astype(np.float32)
    squared = float(((decoded - original) ** 2).sum() / max((original**2).sum(), 1e-30))
    norms = np.linalg.norm(original, axis=1) * np.linalg.norm(decoded, axis=1)
    cosine = (original * decoded).sum(axis=1) / np.maximum(norms, 1e-30)
    return {"relative_squared_error": squared, "mean_cosine": float(cosine.mean()),
            "min_cosine": float(cosine.min())}


def compress_states(source: Path, output: Path, name: str, *, keep_float16: bool = False,
                    max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS,
                    max_train_mib: float = DEFAULT_MAX_TRAIN_MIB,
                    seed: int = 0) -> dict[str, Any]:
    """Train the codec ``name`` on the float16 store ``source`` and write the coded store.

    The codec file is written beside ``output`` as :data:`CODEC_FILE`. ``output`` may be
    ``source``. For ``float16`` nothing is written.

    Returns the manifest's record of the codec: what was requested and used (with the reason of
    a fallback), code size, training sample, timings, reconstruction error on a sample and the
    SHA-256 of the codes.
    """
    import time

    from .store import StateStore, StoreError, write_compressed_store

    started = time.perf_counter()
    with StateStore(source, prefer_float16=True) as store:
        if store.codec is not None:
            raise StoreError(f"{source} holds {store.codec.name} codes, not float16 states; "
                             "compress from an index that holds float16 states")
        tokens, hidden = store.num_tokens, store.hidden_size
        plan = plan_codec(name, tokens, hidden, max_train_vectors=max_train_vectors,
                          max_train_mib=max_train_mib)
        if plan.fallback_reason:
            logger.warning("%s; storing int8 codes instead", plan.fallback_reason)
        record: dict[str, Any] = {"name": plan.name, "requested": plan.requested,
                                  "fallback_reason": plan.fallback_reason}
        if plan.is_float16:
            written = (write_compressed_store(source, output, None, "")
                       if Path(source).resolve() != Path(output).resolve() else None)
            return {**record, "code_bytes": 2 * hidden,
                    "float16_sha256": written["float16_sha256"] if written else None}
        size = training_sample_size(tokens, hidden, max_train_vectors, max_train_mib)
        sample = sample_rows(store.stored_rows_source(), tokens, size, seed)
        check = sample_rows(store.stored_rows_source(), tokens, min(tokens, 4096), seed + 1)
    logger.info("training the %s codec on %d of %d token states", plan.name, len(sample), tokens)
    codec = train_codec(plan, sample, seed)
    del sample
    trained = time.perf_counter()
    error = reconstruction_error(check, codec.decode(codec.encode(check)))
    codec.save(output.parent / CODEC_FILE)
    written = write_compressed_store(source, output, codec, CODEC_FILE,
                                     keep_float16=keep_float16)
    record.update({
        "file": CODEC_FILE,
        "code_bytes": codec.code_size,
        "pq_bytes": plan.pq_bytes or None,
        "coarse_centroids": plan.coarse_centroids or None,
        "training_vectors": size,
        "max_train_vectors": max_train_vectors,
        "max_train_mib": max_train_mib,
        "seed": seed,
        "training_seconds": round(trained - started, 3),
        "encoding_seconds": round(time.perf_counter() - trained, 3),
        "reconstruction": {key: float(f"{value:.4g}") for key, value in error.items()},
        "reconstruction_sample": len(check),
        "codes_sha256": written["codes_sha256"],
        "float16_sha256": written["float16_sha256"],
        "float16_kept": keep_float16,
    })
    return record
