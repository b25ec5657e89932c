"""The multi-vector store: per-token document states in HDF5.

Layout of the final store (``states.h5``):

- ``states``: (total tokens, hidden) float16, one contiguous uncompressed dataset, so that search
  can memory-map it and read a document's rows without loading the rest;
- ``offsets``: (documents + 1,) int64, document ``i`` owns rows ``offsets[i]:offsets[i+1]``;
- ``window_offsets`` (windows + 1,) and ``doc_windows`` (documents + 1,), int64: a document
  longer than the model's maximum length may be stored as several windows, each its own
  ``[CLS] ... [SEP]`` sequence. Document ``i`` owns windows ``doc_windows[i]:doc_windows[i+1]``
  and window ``w`` owns rows ``window_offsets[w]:window_offsets[w+1]``. A document that fits is
  one window;
- ``doc_ids``, ``titles``, ``texts``: UTF-8 strings kept as a ``data`` byte array plus
  ``offsets``, which can store any text (HDF5's own variable-length strings stop at a NUL byte).
  The manifest records a SHA-256 of each of these fields (see :func:`content_checksums`).

A compressed store (see :mod:`mice_engine.compression`) holds ``codes`` instead of ``states``:
(total tokens, code size) uint8, one contiguous dataset as well, whose attributes ``codec`` and
``codec_file`` name the codec and its FAISS file beside the store. It holds ``states`` too only
when it was written with ``keep_float16``. Reading a row range decodes only those rows.

During a build, documents are committed in shards (``shards/part-NNNNNN.h5``), each written to a
temporary name, flushed, synced and renamed, so a killed build leaves only whole shards behind.
:func:`merge_shards` then writes ``states.h5`` in one streaming pass.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from .sources import Document

logger = logging.getLogger(__name__)

STATES_FILE = "states.h5"
STATES_DATASET = "states"
CODES_DATASET = "codes"
SHARDS_DIR = "shards"
_SHARD_PATTERN = "part-*.h5"
_STRING_FIELDS = ("doc_ids", "titles", "texts")
# Readable names of the string fields, for messages.
FIELD_NAMES = {"doc_ids": "document ids", "titles": "titles", "texts": "texts"}
# Rows copied per step while merging shards: bounds the merge's memory (4 MiB at hidden 384).
_COPY_ROWS = 1 << 13
# Rows coded per step while compressing: 24 MiB of float16 states at hidden 384.
_ENCODE_ROWS = 1 << 15
# Strings hashed per step by content_checksums.
_HASH_STRINGS = 1 << 16


class StoreError(RuntimeError):
    """A store file that is missing, incomplete or inconsistent."""


def _encode_strings(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [value.encode("utf-8") for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(item) for item in encoded], out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return data, offsets


def _write_strings(group: h5py.Group, name: str, values: Sequence[str]) -> None:
    data, offsets = _encode_strings(values)
    sub = group.create_group(name)
    sub.create_dataset("data", data=data, dtype=np.uint8)
    sub.create_dataset("offsets", data=offsets)


def _read_all_strings(group: h5py.Group) -> list[str]:
    data = group["data"][()].tobytes()
    offsets = group["offsets"][()]
    return [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


def _hash_strings(digest, data: bytes, offsets: np.ndarray) -> None:
    """Add each string of ``data`` to ``digest`` as its length in bytes (8 bytes, little-endian)
    followed by its bytes. ``offsets`` bound the strings and start at 0.

    The length prefix makes the digest depend on where each string ends, so ("ab", "c") and
    ("a", "bc") hash differently.
    """
    bounds = offsets.tolist()
    view = memoryview(data)
    pieces = []
    for start, end in itertools.pairwise(bounds):
        pieces.append((end - start).to_bytes(8, "little"))
        pieces.append(view[start:end])
    digest.update(b"".join(pieces))


def content_checksums(handle: h5py.File) -> dict[str, str]:
    """Compute the SHA-256 of each string field of an open store: ``doc_ids``, ``titles`` and
    ``texts``, in stored order, as :func:`merge_shards` records them.

    Each string is hashed as its 8-byte little-endian length followed by its UTF-8 bytes. The
    strings are read in blocks, so memory stays bounded.

    Raises:
        StoreError: a field's offsets decrease or point past its data.
    """
    checksums = {}
    for name in _STRING_FIELDS:
        data = handle[name]["data"]
        all_offsets = handle[name]["offsets"]
        count = all_offsets.shape[0] - 1
        digest = hashlib.sha256()
        for first in range(0, count, _HASH_STRINGS):
            offsets = all_offsets[first : min(first + _HASH_STRINGS, count) + 1]
            if offsets[0] < 0 or offsets[-1] > data.shape[0] or np.any(np.diff(offsets) < 0):
                raise StoreError(f"the offsets of {name} in {handle.filename} are not increasing "
                                 "within its data; rebuild the index")
            block = data[int(offsets[0]) : int(offsets[-1])].tobytes()
            _hash_strings(digest, block, offsets - offsets[0])
        checksums[name] = digest.hexdigest()
    return checksums


def _require_space(folder: Path, needed: int) -> None:
    """Raise ENOSPC before writing ``needed`` bytes into ``folder`` when they cannot fit."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"{needed:,} bytes are needed in {folder} but only "
                                    f"{free:,} are free")


@contextlib.contextmanager
def _writing(temporary: Path):
    """Remove ``temporary`` if writing it fails, and report a full disk as OSError(ENOSPC).

    HDF5 reports a failed write as a RuntimeError whose message contains the errno, so a full disk
    would otherwise not be recognisable.
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno is not None:
            raise
        if "errno = 28" in str(error) or "No space left" in str(error):
            raise OSError(errno.ENOSPC, f"no space left while writing {temporary}") from error
        raise


def _sync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# --------------------------------------------------------------------------------------------
# Writing
def write_shard(
    folder: Path,
    number: int,
    documents: Sequence[Document],
    states: Sequence[np.ndarray],
    positions: Sequence[int],
    hidden_size: int,
    statistics: dict[str, int] | None = None,
    window_lengths: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Commit one shard: documents, their float16 states and their positions in the source.

    A shard may hold no document (a chunk made only of skipped duplicates), so that shard
    numbers stay aligned with the source's chunks. ``statistics`` (counts such as truncated
    documents) are kept as attributes, so that a resumed build can total them.
    ``window_lengths`` gives, per document, the token counts of the windows whose states are
    concatenated in its array; by default each document is one window.
    """
    if not len(documents) == len(states) == len(positions):
        raise ValueError(f"{len(documents)} documents, {len(states)} state arrays and "
                         f"{len(positions)} positions must match")
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"part-{number:06d}.h5"
    temporary = final.with_suffix(".h5.tmp")
    lengths = np.array([len(array) for array in states], dtype=np.int64)
    if window_lengths is None:
        window_lengths = [[length] for length in lengths.tolist()]
    if [sum(windows) for windows in window_lengths] != lengths.tolist():
        raise ValueError("window lengths do not add up to the documents' state lengths")
    windows_per_document = np.array([len(windows) for windows in window_lengths], dtype=np.int64)
    flat_window_lengths = np.array([length for windows in window_lengths for length in windows],
                                   dtype=np.int64)
    rows = (np.concatenate(states).astype(np.float16, copy=False) if states
            else np.zeros((0, hidden_size), dtype=np.float16))
    _require_space(folder, rows.nbytes + sum(len(doc.text) + len(doc.title) + len(doc.id)
                                             for doc in documents) * 4 + (1 << 20))
    with _writing(temporary), h5py.File(temporary, "w") as handle:
        handle.create_dataset("states", data=rows)
        handle.create_dataset("lengths", data=lengths)
        handle.create_dataset("windows", data=windows_per_document)
        handle.create_dataset("window_lengths", data=flat_window_lengths)
        handle.create_dataset("positions", data=np.asarray(positions, dtype=np.int64))
        _write_strings(handle, "doc_ids", [doc.id for doc in documents])
        _write_strings(handle, "titles", [doc.title for doc in documents])
        _write_strings(handle, "texts", [doc.text for doc in documents])
        for key, value in (statistics or {}).items():
            handle.attrs[key] = int(value)
    _sync(temporary)
    os.replace(temporary, final)
    return final


def shard_statistics(path: Path) -> dict[str, int]:
    """Read the counts that :func:`write_shard` stored with a shard."""
    with h5py.File(path, "r") as handle:
        return {key: int(value) for key, value in handle.attrs.items()}


def committed_shards(folder: Path) -> list[Path]:
    """Whole shards in ``folder``, in order; stray temporary files of a killed build are removed."""
    if not folder.is_dir():
        return []
    for stray in folder.glob("*.tmp"):
        logger.info("removing unfinished shard %s", stray)
        stray.unlink()
    shards = sorted(folder.glob(_SHARD_PATTERN))
    for expected, shard in enumerate(shards):
        if shard.name != f"part-{expected:06d}.h5":
            raise StoreError(f"shard {shard} is out of sequence (expected part-{expected:06d}.h5); "
                             "the build folder was altered, rebuild with --overwrite")
    return shards


def read_shard_ids(path: Path) -> tuple[list[str], np.ndarray]:
    """Document ids of a committed shard and their positions in the source."""
    with h5py.File(path, "r") as handle:
        return _read_all_strings(handle["doc_ids"]), handle["positions"][()]


def merge_shards(shards: Sequence[Path], output: Path) -> dict[str, object]:
    """Write the final store from committed shards in one streaming pass.

    Returns the counts, the SHA-256 of the states' bytes and the SHA-256 of each string field
    (``content_sha256``, hashed as :func:`content_checksums` does), which the manifest records.
    The checksums are computed from the shards' data as it is copied, so a resumed build, whose
    first shards come from an earlier run, gets the same checksums as an uninterrupted one.
    """
    if not shards:
        raise StoreError("no committed documents to store")
    documents = 0
    tokens = 0
    hidden = None
    windows = 0
    text_bytes = dict.fromkeys(_STRING_FIELDS, 0)
    for shard in shards:
        with h5py.File(shard, "r") as handle:
            windows += handle["window_lengths"].shape[0]
            documents += handle["lengths"].shape[0]
            tokens += handle["states"].shape[0]
            hidden = handle["states"].shape[1]
            for name in _STRING_FIELDS:
                text_bytes[name] += handle[name]["data"].shape[0]

    temporary = output.with_suffix(".h5.tmp")
    temporary.unlink(missing_ok=True)
    _require_space(output.parent, tokens * hidden * 2 + sum(text_bytes.values())
                   + 24 * (documents + windows) + (1 << 20))
    digest = hashlib.sha256()
    content_digests = {name: hashlib.sha256() for name in _STRING_FIELDS}
    with _writing(temporary), h5py.File(temporary, "w") as out:
        states = out.create_dataset("states", shape=(tokens, hidden), dtype=np.float16)
        offsets = out.create_dataset("offsets", shape=(documents + 1,), dtype=np.int64)
        window_offsets = out.create_dataset("window_offsets", shape=(windows + 1,), dtype=np.int64)
        doc_windows = out.create_dataset("doc_windows", shape=(documents + 1,), dtype=np.int64)
        window_offsets[0] = 0
        doc_windows[0] = 0
        window = 0
        strings = {}
        for name in _STRING_FIELDS:
            group = out.create_group(name)
            strings[name] = (
                group.create_dataset("data", shape=(text_bytes[name],), dtype=np.uint8),
                group.create_dataset("offsets", shape=(documents + 1,), dtype=np.int64),
            )
        offsets[0] = 0
        for data, string_offsets in strings.values():
            string_offsets[0] = 0
        row = doc = 0
        byte_positions = dict.fromkeys(_STRING_FIELDS, 0)
        for shard in shards:
            with h5py.File(shard, "r") as handle:
                source = handle["states"]
                for start in range(0, source.shape[0], _COPY_ROWS):
                    block = source[start : start + _COPY_ROWS]
                    digest.update(block.tobytes())
                    states[row + start : row + start + len(block)] = block
                lengths = handle["lengths"][()]
                offsets[doc + 1 : doc + 1 + len(lengths)] = row + np.cumsum(lengths)
                shard_windows = handle["window_lengths"][()]
                window_offsets[window + 1 : window + 1 + len(shard_windows)] = (
                    row + np.cumsum(shard_windows))
                doc_windows[doc + 1 : doc + 1 + len(lengths)] = (
                    window + np.cumsum(handle["windows"][()]))
                window += len(shard_windows)
                row += source.shape[0]
                for name in _STRING_FIELDS:
                    data, string_offsets = strings[name]
                    part = handle[name]["data"][()]
                    part_offsets = handle[name]["offsets"][()]
                    base = byte_positions[name]
                    data[base : base + len(part)] = part
                    string_offsets[doc + 1 : doc + 1 + len(lengths)] = base + part_offsets[1:]
                    _hash_strings(content_digests[name], part.tobytes(), part_offsets)
                    byte_positions[name] += len(part)
                doc += len(lengths)
    _sync(temporary)
    os.replace(temporary, output)
    return {"documents": documents, "tokens": tokens, "windows": windows, "hidden_size": hidden,
            "states_sha256": digest.hexdigest(),
            "content_sha256": {name: content_digests[name].hexdigest()
                               for name in _STRING_FIELDS}}


def write_compressed_store(source: Path, output: Path, codec, codec_file: str, *,
                           keep_float16: bool = False) -> dict[str, object]:
    """Write a store at ``output`` that contains ``codec``'s codes of the float16 states of
    ``source``.

    Offsets, windows, ids, titles and texts are copied unchanged. The float16 states are copied
    too when ``keep_float16`` is set, or when ``codec`` is ``None`` (a plain float16 copy). The
    states are read, coded and written in blocks, so memory stays bounded. ``output`` may be
    ``source``: the new store replaces it once complete.

    Returns the code size and the SHA-256 of the codes and of the float16 states.
    """
    keep_float16 = keep_float16 or codec is None
    temporary = output.with_suffix(".h5.tmp")
    temporary.unlink(missing_ok=True)
    codes_digest = hashlib.sha256()
    float16_digest = hashlib.sha256()
    with h5py.File(source, "r") as src:
        if STATES_DATASET not in src:
            raise StoreError(f"{source} contains no float16 states, only codes; compress from an "
                             "index that holds float16 states")
        states = src[STATES_DATASET]
        tokens, hidden = states.shape
        extra = sum(src[name]["data"].shape[0] for name in _STRING_FIELDS)
        code_size = codec.code_size if codec is not None else 0
        _require_space(output.parent, tokens * code_size + extra + (1 << 20)
                       + (tokens * hidden * 2 if keep_float16 else 0))
        with _writing(temporary), h5py.File(temporary, "w") as out:
            for name in ("offsets", "window_offsets", "doc_windows", *_STRING_FIELDS):
                if name in src:
                    src.copy(src[name], out, name)
            codes = None
            if codec is not None:
                codes = out.create_dataset(CODES_DATASET, shape=(tokens, code_size),
                                           dtype=np.uint8)
                codes.attrs["codec"] = codec.name
                codes.attrs["codec_file"] = codec_file
            float16_rows = None
            if keep_float16:
                float16_rows = out.create_dataset(STATES_DATASET, shape=(tokens, hidden),
                                                  dtype=np.float16)
            for start in range(0, tokens, _ENCODE_ROWS):
                block = states[start : start + _ENCODE_ROWS]
                float16_digest.update(block.tobytes())
                if codes is not None:
                    coded = codec.encode(block)
                    codes_digest.update(coded.tobytes())
                    codes[start : start + len(block)] = coded
                if float16_rows is not None:
                    float16_rows[start : start + len(block)] = block
    _sync(temporary)
    os.replace(temporary, output)
    return {"tokens": int(tokens), "hidden_size": int(hidden), "code_size": code_size,
            "codes_sha256": codes_digest.hexdigest() if codec is not None else None,
            "float16_sha256": float16_digest.hexdigest()}


# --------------------------------------------------------------------------------------------
# Reading
class StateStore:
    """Read access to ``states.h5``: document ids, texts and per-token states.

    The states (or codes) are memory-mapped when the dataset is contiguous and uncompressed (as
    :func:`merge_shards` and :func:`write_compressed_store` write it), so opening a store reads
    only offsets and ids. A store of codes decodes the rows it is asked for. With
    ``prefer_float16``, a store that holds both codes and float16 states reads the float16
    states.
    """

    def __init__(self, path: str | os.PathLike, prefer_float16: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"state store {self.path} is missing")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            raise StoreError(f"state store {self.path} cannot be read as HDF5 ({error}); the "
                             "file is damaged or incomplete, rebuild the index with --overwrite"
                             ) from None
        self.codec = None
        if CODES_DATASET in self._file and not (prefer_float16 and STATES_DATASET in self._file):
            from .compression import StateCodec

            states = self._file[CODES_DATASET]
            attributes = self._file[CODES_DATASET].attrs
            self.codec = StateCodec.load(self.path.parent / str(attributes["codec_file"]),
                                         str(attributes["codec"]))
            if self.codec.code_size != states.shape[1]:
                raise StoreError(f"{self.path}: codes of {states.shape[1]} bytes but the codec "
                                 f"{self.codec.name} writes {self.codec.code_size}; rebuild the "
                                 "index")
        elif STATES_DATASET in self._file:
            states = self._file[STATES_DATASET]
        else:
            raise StoreError(f"{self.path} contains neither states nor codes; rebuild the index")

        self.offsets = self._file["offsets"][()]
        self.doc_ids = _read_all_strings(self._file["doc_ids"])
        if len(self.doc_ids) != len(self.offsets) - 1:
            raise StoreError(
                f"{self.path}: {len(self.doc_ids)} document ids but {len(self.offsets) - 1} "
                "offset ranges; rebuild the index"
            )
        if self.offsets[-1] != states.shape[0]:
            raise StoreError(
                f"{self.path}: offsets end at row {self.offsets[-1]} but the states hold "
                f"{states.shape[0]} rows; rebuild the index"
            )
        if "window_offsets" in self._file:
            self.window_offsets = self._file["window_offsets"][()]
            self.doc_windows = self._file["doc_windows"][()]
        else:  # stores written before windows existed hold one window per document
            self.window_offsets = self.offsets
            self.doc_windows = np.arange(len(self.offsets), dtype=np.int64)
        if self.doc_windows[-1] != len(self.window_offsets) - 1:
            raise StoreError(f"{self.path}: document windows and window offsets disagree; "
                             "rebuild the index")
        self.hidden_size = self.codec.dimension if self.codec else int(states.shape[1])

        offset = states.id.get_offset()
        if states.chunks is None and states.compression is None and offset is not None:
            self._states = np.memmap(self.path, dtype=states.dtype, mode="r", offset=offset,
                                     shape=states.shape)
        else:
            self._states = states
        self._string_offsets = {name: self._file[name]["offsets"] for name in ("titles", "texts")}
        self._position: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def position(self, doc_id: str) -> int:
        """Row of a document id; raises KeyError for an unknown id."""
        if self._position is None:
            self._position = {doc_id: i for i, doc_id in enumerate(self.doc_ids)}
        return self._position[doc_id]

    @property
    def encoding(self) -> str:
        """How rows are stored: ``float16`` or the codec's name."""
        return self.codec.name if self.codec else "float16"

    def states(self, position: int) -> np.ndarray:
        """(length, hidden) float16 states of the document at ``position``."""
        return self.rows(int(self.offsets[position]), int(self.offsets[position + 1]))

    def windows(self, position: int) -> list[tuple[int, int]]:
        """(first row, end row) of each window of the document at ``position``."""
        first, end = self.doc_windows[position], self.doc_windows[position + 1]
        return [(int(self.window_offsets[w]), int(self.window_offsets[w + 1]))
                for w in range(first, end)]

    def rows(self, start: int, end: int) -> np.ndarray:
        """(end - start, hidden) float16 states of rows ``start:end``, decoded when the store
        contains codes."""
        stored = np.asarray(self._states[start:end])
        if self.codec is None:
            return stored
        return self.codec.decode(stored).astype(np.float16)

    def row_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """float16 states of several row ranges; a store of codes decodes them in one call."""
        if self.codec is None:
            return [np.asarray(self._states[start:end]) for start, end in ranges]
        stored = [np.asarray(self._states[start:end]) for start, end in ranges]
        if not stored:
            return []
        decoded = self.codec.decode(np.concatenate(stored)).astype(np.float16)
        bounds = np.cumsum([len(part) for part in stored])[:-1]
        return np.split(decoded, bounds)

    def stored_rows_source(self):
        """Return the stored rows as one array-like (a memory map when possible): float16
        states or codes."""
        return self._states

    def stored_rows(self, start: int, end: int) -> np.ndarray:
        """Rows ``start:end`` as stored: float16 states or uint8 codes."""
        return np.asarray(self._states[start:end])

    def _string(self, name: str, position: int) -> str:
        offsets = self._string_offsets[name]
        start, end = offsets[position], offsets[position + 1]
        return self._file[name]["data"][start:end].tobytes().decode("utf-8")

    def document(self, position: int) -> Document:
        return Document(self.doc_ids[position], self._string("titles", position),
                        self._string("texts", position))

    def close(self) -> None:
        self._states = None  # drops the memory map
        self._file.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
