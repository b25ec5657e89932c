"""The indexes of a suite: encoded once per model, then derived for each storage setting.

Every index a system reads comes from a chain of at most three steps:

1. the *encoded* index: every document through the model's lower layers, float16 states, BM25,
   no dense index (:func:`mice_engine.indexing.build_index`). Indexing is measured here.
2. with a dense or hybrid first stage, the same float16 states plus a dense index, derived from
   the encoded index without encoding again (:func:`mice_engine.storage.derive_index`);
3. with compressed states, the codes, derived from the index of step 2 (whose dense index it
   copies) or else of step 1.

Systems with the same chain share its indexes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .suite import BUILD_OPTIONS, SystemSpec

logger = logging.getLogger(__name__)

_DENSE_OPTIONS = ("dense_kind", "max_train_vectors", "max_train_mib", "seed")
_CODEC_OPTIONS = ("keep_float16", "max_train_vectors", "max_train_mib", "seed")


def index_chain(model_key: str, system: SystemSpec | None = None) -> list[dict[str, Any]]:
    """Keys of the indexes that ``system`` needs, from the encoded index to its own.

    ``None`` stands for a system that reads BM25 and nothing else of the index.
    """
    options = system.index_options if system else {}
    encoded = {"model": model_key, "build": {key: options[key] for key in BUILD_OPTIONS
                                             if key in options}}
    chain = [encoded]
    if system is not None and system.first_stage != "bm25":
        chain.append({**chain[-1], "dense": {key: options[key] for key in _DENSE_OPTIONS
                                             if key in options}})
    if system is not None and system.compression not in (None, "float16"):
        chain.append({**chain[-1], "codec": {"compression": system.compression,
                                             **{key: options[key] for key in _CODEC_OPTIONS
                                                if key in options}}})
    return chain


def index_name(collection: str, key: dict[str, Any]) -> str:
    """Folder name of an index: collection, model key and a hash of the whole key."""
    text = json.dumps(key, sort_keys=True)
    slug = "".join(character if character.isalnum() or character in "._-" else "-"
                   for character in key["model"])
    steps = "".join(f"-{step}" for step in ("dense", "codec") if step in key)
    if "codec" in key:
        steps = steps.replace("-codec", f"-{key['codec']['compression']}")
    return f"{collection}-{slug}{steps}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


class IndexSet:
    """Builds, derives or reuses the indexes of one collection, and keeps them open."""

    def __init__(self, *, suite_name: str, collection: Any, models: Any, index_dir: Path,
                 device: str, batch_size: int, reuse: bool, show_progress: bool) -> None:
        self.folder = Path(index_dir) / suite_name
        self.collection = collection
        self.models = models
        self.device = device
        self.batch_size = batch_size
        self.reuse = reuse
        self.show_progress = show_progress
        self.records: dict[str, dict[str, Any]] = {}
        self.opened: dict[str, Any] = {}

    def ensure(self, chain: list[dict[str, Any]]) -> str:
        """Make every index of ``chain`` exist; returns the name of the last one."""
        source = None
        for key in chain:
            name = index_name(self.collection.name, key)
            if name not in self.records:
                if source is None:
                    self.records[name] = self._encode(key, name)
                else:
                    self.records[name] = self._derive(key, name, source)
                from ..search import Index

                self.opened[name] = Index(self.folder / name)
            source = name
        return source

    def close(self) -> None:
        for index in self.opened.values():
            index.close()
        self.opened.clear()

    # ----------------------------------------------------------------------------------------
    def _encode(self, key: dict[str, Any], name: str) -> dict[str, Any]:
        from ..indexing import MANIFEST_FILE, build_index, read_manifest
        from .probes import PeakMemory

        path = self.folder / name
        model = self.models.mice(key["model"])
        memory = PeakMemory(self.device)
        manifest = None
        if self.reuse and (path / MANIFEST_FILE).is_file():
            manifest = read_manifest(path)
            # The states depend on the lower layers alone, so a model that differs only in its
            # interaction layers or head (trained from the same backbone) can reuse them.
            if not (manifest["model"]["encoder_sha256"] == model.weights_sha256(lower_only=True)
                    and manifest["source"] == _source_description(self.collection.source)
                    and manifest["build"]["batch_size"] == self.batch_size):
                logger.warning("index %s was built with other lower layers, source or batch "
                               "size; rebuilding it", path)
                manifest = None
        reused = manifest is not None
        if not reused:
            logger.info("indexing %s into %s", self.collection.name, path)
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = "overwrite" if path.exists() and any(path.iterdir()) else "create"
            with memory:
                manifest = build_index(self.collection.source, path, model=model,
                                       batch_size=self.batch_size, device=self.device,
                                       mode=mode, show_progress=self.show_progress,
                                       **key["build"])
        build = manifest["build"]
        tokens = manifest["counts"]["tokens"]
        record = _common_record(path, key, manifest, reused)
        record.update({
            "kind": "encoded",
            "build_seconds": build["seconds"], "encode_seconds": build["encode_seconds"],
            "documents_per_second": round(manifest["counts"]["documents"] / build["seconds"], 2),
            "tokens_per_second": round(tokens / build["seconds"], 1),
            "encode_documents_per_second": build["documents_per_second"],
            "encode_tokens_per_second": build["tokens_per_second"],
            # Forward passes alone, timed inside the build (absent from older manifests).
            "forward_seconds": build.get("forward_seconds"),
            "forward_tokens_per_second": build.get("forward_tokens_per_second"),
            "batch_size": build["batch_size"],
        })
        if not reused:
            record["memory"] = memory.record()
        return record

    def _derive(self, key: dict[str, Any], name: str, source: str) -> dict[str, Any]:
        from ..indexing import MANIFEST_FILE, read_manifest
        from ..storage import StorageOptions, derive_index
        from .probes import PeakMemory

        path = self.folder / name
        source_path = self.folder / source
        if "codec" in key:
            settings = dict(key["codec"])
            compression = settings.pop("compression")
            # The source contains the dense index when the chain has one; derive_index copies it.
            dense = None if "dense" in key else False
        else:
            settings, compression, dense = dict(key["dense"]), "float16", True
        options = StorageOptions(compression=compression, dense=dense, **settings)
        source_manifest = read_manifest(source_path)
        memory = PeakMemory(self.device)
        manifest = None
        if self.reuse and (path / MANIFEST_FILE).is_file():
            manifest = read_manifest(path)
            origin = manifest.get("derived_from", {})
            if not (origin.get("states_sha256") == source_manifest["states"]["sha256"]
                    and origin.get("options") == json.loads(json.dumps(asdict(options)))):
                logger.warning("index %s was derived from another index or with other "
                               "settings; deriving it again", path)
                manifest = None
        reused = manifest is not None
        seconds = None
        if not reused:
            logger.info("deriving %s from %s (%s)", name, source, options)
            mode = "overwrite" if path.exists() and any(path.iterdir()) else "create"
            tick = time.perf_counter()
            with memory:
                manifest = derive_index(source_path, path, options, mode=mode,
                                        show_progress=self.show_progress)
            seconds = round(time.perf_counter() - tick, 3)
        record = _common_record(path, key, manifest, reused)
        record.update({"kind": "derived", "derived_from": source, "derive_seconds": seconds,
                       "storage_options": asdict(options)})
        if not reused:
            record["memory"] = memory.record()
        return record


def _common_record(path: Path, key: dict[str, Any], manifest: dict[str, Any],
                   reused: bool) -> dict[str, Any]:
    """Counts, sizes and identities of an index, whatever made it."""
    from .probes import folder_bytes

    tokens = manifest["counts"]["tokens"]
    states = manifest["states"]
    index_bytes = folder_bytes(path)
    dense = manifest["first_stage"].get("dense")
    dense_file = path / dense["path"] if dense and "path" in dense else None
    return {
        "path": str(path), "key": key, "reused": reused, "measured_in_this_run": not reused,
        "documents": manifest["counts"]["documents"], "tokens": tokens,
        "truncated_documents": manifest["counts"]["truncated_documents"],
        "bytes": index_bytes,
        "bytes_per_token": round(index_bytes / tokens, 2),
        # Stored bytes of one token's states: float16, or codes (plus float16 when kept).
        "state_bytes_per_token": states["bytes_per_token"],
        "states_file_bytes": states["bytes"],
        "compression": states.get("compression"),
        "codec": states.get("codec"),
        "dense": dense,
        "bm25_bytes": folder_bytes(path / "bm25"),
        "dense_bytes": dense_file.stat().st_size if dense_file and dense_file.is_file() else 0,
        "text_bytes": _text_bytes(path / states["file"]),
        "model_sha256": manifest["model"]["sha256"],
        "states_sha256": states["sha256"],
    }


def system_index_bytes(system: SystemSpec, record: dict[str, Any]) -> tuple[int, str]:
    """Bytes on disk of what ``system`` reads from the index ``record``, and what they are."""
    if system.reranker == "mice":
        return record["bytes"], "whole MICE index (states, texts, first stages)"
    parts, names = 0, []
    if system.first_stage in ("bm25", "hybrid"):
        parts += record["bm25_bytes"]
        names.append("BM25 index")
    if system.first_stage in ("dense", "hybrid"):
        parts += record["dense_bytes"]
        names.append("dense index")
    if system.reranker == "cross-encoder":
        parts += record["text_bytes"]
        names.append("document texts")
    return parts, " and ".join(names)


def _source_description(source: str) -> str:
    from ..sources import open_documents

    return open_documents(source).description


def _text_bytes(states_file: Path) -> int:
    """Bytes of the ids, titles and texts inside a state store."""
    import h5py
    import numpy as np

    total = 0
    with h5py.File(states_file, "r") as handle:
        for name in ("doc_ids", "titles", "texts"):
            for part in ("data", "offsets"):
                dataset = handle[name][part]
                total += int(np.prod(dataset.shape)) * dataset.dtype.itemsize
    return total
