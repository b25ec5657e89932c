"""Building an index folder: lower-layer states of every document, ids, texts, BM25, manifest.

An index folder holds:

- ``states.h5``: the state store (see :mod:`mice_engine.store`);
- ``bm25/``: the BM25 first stage over the same documents in the same order;
- ``codec.faiss``: the codec of compressed states, when the index stores codes;
- ``dense.faiss``: the dense first stage's FAISS index, when the index has one;
- ``manifest.json``: written last, so a folder without it is an unfinished build;
- while a build runs: ``build.json`` (its settings, checked by ``--resume``) and ``shards/``.

``--overwrite`` builds the new index in a staging folder ``.NAME.building`` beside the index
``NAME`` and replaces the index only once the new one is complete. An interrupted rebuild stays
there, and ``--resume`` continues it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .encoding import ForwardTimer, encode_sequences, tokenize, tokenize_windows
from .first_stage import BM25_DIR, BM25FirstStage
from .model import MiceModel, load_model
from .sources import Document, SourceError, open_documents
from .storage import StorageOptions, remove_storage_files, states_record, write_storage
from .store import (SHARDS_DIR, STATES_FILE, StateStore, committed_shards, merge_shards,
                    read_shard_ids, shard_statistics, write_shard)

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
BUILD_FILE = "build.json"
INDEX_FORMAT = "mice-index"
# Version 2 added compressed stores (codes and codec.faiss), dense.faiss and the manifest's
# "files" entry. Version 1 indexes read as float16 indexes without a dense first stage.
# "content_sha256" was added later without a new version, because readers that do not know it
# can ignore it: an index without it loads and searches, and `mice check` notes its absence.
INDEX_FORMAT_VERSION = 2
MODES = ("create", "resume", "overwrite")
DUPLICATE_POLICIES = ("error", "first")
LONG_DOCUMENT_POLICIES = ("truncate", "windows")


class MiceIndexError(RuntimeError):
    """An index folder that cannot be built, resumed or opened as asked."""


class DiskFullError(MiceIndexError):
    """The disk filled up during a build; the committed shards are kept for ``--resume``."""


def resolve_device(device: str | None) -> str:
    """``None`` or ``"auto"`` picks CUDA when PyTorch finds a GPU, else the CPU."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise MiceIndexError(f"invalid device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MiceIndexError(f"device {device!r} was requested but PyTorch sees no CUDA GPU; "
                         "use --device cpu")
    return device


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "mice-engine": __version__}
    for package in ("torch", "transformers", "h5py", "numpy", "bm25s", "faiss-cpu", "faiss-gpu"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def model_record(model: MiceModel) -> dict[str, Any]:
    """What the manifest stores about the model that produced (and will score) the states."""
    return {
        "source": model.source,
        "name": model.config.name,
        "backbone": model.config.backbone,
        "merge_layer": model.config.merge_layer,
        "interaction_layers": model.config.interaction_layers,
        "query_max_length": model.config.query_max_length,
        "doc_max_length": model.config.doc_max_length,
        "hidden_size": model.hidden_size,
        "trained": model.config.trained,
        "head_seed": model.config.head_seed,
        "sha256": model.weights_sha256(),
        "encoder_sha256": model.weights_sha256(lower_only=True),
        "tokenizer": {
            "class": type(model.tokenizer).__name__,
            "vocab_size": model.tokenizer.vocab_size,
            "do_lower_case": getattr(model.tokenizer, "do_lower_case", None),
        },
    }


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read an index's manifest, or explain why the folder is no complete index."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if folder.exists() and not folder.is_dir():
        raise MiceIndexError(f"{folder} is a file, not an index folder")
    if not folder.is_dir():
        raise MiceIndexError(f"index {folder} does not exist; build it with `mice index SOURCE "
                         f"--output {folder}`")
    if not manifest.is_file():
        if (folder / BUILD_FILE).is_file():
            raise MiceIndexError(
                f"index {folder} is incomplete: its build was interrupted or is still running. "
                f"Continue it with `mice index SOURCE --output {folder} --resume`, or rebuild it "
                "with --overwrite"
            )
        raise MiceIndexError(f"{folder} is not a mice index: it has no {MANIFEST_FILE}")
    try:
        values = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MiceIndexError(f"{manifest} is not valid JSON ({error}); the index is damaged, "
                             "rebuild it with --overwrite") from None
    if values.get("format") != INDEX_FORMAT:
        raise MiceIndexError(f"{manifest} is not a mice index manifest")
    if values.get("format_version", 0) > INDEX_FORMAT_VERSION:
        raise MiceIndexError(
            f"index {folder} has format version {values['format_version']}, newer than this "
            f"mice-engine reads ({INDEX_FORMAT_VERSION}); upgrade mice-engine"
        )
    return values


def _write_json_atomic(path: Path, values: dict[str, Any]) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(values, indent=2, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _folder_bytes(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _chunks(documents: Iterator[Document], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def staging_folder(output: Path) -> Path:
    """Return the folder beside ``output`` in which ``--overwrite`` builds the new index."""
    return output.with_name(f".{output.name}.building")


def _retired_folder(output: Path) -> Path:
    """Return the folder where :func:`_swap_in` moves the old index while it moves the new
    one in."""
    return output.with_name(f".{output.name}.retired")


def _has_staged_rebuild(output: Path) -> bool:
    """Check whether an interrupted ``--overwrite`` left a rebuild of ``output`` to resume: a
    staging folder with its build settings, or with its manifest when only the swap is missing."""
    staging = staging_folder(output)
    return (staging / BUILD_FILE).is_file() or (staging / MANIFEST_FILE).is_file()


def check_output_folder(output: Path, mode: str) -> None:
    """Raise if ``mode`` may not build at ``output``; writes nothing, so it can run before the
    model loads."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if output.exists() and not output.is_dir():
        raise MiceIndexError(f"{output} exists and is not a folder; choose another --output")

    complete = (output / MANIFEST_FILE).is_file()
    partial = (output / BUILD_FILE).is_file() and not complete
    is_empty = not output.exists() or not any(output.iterdir())
    staged = _has_staged_rebuild(output)

    if mode == "overwrite":
        if not (complete or partial or is_empty):
            raise MiceIndexError(
                f"{output} is not a mice index (it has no {MANIFEST_FILE}); --overwrite only "
                "replaces an index, so choose another --output folder"
            )
        if output.parent == output or output.resolve() == Path.cwd().resolve():
            raise MiceIndexError(f"cannot replace {output} in place; give its path from its "
                                 "parent folder, or choose another --output")
        return
    if mode == "resume":
        if staged:  # continue the rebuild of an interrupted --overwrite
            return
        if complete:
            raise MiceIndexError(f"index {output} is already complete; nothing to resume "
                                 "(pass --overwrite to rebuild it)")
        if not partial:
            raise MiceIndexError(f"{output} contains no unfinished build to resume; drop --resume")
        return
    if staged:
        raise MiceIndexError(
            f"an interrupted rebuild of {output} is in {staging_folder(output)}; pass --resume to "
            "continue that rebuild, or --overwrite to start a new one"
        )
    if complete:
        raise MiceIndexError(f"index {output} already exists; pass --overwrite to replace it")
    if partial:
        raise MiceIndexError(f"{output} contains an unfinished build; pass --resume to continue it "
                             "or --overwrite to start again")
    if not is_empty:
        raise MiceIndexError(f"{output} exists and is not empty; choose another --output folder")


def _prepare_folder(output: Path, mode: str, settings: dict[str, Any]) -> Path:
    """Check ``output`` against ``mode`` and return the folder to build in: ``output`` itself,
    or the staging folder of a rebuild."""
    check_output_folder(output, mode)
    if mode == "overwrite":
        # Build beside the old index and swap only once the new one is complete.
        staging = staging_folder(output)
        if staging.exists():
            logger.info("removing the earlier unfinished rebuild in %s", staging)
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        _write_json_atomic(staging / BUILD_FILE, settings)
        return staging
    if mode == "resume":
        folder = staging_folder(output) if _has_staged_rebuild(output) else output
        if (folder / MANIFEST_FILE).is_file():
            # Only a staged rebuild gets here complete: its build stopped before the swap, so
            # there is nothing left to encode and no settings to compare.
            return folder
        previous = json.loads((folder / BUILD_FILE).read_text())
        changed = [f"{key}: {previous.get(key)!r} then, {settings[key]!r} now"
                   for key in settings if previous.get(key) != settings[key]]
        if changed:
            raise MiceIndexError(
                f"cannot resume {folder}: the build was started with other settings "
                f"({'; '.join(changed)}). Resume with the original settings or pass --overwrite"
            )
        return folder
    output.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(output / BUILD_FILE, settings)
    return output


def build_index(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: MiceModel | str | None = None,
    batch_size: int = 32,
    chunk_size: int = 2048,
    device: str | None = None,
    mode: str = "create",
    on_duplicate: str = "error",
    long_documents: str = "truncate",
    window_stride: int | None = None,
    storage: StorageOptions | None = None,
    show_progress: bool = True,
    progress_callback: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Encode every document of ``source`` and write a complete index folder at ``output``.

    Args:
        source: BEIR folder, JSONL/TSV file or ``irds:<id>`` (see :mod:`mice_engine.sources`).
        output: the index folder.
        model: a :class:`MiceModel`, a model folder or backbone name, or ``None`` for the
            default (the shipped MICE-l3+3, trained on SciFact).
        batch_size: documents per forward pass (batches are sorted by length).
        chunk_size: documents per committed shard; a resumed build restarts at a shard boundary.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``..., or ``None`` for the GPU when present.
        mode: ``"create"`` (never touches an existing folder), ``"resume"`` (continue an
            interrupted build with the same settings) or ``"overwrite"`` (build beside the old
            index and replace it once the new one is complete).
        on_duplicate: ``"error"`` stops at a repeated document id; ``"first"`` keeps the first
            document with that id and counts the others as skipped.
        long_documents: the policy for a document longer than the model's maximum length.
            ``"truncate"`` keeps its beginning. ``"windows"`` stores overlapping windows of it,
            and search scores the document by its best window.
        window_stride: tokens between the starts of two windows [default: half a window].
        storage: compression of the states and the dense index (see
            :class:`mice_engine.storage.StorageOptions`) [default: float16, no dense index].
        progress_callback: called after each committed shard with the number of documents
            read from the source so far.

    Returns:
        The manifest, as written to ``manifest.json``.

    Raises:
        MiceIndexError: the folder's state does not allow ``mode``, or a document id repeats.
        SourceError: the source cannot be read.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be positive, got {batch_size} and "
                         f"{chunk_size}")
    if on_duplicate not in DUPLICATE_POLICIES:
        raise ValueError(f"on_duplicate must be one of {DUPLICATE_POLICIES}, got {on_duplicate!r}")
    if long_documents not in LONG_DOCUMENT_POLICIES:
        raise ValueError(f"long_documents must be one of {LONG_DOCUMENT_POLICIES}, got "
                         f"{long_documents!r}")
    output = Path(output).resolve()
    if not str(source).startswith("irds:"):
        source = os.path.abspath(source)
    documents = open_documents(source)  # a missing or unreadable source fails before the model loads
    check_output_folder(output, mode)
    if not isinstance(model, MiceModel):
        model = load_model(model)
    storage = storage or StorageOptions()
    storage.check(model.hidden_size)
    device = resolve_device(device)
    model.to(device).eval()

    if long_documents == "windows":
        window_stride = window_stride or (model.config.doc_max_length - 2) // 2
    else:
        window_stride = None
    record = model_record(model)
    settings = {"source": documents.description, "model_sha256": record["sha256"],
                "doc_max_length": model.config.doc_max_length, "chunk_size": chunk_size,
                "on_duplicate": on_duplicate, "long_documents": long_documents,
                "window_stride": window_stride}
    folder = _prepare_folder(output, mode, settings)
    if folder != output and (folder / MANIFEST_FILE).is_file():
        logger.info("the rebuild in %s is complete; moving it to %s", folder, output)
        return _finish(folder, output, read_manifest(folder))
    try:
        return _build(documents, folder, output, model, record, settings, batch_size,
                      chunk_size, device, on_duplicate, window_stride, show_progress,
                      progress_callback, storage)
    except DiskFullError:
        raise
    except (SourceError, MiceIndexError, ValueError):
        # Bad input fails the same way on every attempt, so nothing here can be resumed: remove
        # what this build wrote. Interruptions and disk errors keep their shards for --resume.
        if mode != "resume":
            _remove_build(folder, output)
        raise


def _remove_build(folder: Path, output: Path) -> None:
    if folder != output:  # the staging folder of --overwrite
        shutil.rmtree(folder, ignore_errors=True)
        return
    shutil.rmtree(folder / SHARDS_DIR, ignore_errors=True)
    remove_storage_files(folder)
    for name in (BUILD_FILE, STATES_FILE):
        (folder / name).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def _build(documents, folder: Path, output: Path, model: MiceModel, record: dict[str, Any],
           settings: dict[str, Any], batch_size: int, chunk_size: int, device: str,
           on_duplicate: str, window_stride: int | None, show_progress: bool,
           progress_callback: Callable[[int], None] | None,
           storage: StorageOptions) -> dict[str, Any]:
    """Encode, commit, merge and finish a build that :func:`build_index` has prepared."""
    long_documents = settings["long_documents"]
    shard_folder = folder / SHARDS_DIR

    # A resumed build replays the committed chunks without encoding them, checking that the
    # source still yields the same documents at the same positions.
    committed = [read_shard_ids(shard) for shard in committed_shards(shard_folder)]
    seen: dict[str, int] = {}
    for ids, positions in committed:
        seen.update(zip(ids, positions.tolist()))
    if committed:
        logger.info("resuming %s after %d committed shards", folder, len(committed))

    total = documents.count()
    encoded_documents = encoded_tokens = 0
    started = time.perf_counter()
    encode_seconds = 0.0
    forward = ForwardTimer()
    initial = min(len(committed) * chunk_size, total) if total else len(committed) * chunk_size
    progress = _progress(total, initial, show_progress)
    position = 0  # documents read from the source, duplicates included
    try:
        for number, chunk in enumerate(_chunks(iter(documents), chunk_size)):
            if number < len(committed):
                ids, positions = committed[number]
                replayed = [chunk[int(p) - position].id for p in positions]
                if replayed != ids:
                    raise MiceIndexError(
                        f"cannot resume {folder}: {documents.description} no longer yields the "
                        f"documents of committed shard {number}; rebuild with --overwrite"
                    )
                position += len(chunk)
                continue
            kept, kept_positions = [], []
            for document in chunk:
                if any(character.isspace() for character in document.id):
                    raise MiceIndexError(
                        f"document id {document.id!r} (document {position + 1} of "
                        f"{documents.description}) contains whitespace, which TREC run files "
                        "cannot hold; fix the id in the source"
                    )
                if document.id in seen:
                    if on_duplicate == "error":
                        raise MiceIndexError(
                            f"document id {document.id!r} appears twice in "
                            f"{documents.description} (documents {seen[document.id] + 1} and "
                            f"{position + 1}); fix the source, or pass --on-duplicate first to "
                            "keep the first one"
                        )
                    logger.warning("skipping document %d: id %r repeats document %d",
                                   position + 1, document.id, seen[document.id] + 1)
                else:
                    seen[document.id] = position
                    kept.append(document)
                    kept_positions.append(position)
                position += 1
            texts = [document.full_text() for document in kept]
            tick = time.perf_counter()
            states, window_lengths, statistics = _encode_chunk(
                model, texts, batch_size, window_stride, progress, forward)
            encode_seconds += time.perf_counter() - tick
            _check_finite(states, kept)
            statistics["empty_documents"] = sum(1 for text in texts if not text)
            statistics["skipped_duplicates"] = len(chunk) - len(kept)
            write_shard(shard_folder, number, kept, states, kept_positions, model.hidden_size,
                        statistics, window_lengths)
            encoded_documents += len(kept)
            encoded_tokens += sum(len(array) for array in states)
            progress.update(len(chunk) - len(kept), 0)  # skipped duplicates
            if progress_callback is not None:
                progress_callback(position)
    except OSError as error:
        _raise_if_disk_full(error, folder, output)
        raise
    finally:
        progress.close()

    shards = committed_shards(shard_folder)
    stats = dict.fromkeys(("truncated_documents", "split_documents", "empty_documents",
                           "skipped_duplicates"), 0)
    for shard in shards:
        for key, value in shard_statistics(shard).items():
            stats[key] += value
    if not shards or sum(len(ids) for ids, _ in map(read_shard_ids, shards)) == 0:
        raise MiceIndexError(f"{documents.description} contains no documents; nothing to index")
    try:
        store_info = merge_shards(shards, folder / STATES_FILE)
        with StateStore(folder / STATES_FILE) as store:
            texts = [store.document(i).full_text() for i in range(len(store))]
        bm25 = BM25FirstStage.build(texts, show_progress=show_progress)
        bm25.save(folder / BM25_DIR)
        # The dense index and the codec run on the float16 store just merged; the codes then
        # replace it, unless the float16 states are kept.
        remove_storage_files(folder)
        storage_parts = write_storage(folder / STATES_FILE, folder, storage,
                                      show_progress=show_progress)
    except OSError as error:
        _raise_if_disk_full(error, folder, output)
        raise
    elapsed = time.perf_counter() - started

    if stats["empty_documents"]:
        logger.warning("%d documents have no text; they are indexed as [CLS] [SEP] and BM25 "
                       "never retrieves them", stats["empty_documents"])
    if stats["truncated_documents"]:
        logger.warning("%d documents were longer than %d tokens and were truncated (pass "
                       "--long-documents windows to keep all of them)",
                       stats["truncated_documents"], model.config.doc_max_length)
    if stats["split_documents"]:
        logger.info("%d documents were longer than %d tokens and were stored as windows",
                    stats["split_documents"], model.config.doc_max_length)
    manifest = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": documents.description,
        "model": record,
        # bytes_per_token counts the stored rows alone; file_bytes_per_token adds the offsets,
        # ids and texts that the file also contains.
        "states": states_record(folder, storage_parts["codec"], store_info["tokens"],
                                store_info["hidden_size"], store_info["states_sha256"]),
        # SHA-256 of the document ids, the titles and the texts, each in stored order.
        "content_sha256": store_info["content_sha256"],
        "first_stage": {"bm25": {"path": BM25_DIR, **bm25.settings}},
        "files": storage_parts["files"],
        "counts": {"documents": store_info["documents"], "tokens": store_info["tokens"],
                   "windows": store_info["windows"], **stats},
        "long_documents": {"policy": long_documents, "window_stride": window_stride},
        "build": {
            "device": device,
            "batch_size": batch_size,
            "chunk_size": chunk_size,
            "on_duplicate": on_duplicate,
            "seconds": round(elapsed, 3),
            "encode_seconds": round(encode_seconds, 3),
            "documents_per_second": round(encoded_documents / encode_seconds, 2)
            if encode_seconds else None,
            "tokens_per_second": round(encoded_tokens / encode_seconds, 1)
            if encode_seconds else None,
            # The lower layers' forward passes alone, inside encoding: the rest of the build
            # (tokenising, converting, writing, merging, BM25) is seconds - forward_seconds.
            "forward_seconds": round(forward.seconds, 3),
            "forward_tokens_per_second": round(encoded_tokens / forward.seconds, 1)
            if forward.seconds else None,
            "resumed_after_shards": len(committed),
            "hostname": platform.node(),
            "processor": platform.processor() or platform.machine(),
        },
        "versions": library_versions(),
    }
    if storage_parts["dense"] is not None:
        manifest["first_stage"]["dense"] = storage_parts["dense"]
    manifest["bytes"] = (_folder_bytes(folder) - _folder_bytes(shard_folder)
                         - (folder / BUILD_FILE).stat().st_size)
    # The manifest marks the index complete, so the shards go only after it is written: a build
    # killed before this point still has every shard to resume from.
    _write_json_atomic(folder / MANIFEST_FILE, manifest)
    return _finish(folder, output, manifest)


def _finish(folder: Path, output: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Remove the build files of the complete index in ``folder`` and, for a rebuild, move it
    to ``output``."""
    (folder / BUILD_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder / SHARDS_DIR, ignore_errors=True)
    if folder != output:
        _swap_in(folder, output)
    return manifest


def _encode_chunk(model: MiceModel, texts: list[str], batch_size: int,
                  window_stride: int | None, progress: _progress, timer: ForwardTimer):
    """Encode a chunk's texts; returns (states per text, window lengths per text or None,
    statistics)."""
    import numpy as np

    max_length = model.config.doc_max_length
    if window_stride is None:
        tokens = tokenize(model.tokenizer, texts, max_length)
        states = encode_sequences(model, tokens.input_ids, batch_size, progress.update, timer)
        return states, None, {"truncated_documents": tokens.truncated, "split_documents": 0}
    windows = tokenize_windows(model.tokenizer, texts, max_length, window_stride)
    # Batches count windows, not documents: the bar moves by documents once the chunk is done.
    flat = encode_sequences(model, windows.input_ids, batch_size,
                            lambda count, tokens: progress.update(0, tokens), timer)
    progress.update(len(texts), 0)
    states, window_lengths, start = [], [], 0
    for count in windows.windows_per_text:
        parts = flat[start : start + count]
        start += count
        states.append(np.concatenate(parts))
        window_lengths.append([len(part) for part in parts])
    return states, window_lengths, {"truncated_documents": 0,
                                    "split_documents": windows.split_texts}


def _check_finite(states: list, documents: list[Document]) -> None:
    """Stop before a NaN or infinite state reaches the store (float16 overflows past 65504)."""
    import numpy as np

    bad = [doc.id for doc, array in zip(documents, states) if not np.isfinite(array).all()]
    if bad:
        raise MiceIndexError(
            f"the model produced NaN or infinite states for {len(bad)} documents (first: "
            f"{bad[0]!r}); the model's weights are likely broken or its activations exceed "
            "float16's range. Check the model before indexing"
        )


def _raise_if_disk_full(error: OSError, folder: Path, output: Path) -> None:
    """Raise a DiskFullError with the resume hint when ``error`` is a full disk."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return
    if folder != output:
        raise DiskFullError(
            f"disk full while rebuilding {output} in {folder} ({error.strerror}). {output} is "
            f"unchanged, and the shards committed to {folder} are kept: free some space, then "
            f"continue the rebuild with `mice index SOURCE --output {output} --resume`"
        ) from error
    raise DiskFullError(
        f"disk full while building {folder} ({error.strerror}). The shards committed so far are "
        "kept: free some space, then rerun the same command with --resume"
    ) from error


def interrupted_build_message(output: str | os.PathLike, mode: str) -> str:
    """Describe what an interrupted :func:`build_index` call in ``mode`` left at ``output``,
    and how to continue or discard it. The description comes from the folders as they are now,
    so it is true wherever the interruption fell: while the model loaded, during encoding, or
    between the end of a rebuild and its swap."""
    output = Path(output)
    if mode == "overwrite" or (mode == "resume" and _has_staged_rebuild(output)):
        return _interrupted_rebuild_message(output, mode)
    if (output / MANIFEST_FILE).is_file():
        return f"the build had finished: the index at {output} is complete and usable"
    if not (output / BUILD_FILE).is_file():
        return f"nothing was written to {output}; rerun the same command"
    if mode == "resume":
        continuation = "rerun the same command"
        restart = "with --overwrite in place of --resume"
    else:
        continuation = "rerun the same command plus --resume"
        restart = "plus --overwrite"
    return (f"the build at {output} is incomplete. Its {_shard_count(output)} committed shards "
            f"are kept: to continue it, {continuation}. To start again, rerun the same command "
            f"{restart}, or remove the folder with `{_remove_command(output)}`")


def _interrupted_rebuild_message(output: Path, mode: str) -> str:
    staging = staging_folder(output)
    retired = _retired_folder(output)
    if mode == "resume":
        continuation = "rerun the same command"
        restart = "rerun the same command with --overwrite in place of --resume"
    else:
        continuation = "rerun the same command with --resume in place of --overwrite"
        restart = "rerun the same command"
    if (output / MANIFEST_FILE).is_file():
        current = f"the index at {output} is intact and still usable"
    elif (retired / MANIFEST_FILE).is_file():
        current = f"the old index was moved to {retired}, and nothing is at {output} now"
    elif (output / BUILD_FILE).is_file():
        current = f"the unfinished build at {output} is unchanged"
    else:
        current = f"nothing is at {output}"
    if (staging / MANIFEST_FILE).is_file():
        return (f"{current}. The rebuild in {staging} is complete but was not moved to {output}: "
                f"to move it there, {continuation}. To discard it, remove it with "
                f"`{_remove_command(staging)}`")
    if (staging / BUILD_FILE).is_file():
        return (f"{current}. The partial rebuild, {_shard_count(staging)} committed shards, is in "
                f"{staging}: to continue it, {continuation}. To restart it, {restart}. To "
                f"discard it, remove it with `{_remove_command(staging)}`")
    leftover = (f" {staging} contains nothing to resume; remove it with "
                f"`{_remove_command(staging)}`."
                if staging.exists() else "")
    return f"{current}, and no rebuild of it is in progress.{leftover}"


def _remove_command(folder: Path) -> str:
    return f"rm -r {shlex.quote(str(folder))}"


def _shard_count(folder: Path) -> int:
    return len(list((folder / SHARDS_DIR).glob("part-*.h5")))


def _swap_in(staging: Path, output: Path) -> None:
    """Replace ``output`` by the complete index in ``staging``."""
    retired = _retired_folder(output)
    if retired.exists():
        shutil.rmtree(retired)
    if output.exists():
        os.replace(output, retired)
    os.replace(staging, output)
    if retired.exists():
        shutil.rmtree(retired)


class _progress:
    """Progress bar in documents, with tokens/s beside documents/s and the ETA."""

    def __init__(self, total: int | None, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, unit="doc", disable=not enabled,
                         desc="indexing", dynamic_ncols=True)
        self._tokens = 0
        self._start = time.perf_counter()

    def update(self, documents: int, tokens: int) -> None:
        self._tokens += tokens
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{self._tokens / elapsed:,.0f} tok/s", refresh=False)
        self._bar.update(documents)

    def close(self) -> None:
        self._bar.close()
