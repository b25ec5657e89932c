"""Storage stages that run on a float16 state store: the dense index and the codec.

``mice index`` runs them on the store it has just merged, and ``mice compress`` on the store of
an existing index, through the same function (:func:`write_storage`). So a compressed index, or
one with a dense index, can be derived from a float16 index without encoding documents again.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .compression import (
    CODEC_FILE,
    DEFAULT_MAX_TRAIN_MIB,
    DEFAULT_MAX_TRAIN_VECTORS,
    compress_states,
    file_record,
    parse_codec_name,
)
from .dense import DENSE_FILE, DENSE_KINDS, DenseIndexError, build_dense_index
from .store import STATES_FILE, StateStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageOptions:
    """How an index stores its states and whether it has a dense first stage.

    Args:
        compression: codec name (see :mod:`mice_engine.compression`): ``float16``, ``int8``,
            ``int4`` or ``ivfpqM``.
        keep_float16: keep the float16 states beside the codes. Search still reads the codes;
            the float16 states stay available to derive other codecs.
        dense: build the dense index (``True``) or not (``False``). ``None`` builds none at
            indexing time, and :func:`derive_index` copies the source index's dense index when
            it has one.
        dense_kind: ``auto``, ``ivfpq`` or ``flat`` (see :mod:`mice_engine.dense`).
        max_train_vectors: maximum number of vectors in a training sample.
        max_train_mib: maximum size of a training sample, in MiB of float32.
        seed: seed of the training samples and of FAISS's k-means.
    """

    compression: str = "float16"
    keep_float16: bool = False
    dense: bool | None = None
    dense_kind: str = "auto"
    max_train_vectors: int = DEFAULT_MAX_TRAIN_VECTORS
    max_train_mib: float = DEFAULT_MAX_TRAIN_MIB
    seed: int = 0

    def check(self, hidden_size: int) -> None:
        """Raise ValueError for a setting the states cannot use, before any work is done."""
        parse_codec_name(self.compression, hidden_size)
        if self.dense_kind not in DENSE_KINDS:
            raise DenseIndexError(f"unknown dense index kind {self.dense_kind!r}; use one of "
                                  f"{', '.join(DENSE_KINDS)}")
        if self.max_train_vectors < 1 or self.max_train_mib <= 0:
            raise ValueError(f"the training sample limits must be positive, got "
                             f"{self.max_train_vectors} vectors and {self.max_train_mib} MiB")
        if self.keep_float16 and self.compression == "float16":
            raise ValueError("keep_float16 applies to compressed states only; drop it or choose "
                             "a codec")


def remove_storage_files(folder: Path) -> None:
    """Remove the files that :func:`write_storage` writes, and their temporary names."""
    for name in (CODEC_FILE, DENSE_FILE):
        for path in (folder / name, folder / f"{name}.tmp"):
            path.unlink(missing_ok=True)
    (folder / STATES_FILE).with_suffix(".h5.tmp").unlink(missing_ok=True)


def write_storage(source_states: Path, folder: Path, options: StorageOptions, *,
                  dense_source: Path | None = None,
                  show_progress: bool = False) -> dict[str, Any]:
    """Write ``folder``'s state store, codec and dense index from the float16 store
    ``source_states``, which may be ``folder``'s own ``states.h5``.

    The dense index is built from the float16 states before they are coded, or copied from
    ``dense_source`` when that is given. Every file is written under a temporary name, synced
    and renamed.

    Returns ``{"codec": ..., "dense": ... or None, "files": {name: {bytes, sha256}}}`` for the
    manifest.
    """
    dense_record = None
    if dense_source is not None:
        shutil.copyfile(dense_source, folder / f"{DENSE_FILE}.tmp")
        with open(folder / f"{DENSE_FILE}.tmp", "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(folder / f"{DENSE_FILE}.tmp", folder / DENSE_FILE)
    elif options.dense:
        with StateStore(source_states, prefer_float16=True) as store:
            dense_record = build_dense_index(
                store, folder / DENSE_FILE, options.dense_kind,
                max_train_vectors=options.max_train_vectors,
                max_train_mib=options.max_train_mib, seed=options.seed,
                show_progress=show_progress)
    codec_record = compress_states(source_states, folder / STATES_FILE, options.compression,
                                   keep_float16=options.keep_float16,
                                   max_train_vectors=options.max_train_vectors,
                                   max_train_mib=options.max_train_mib, seed=options.seed)
    files = {}
    if codec_record["name"] != "float16":
        files[CODEC_FILE] = file_record(folder / CODEC_FILE)
    if (folder / DENSE_FILE).is_file() and (dense_source is not None or options.dense):
        files[DENSE_FILE] = file_record(folder / DENSE_FILE)
    return {"codec": codec_record, "dense": dense_record, "files": files}


def states_record(folder: Path, codec: dict[str, Any], tokens: int, hidden_size: int,
                  float16_sha256: str) -> dict[str, Any]:
    """The manifest's ``states`` entry for ``folder``'s store.

    ``sha256`` is the hash of the rows that search reads: the float16 states, or the codes.
    ``bytes_per_token`` counts every stored byte of a token, the float16 states kept beside
    codes included.
    """
    size = (folder / STATES_FILE).stat().st_size
    compressed = codec["name"] != "float16"
    float16_kept = (not compressed) or bool(codec.get("float16_kept"))
    return {
        "file": STATES_FILE,
        "dtype": "uint8" if compressed else "float16",
        "compression": codec["name"] if compressed else "none",
        "codec": codec,
        "hidden_size": hidden_size,
        "sha256": codec["codes_sha256"] if compressed else float16_sha256,
        "float16_sha256": float16_sha256,
        "float16_kept": float16_kept,
        "bytes": size,
        "code_bytes_per_token": codec["code_bytes"],
        "bytes_per_token": codec["code_bytes"] + (2 * hidden_size if compressed and float16_kept
                                                  else 0),
        "file_bytes_per_token": round(size / tokens, 2),
    }


def _content_checksums(staging: Path, source: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Compute the content checksums of the store just written in ``staging``, and raise if
    they differ from those of the ``source`` index it was copied from."""
    import h5py

    from .indexing import MiceIndexError
    from .store import FIELD_NAMES, content_checksums

    with h5py.File(staging / STATES_FILE, "r") as handle:
        checksums = content_checksums(handle)
    expected = manifest.get("content_sha256")
    if expected is None:
        logger.info("%s has no content checksum; recording the checksum of its current ids, "
                    "titles and texts", source)
        return checksums
    changed = [label for name, label in FIELD_NAMES.items() if checksums[name] != expected.get(name)]
    if changed:
        raise MiceIndexError(
            f"the {' and '.join(changed)} of {source} differ from its manifest's content checksum: "
            "the source index was modified or corrupted after its build. Rebuild it with "
            f"`mice index SOURCE --output {source} --overwrite`, then derive from it again"
        )
    return checksums


def derive_index(source: str | os.PathLike, output: str | os.PathLike, options: StorageOptions,
                 *, mode: str = "create", show_progress: bool = True) -> dict[str, Any]:
    """Write a new index at ``output`` from the complete index ``source``, without encoding.

    The new index shares the source's documents, model and BM25 index. Its states are coded
    with ``options.compression`` from the source's float16 states, and its dense index is built
    (``options.dense``), copied from the source (``None``) or left out (``False``). The content
    checksum of the ids, titles and texts is recomputed from the new store and must equal the
    source's, when the source's manifest has one.

    Args:
        mode: ``"create"`` (``output`` must be new or empty) or ``"overwrite"`` (replace the
            index at ``output`` once the new one is complete).

    Returns:
        The new index's manifest.

    Raises:
        MiceIndexError: ``output`` cannot be written in ``mode``, or the source's ids, titles or
            texts differ from its manifest's content checksum.
    """
    from . import indexing
    from .first_stage import BM25_DIR

    source = Path(source).resolve()
    output = Path(output).resolve()
    manifest = indexing.read_manifest(source)
    if mode not in ("create", "overwrite"):
        raise ValueError(f"mode must be create or overwrite, got {mode!r}")
    if output == source or source in output.parents:
        raise indexing.MiceIndexError(f"the derived index {output} must be outside the source "
                                      f"index {source}; choose another --output")
    options.check(manifest["states"]["hidden_size"])
    indexing.check_output_folder(output, mode)
    source_dense = manifest["first_stage"].get("dense")
    if options.dense is None and source_dense is not None:
        dense_source = source / source_dense["path"]
    else:
        dense_source = None

    staging = output.with_name(f".{output.name}.deriving")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        shutil.copytree(source / BM25_DIR, staging / BM25_DIR)
        parts = write_storage(source / manifest["states"]["file"], staging, options,
                              dense_source=dense_source, show_progress=show_progress)
        derived = copy.deepcopy(manifest)
        derived["format_version"] = indexing.INDEX_FORMAT_VERSION
        derived["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        float16_sha256 = (parts["codec"].get("float16_sha256")
                          or manifest["states"].get("float16_sha256")
                          or manifest["states"]["sha256"])
        derived["states"] = states_record(staging, parts["codec"], manifest["counts"]["tokens"],
                                          manifest["states"]["hidden_size"], float16_sha256)
        derived["content_sha256"] = _content_checksums(staging, source, manifest)
        derived["first_stage"].pop("dense", None)
        if parts["dense"] is not None:
            derived["first_stage"]["dense"] = parts["dense"]
        elif dense_source is not None:
            derived["first_stage"]["dense"] = source_dense
        derived["files"] = parts["files"]
        derived["derived_from"] = {"index": str(source), "created": manifest.get("created"),
                                   "states_sha256": manifest["states"]["sha256"],
                                   "options": asdict(options)}
        derived["versions"] = indexing.library_versions()
        derived["bytes"] = indexing._folder_bytes(staging)
        indexing._write_json_atomic(staging / indexing.MANIFEST_FILE, derived)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    indexing._swap_in(staging, output)
    return derived
