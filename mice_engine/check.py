"""Verification of an index folder against its manifest: ``mice check``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .first_stage import BM25_DIR
from .indexing import MiceIndexError, read_manifest

# Rows hashed per step: bounds memory while the states are read (3 MiB at hidden 384).
_HASH_ROWS = 1 << 12


@dataclass
class CheckReport:
    """The outcome of :func:`check_index`. Problems make the index fail the check. Notes are
    limits of the check itself, such as a manifest without a content checksum, and do not."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_index(folder: str | os.PathLike, verify_checksum: bool = True) -> CheckReport:
    """Verify an index: manifest, store layout, alignment of ids, states and texts, and the
    content checksum of the ids, titles and texts. Then verify the states' checksum, the
    finiteness of every state (decoded, for a store of codes) and the BM25 document count. Last,
    verify the FAISS files (codec and dense index): size, SHA-256 and agreement with the store.

    ``verify_checksum=False`` skips the SHA-256 of the states and of the FAISS files, which
    reads every stored row. The content checksum is always verified: the strings are read for
    the other checks anyway.

    Problems are collected, not raised, so that one run lists everything that is wrong.
    """
    import h5py

    report = CheckReport(Path(folder))
    try:
        manifest = read_manifest(folder)
    except (MiceIndexError, json.JSONDecodeError) as error:
        report.problems.append(str(error))
        return report
    report.checked.append("manifest")
    states_path = report.folder / manifest["states"]["file"]
    if not states_path.is_file():
        report.problems.append(f"state store {states_path} is missing")
        return report
    counts = manifest["counts"]
    try:
        with h5py.File(states_path, "r") as handle:
            _check_store(handle, manifest, report, verify_checksum)
    except OSError as error:
        report.problems.append(f"state store {states_path} cannot be read as HDF5: {error}")

    bm25_settings = report.folder / BM25_DIR / "mice_bm25.json"
    if not bm25_settings.is_file():
        report.problems.append(f"BM25 index {report.folder / BM25_DIR} is missing or incomplete")
    else:
        documents = json.loads(bm25_settings.read_text()).get("documents")
        if documents != counts["documents"]:
            report.problems.append(
                f"BM25 covers {documents} documents but the manifest lists {counts['documents']}"
            )
        report.checked.append("bm25")
    _check_files(report, manifest, verify_checksum)
    return report


def _check_files(report: CheckReport, manifest: dict, verify_checksum: bool) -> None:
    """Check the files the manifest lists (codec.faiss, dense.faiss) and load the FAISS ones."""
    from .compression import CODEC_FILE, file_record

    files = manifest.get("files", {})
    for name, expected in files.items():
        path = report.folder / name
        if not path.is_file():
            report.problems.append(f"{path} is listed in the manifest but missing")
            continue
        if path.stat().st_size != expected["bytes"]:
            report.problems.append(f"{path} has {path.stat().st_size} bytes but the manifest "
                                   f"lists {expected['bytes']}; rebuild the index")
        elif verify_checksum and file_record(path)["sha256"] != expected["sha256"]:
            report.problems.append(f"the SHA-256 of {path} differs from the manifest: the file "
                                   "was modified or corrupted after the build")
    if manifest["states"].get("compression", "none") != "none" and CODEC_FILE not in files:
        report.problems.append(f"the states are {manifest['states']['compression']} codes but the "
                               f"manifest lists no {CODEC_FILE}")
    dense = manifest["first_stage"].get("dense")
    if dense is not None:
        path = report.folder / dense["path"]
        if dense["path"] not in files:
            report.problems.append(f"the dense index {dense['path']} is not in the manifest's "
                                   "files")
        elif path.is_file():
            import faiss

            from .dense import read_mapped

            try:
                index = read_mapped(faiss, path, dense.get("kind", "ivfpq"))
            except RuntimeError as error:
                report.problems.append(f"the dense index {path} cannot be read by FAISS: {error}")
                return
            tokens = manifest["counts"]["tokens"]
            if index.ntotal != tokens or index.d != manifest["states"]["hidden_size"]:
                report.problems.append(
                    f"the dense index contains {index.ntotal} vectors of width {index.d}, but the "
                    f"store contains {tokens} token states of width "
                    f"{manifest['states']['hidden_size']}; rebuild the index")
    if files:
        report.checked.append("faiss files")


def _check_store(handle, manifest: dict, report: CheckReport, verify_checksum: bool) -> None:
    from .store import _STRING_FIELDS, CODES_DATASET, STATES_DATASET, _read_all_strings

    counts = manifest["counts"]
    compressed = CODES_DATASET in handle
    if compressed != (manifest["states"].get("compression", "none") != "none"):
        report.problems.append("the store and the manifest disagree on whether the states are "
                               "compressed; rebuild the index")
        return
    states = handle[CODES_DATASET] if compressed else handle[STATES_DATASET]
    offsets = handle["offsets"][()]
    documents = len(offsets) - 1
    if documents != counts["documents"]:
        report.problems.append(f"the store holds {documents} documents but the manifest lists "
                               f"{counts['documents']}")
    if states.shape[0] != counts["tokens"]:
        report.problems.append(f"the store holds {states.shape[0]} token states but the manifest "
                               f"lists {counts['tokens']}")
    width = (manifest["states"]["code_bytes_per_token"] if compressed
             else manifest["states"]["hidden_size"])
    if states.shape[1] != width:
        report.problems.append(f"stored rows have width {states.shape[1]} but the manifest lists "
                               f"{width}")
    if offsets[0] != 0 or offsets[-1] != states.shape[0] or np.any(np.diff(offsets) < 1):
        report.problems.append("document offsets are not increasing from 0 to the number of "
                               "token states: states and documents are misaligned")
    if "window_offsets" in handle:
        window_offsets = handle["window_offsets"][()]
        doc_windows = handle["doc_windows"][()]
        if (len(doc_windows) != len(offsets) or doc_windows[-1] != len(window_offsets) - 1
                or not np.array_equal(window_offsets[doc_windows], offsets)
                or np.any(np.diff(window_offsets) < 1)):
            report.problems.append("document windows do not partition the documents' rows")
    report.checked.append("offsets")

    for name in _STRING_FIELDS:
        try:
            values = _read_all_strings(handle[name])
        except (KeyError, UnicodeDecodeError) as error:
            report.problems.append(f"{name} cannot be read: {error}")
            continue
        if len(values) != documents:
            report.problems.append(f"{len(values)} {name} for {documents} documents")
        if name == "doc_ids" and len(set(values)) != len(values):
            report.problems.append(f"{len(values) - len(set(values))} document ids repeat")
    report.checked.append("ids and texts")
    _check_content(handle, manifest, report)

    codec = None
    if compressed:
        from .compression import CodecError, StateCodec

        attributes = states.attrs
        try:
            codec = StateCodec.load(report.folder / str(attributes["codec_file"]),
                                    str(attributes["codec"]))
        except (CodecError, KeyError, RuntimeError) as error:
            report.problems.append(f"the codec of the store cannot be loaded: {error}")
            return
        hidden = manifest["states"]["hidden_size"]
        if codec.code_size != states.shape[1] or codec.dimension != hidden:
            report.problems.append(f"the codec writes {codec.code_size}-byte codes of width "
                                   f"{codec.dimension}, but the store contains "
                                   f"{states.shape[1]}-byte codes and the manifest lists width "
                                   f"{hidden}")
            return
    digest = hashlib.sha256()
    non_finite = 0
    for start in range(0, states.shape[0], _HASH_ROWS):
        block = states[start : start + _HASH_ROWS]
        values = codec.decode(block) if codec is not None else block
        non_finite += int(np.count_nonzero(~np.isfinite(values)))
        if verify_checksum:
            digest.update(block.tobytes())
    if non_finite:
        report.problems.append(f"{non_finite} stored state values are NaN or infinite")
    report.checked.append("finite states")
    if verify_checksum:
        if digest.hexdigest() != manifest["states"]["sha256"]:
            report.problems.append("the states' SHA-256 differs from the manifest: the store was "
                                   "modified or corrupted after the build; rebuild with --overwrite")
        if compressed and STATES_DATASET in handle:
            float16_digest = hashlib.sha256()
            for start in range(0, handle[STATES_DATASET].shape[0], _HASH_ROWS):
                float16_digest.update(handle[STATES_DATASET][start : start + _HASH_ROWS].tobytes())
            if float16_digest.hexdigest() != manifest["states"].get("float16_sha256"):
                report.problems.append("the SHA-256 of the float16 states kept beside the codes "
                                       "differs from the manifest")
        report.checked.append("checksum")


def _check_content(handle, manifest: dict, report: CheckReport) -> None:
    """Compare the SHA-256 of the stored ids, titles and texts with the manifest's."""
    from .store import FIELD_NAMES, StoreError, content_checksums

    expected = manifest.get("content_sha256")
    if expected is None:
        report.notes.append(
            "the manifest has no content checksum (content_sha256), because a mice-engine "
            "version that did not record one wrote the index, so a change to the document ids, "
            "titles or texts cannot be detected. Rebuild the index with `mice index SOURCE "
            f"--output {report.folder} --overwrite` to add one"
        )
        return
    if not isinstance(expected, dict):
        report.problems.append(f"the manifest's content_sha256 is {expected!r}, not a record of "
                               "checksums per field; the manifest is damaged, rebuild the index")
        return
    try:
        actual = content_checksums(handle)
    except (KeyError, StoreError) as error:
        report.problems.append(f"the content checksum cannot be computed: {error}")
        return
    rebuild = f"rebuild the index with `mice index SOURCE --output {report.folder} --overwrite`"
    for name, label in FIELD_NAMES.items():
        if actual[name] != expected.get(name):
            report.problems.append(
                f"the stored {label} differ from the manifest's content checksum "
                f"(content_sha256.{name}): they were modified or corrupted after the build, so "
                f"search results may show the wrong {label}; {rebuild}"
            )
    report.checked.append("content checksum")
