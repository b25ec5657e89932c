"""Read document collections, queries and relevance judgments (qrels).

Every public function takes a source, which is one of:

* ``irds:<dataset id>``, for example ``irds:beir/scifact/test``: a dataset of the
  ``ir_datasets`` package. The id names the split, so ``split`` arguments are ignored.
* A folder in BEIR layout: ``corpus.jsonl`` or ``corpus.jsonl.gz``, ``queries.jsonl``
  and ``qrels/<split>.tsv``.
* A file: JSON Lines (``.jsonl``, ``.jsonl.gz``) or TSV for documents and queries, and
  BEIR TSV or TREC qrels for judgments. Files ending in ``.gz`` are read through gzip.

Files must be UTF-8. A leading byte-order mark, CRLF line endings and blank lines are
accepted. Ids are opaque strings and are never converted to numbers, so ``"007"`` stays
``"007"``. Bad input raises SourceError with the file, the line number and the fix,
and no record is skipped without an error or a log message.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IRDS_PREFIX = "irds:"

# Keys that can hold the id or the text of a JSON Lines record, in order of precedence.
JSON_ID_KEYS = ("_id", "id", "docid", "doc_id", "qid", "query_id")
JSON_TEXT_KEYS = ("text", "contents")
# A query line may also hold its text under "query", the name a TSV query header may use.
JSON_QUERY_TEXT_KEYS = (*JSON_TEXT_KEYS, "query")

ACCEPTED_FORMS = (
    "a BEIR folder (corpus.jsonl[.gz], queries.jsonl, qrels/<split>.tsv), "
    "a .jsonl or .jsonl.gz file, a .tsv file, or irds:<ir_datasets id>"
)

# A first TSV line made only of these names is a header, not a record.
_TSV_ID_HEADERS = frozenset(
    {"id", "_id", "docid", "doc_id", "doc-id", "pid", "qid", "query_id", "query-id"}
)
_TSV_FIELD_HEADERS = frozenset({"title", "text", "contents", "body", "passage", "query"})

_INTEGER = re.compile(r"[+-]?[0-9]+")

# Errors that gzip raises on data that is not gzip or is cut short.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


@dataclass(frozen=True)
class Document:
    """Document of a collection, with its id, an optional title and the body text."""

    id: str
    title: str
    text: str

    def full_text(self) -> str:
        """Return the title and the text joined by one space, without surrounding whitespace."""
        parts = (self.title.strip(), self.text.strip())
        return " ".join(part for part in parts if part)


@dataclass(frozen=True)
class Query:
    """Query with its id and its text."""

    id: str
    text: str


class SourceError(ValueError):
    """Error for invalid or missing input.

    The message names the file, the line and the id where known, and the fix.
    """


class DocumentSource:
    """Re-iterable documents of a source. Each iteration reads the source again from the start."""

    def __init__(
        self,
        description: str,
        iterate: Callable[[], Iterator[Document]],
        count_documents: Callable[[], int | None],
    ) -> None:
        self.description = description
        self._iterate = iterate
        self._count_documents = count_documents
        self._count: int | None = None
        self._count_known = False

    def count(self) -> int | None:
        """Return the number of documents, or None when the source cannot tell it cheaply.

        For a file this reads the file once, counting non-blank lines less a header line,
        and caches the result. For ir_datasets it returns ``docs_count()``.
        """
        if not self._count_known:
            self._count = self._count_documents()
            self._count_known = True
        return self._count

    def __iter__(self) -> Iterator[Document]:
        return self._iterate()

    def __repr__(self) -> str:
        return f"DocumentSource({self.description!r})"


# ---------------------------------------------------------------------------
# Public entry points


def open_documents(source: str | os.PathLike) -> DocumentSource:
    """Open the documents of a source without reading them yet.

    Raises SourceError when the source does not exist, contains no documents, or (for a
    BEIR folder) contains both corpus.jsonl and corpus.jsonl.gz. Errors inside the records
    are raised while iterating.
    """
    dataset_id = _irds_id(source)
    if dataset_id is not None:
        return _open_irds_documents(dataset_id)

    path = _existing_path(source)
    if path.is_dir():
        corpus_path = _beir_corpus_path(path)
        return _open_file_documents(corpus_path, f"BEIR corpus {corpus_path}")
    return _open_file_documents(path, f"document file {path}")


def read_queries(source: str | os.PathLike, split: str = "test") -> list[Query]:
    """Read the queries of a source, in file order.

    For a BEIR folder with ``qrels/<split>.tsv``, only the queries judged in that split
    are returned. A folder without a qrels folder returns every query. A qrels folder
    without that split raises SourceError listing the splits that exist. Duplicate query
    ids raise SourceError naming both lines. ``split`` is ignored for files and irds ids.
    """
    dataset_id = _irds_id(source)
    if dataset_id is not None:
        return _read_irds_queries(dataset_id)

    path = _existing_path(source)
    if not path.is_dir():
        return _read_query_file(path)

    queries = _read_query_file(_beir_queries_path(path))
    qrels_path = _beir_qrels_path(path, split)
    if qrels_path is None:
        logger.info("%s has no qrels folder, so all %d queries are returned", path, len(queries))
        return queries
    return _keep_judged_queries(queries, _read_qrels_file(qrels_path), qrels_path)


def read_qrels(source: str | os.PathLike, split: str = "test") -> dict[str, dict[str, int]]:
    """Read relevance judgments as ``{query id: {document id: relevance}}``.

    Judgments with relevance 0 or below are kept. When a (query id, document id) pair
    appears more than once, the maximum relevance is kept and a WARNING gives the number
    of collapsed lines. ``split`` selects ``qrels/<split>.tsv`` in a BEIR folder and is
    ignored for files and irds ids.
    """
    dataset_id = _irds_id(source)
    if dataset_id is not None:
        return _read_irds_qrels(dataset_id)

    path = _existing_path(source)
    if not path.is_dir():
        return _read_qrels_file(path)

    qrels_path = _beir_qrels_path(path, split)
    if qrels_path is None:
        raise SourceError(
            f"{path} has no qrels folder, so it has no relevance judgments. "
            f"Add {path / 'qrels' / (split + '.tsv')} or pass a qrels file."
        )
    return _read_qrels_file(qrels_path)


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)`` for each non-blank line of a UTF-8 text file.

    Line numbers start at 1 and count blank lines too. A ``.gz`` file is decompressed.
    A leading byte-order mark and the line ending (LF or CRLF) are removed. Invalid UTF-8
    raises SourceError naming the file and the line, and invalid gzip data raises
    SourceError naming the file.
    """
    try:
        with _open_binary(path) as stream:
            for number, raw_line in enumerate(stream, start=1):
                line = _decode_line(path, number, raw_line)
                if number == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
    except _GZIP_ERRORS as error:
        raise _gzip_error(path, error) from error


# ---------------------------------------------------------------------------
# Paths and files


def _irds_id(source: str | os.PathLike) -> str | None:
    """Return the ir_datasets id of an ``irds:`` source, or None for a path."""
    if not isinstance(source, str) or not source.startswith(IRDS_PREFIX):
        return None
    dataset_id = source[len(IRDS_PREFIX) :].strip()
    if not dataset_id:
        raise SourceError(
            f"source {source!r} has no dataset id. Write it as irds:<id>, "
            "for example irds:beir/scifact/test."
        )
    return dataset_id


def _existing_path(source: str | os.PathLike) -> Path:
    path = Path(source)
    if not path.exists():
        raise SourceError(f"source not found: {path}. Pass {ACCEPTED_FORMS}.")
    return path


def _open_binary(path: Path) -> Any:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _gzip_error(path: Path, error: Exception) -> SourceError:
    return SourceError(
        f"{path}: invalid or truncated gzip data ({error}). Download or compress the file again."
    )


def _decode_line(path: Path, number: int, raw_line: bytes) -> str:
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SourceError(
            f"{path}, line {number}: invalid UTF-8 at byte {error.start} of the line "
            f"({raw_line[error.start : error.start + 4]!r}). Re-encode the file as UTF-8, "
            "for example with iconv -f <its encoding> -t UTF-8."
        ) from None


def _count_data_lines(path: Path, has_header: bool) -> int:
    """Count the non-blank lines of a file, less one for a header line."""
    count = 0
    try:
        with _open_binary(path) as stream:
            for raw_line in stream:
                if raw_line.strip():
                    count += 1
    except _GZIP_ERRORS as error:
        raise _gzip_error(path, error) from error
    return count - 1 if has_header and count > 0 else count


def _first_line(path: Path) -> tuple[int, str] | None:
    return next(iter_lines(path), None)


def _file_format(path: Path) -> str:
    """Return "jsonl" or "tsv" from the file name, or from the first line for other names."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith((".tsv", ".tsv.gz")):
        return "tsv"

    first = _first_line(path)
    if first is None:
        return "jsonl"
    number, line = first
    if line.lstrip().startswith("{"):
        file_format = "jsonl"
    elif "\t" in line:
        file_format = "tsv"
    else:
        raise SourceError(
            f"{path}, line {number}: the line is neither a JSON object nor tab-separated, "
            f"so the format of the file is unknown. Pass {ACCEPTED_FORMS}."
        )
    logger.info("%s: reading as %s, detected from its first line", path, file_format)
    return file_format


# ---------------------------------------------------------------------------
# BEIR folders


def _beir_corpus_path(folder: Path) -> Path:
    candidates = [folder / "corpus.jsonl", folder / "corpus.jsonl.gz"]
    present = [candidate for candidate in candidates if candidate.is_file()]
    if not present:
        raise SourceError(
            f"{folder} has no corpus.jsonl or corpus.jsonl.gz. A BEIR folder needs one of them."
        )
    if len(present) > 1:
        raise SourceError(
            f"{folder} has both corpus.jsonl and corpus.jsonl.gz, so the corpus is ambiguous. "
            "Remove one of them."
        )
    return present[0]


def _beir_queries_path(folder: Path) -> Path:
    path = folder / "queries.jsonl"
    if not path.is_file():
        raise SourceError(f"{folder} has no queries.jsonl. A BEIR folder needs it for queries.")
    return path


def _beir_qrels_path(folder: Path, split: str) -> Path | None:
    """Return ``qrels/<split>.tsv``, or None when the folder has no qrels folder."""
    if not split or split in (".", "..") or Path(split).name != split:
        raise SourceError(f"invalid split name {split!r}. Pass a name such as 'test' or 'train'.")

    qrels_folder = folder / "qrels"
    if not qrels_folder.is_dir():
        return None

    path = qrels_folder / f"{split}.tsv"
    if not path.is_file():
        splits = sorted(candidate.stem for candidate in qrels_folder.glob("*.tsv"))
        available = ", ".join(repr(name) for name in splits) if splits else "none"
        raise SourceError(
            f"{qrels_folder} has no {split}.tsv, so split {split!r} does not exist. "
            f"Available splits: {available}."
        )
    return path


def _keep_judged_queries(
    queries: list[Query], qrels: dict[str, dict[str, int]], qrels_path: Path
) -> list[Query]:
    judged_queries = [query for query in queries if query.id in qrels]
    logger.info(
        "%s: kept %d queries judged in %s, left out %d of the file's %d queries",
        qrels_path.parent.parent / "queries.jsonl",
        len(judged_queries),
        qrels_path,
        len(queries) - len(judged_queries),
        len(queries),
    )

    query_ids = {query.id for query in queries}
    unknown = [query_id for query_id in qrels if query_id not in query_ids]
    if unknown:
        logger.warning(
            "%s judges %d query ids that are missing from queries.jsonl, for example %s. "
            "Evaluation counts them as missing queries",
            qrels_path,
            len(unknown),
            ", ".join(repr(query_id) for query_id in unknown[:5]),
        )
    return judged_queries


# ---------------------------------------------------------------------------
# Documents and queries in files


def _open_file_documents(path: Path, description: str) -> DocumentSource:
    file_format = _file_format(path)
    if file_format == "jsonl":
        return DocumentSource(
            description,
            lambda: _iter_jsonl_documents(path),
            lambda: _count_data_lines(path, has_header=False),
        )

    def count_tsv_documents() -> int:
        first = _first_line(path)
        has_header = first is not None and _is_tsv_header(first[1].split("\t"))
        return _count_data_lines(path, has_header)

    return DocumentSource(description, lambda: _iter_tsv_documents(path), count_tsv_documents)


def _iter_jsonl_documents(path: Path) -> Iterator[Document]:
    for number, line in iter_lines(path):
        record = _parse_json_object(path, number, line)
        document_id = _json_id(path, number, record)
        title = _json_string(path, number, record, "title", document_id)
        text = _json_text(path, number, record, document_id)
        yield Document(document_id, title, text)


def _iter_tsv_documents(path: Path) -> Iterator[Document]:
    for number, fields in _iter_tsv_records(path, allowed_columns=(2, 3), kind="document"):
        document_id = _tsv_id(path, number, fields[0])
        if len(fields) == 2:
            yield Document(document_id, "", fields[1])
        else:
            yield Document(document_id, fields[1], fields[2])


def _read_query_file(path: Path) -> list[Query]:
    if _file_format(path) == "jsonl":
        records = _iter_jsonl_queries(path)
    else:
        records = _iter_tsv_queries(path)

    queries: list[Query] = []
    first_lines: dict[str, int] = {}
    for number, query in records:
        if query.id in first_lines:
            raise SourceError(
                f"{path}, line {number}: query id {query.id!r} repeats line "
                f"{first_lines[query.id]}. Give each query a unique id or remove the duplicate."
            )
        first_lines[query.id] = number
        queries.append(query)
    return queries


def _iter_jsonl_queries(path: Path) -> Iterator[tuple[int, Query]]:
    for number, line in iter_lines(path):
        record = _parse_json_object(path, number, line)
        query_id = _json_id(path, number, record)
        yield number, Query(query_id, _json_query_text(path, number, record, query_id))


def _iter_tsv_queries(path: Path) -> Iterator[tuple[int, Query]]:
    for number, fields in _iter_tsv_records(path, allowed_columns=(2,), kind="query"):
        query_id = _tsv_id(path, number, fields[0])
        if not fields[1].strip():
            raise SourceError(
                f"{path}, line {number}: query {query_id!r} has an empty text in the second "
                "column. Write the query text after the tab, or remove the line."
            )
        yield number, Query(query_id, fields[1])


def _iter_tsv_records(
    path: Path, allowed_columns: tuple[int, ...], kind: str
) -> Iterator[tuple[int, list[str]]]:
    """Yield the tab-separated fields of each line after an optional header.

    The first record fixes the number of columns, and every later line must match it.
    """
    columns: int | None = None
    first_number = 0
    for number, line in iter_lines(path):
        fields = line.split("\t")
        if columns is None:
            if len(fields) not in allowed_columns:
                raise SourceError(_tsv_columns_message(path, number, kind, allowed_columns, fields))
            columns = len(fields)
            first_number = number
            if _is_tsv_header(fields):
                logger.info("%s, line %d: skipping the header line", path, number)
                continue
        elif len(fields) != columns:
            raise SourceError(
                f"{path}, line {number}: expected {columns} tab-separated columns as on line "
                f"{first_number}, found {len(fields)}. A tab inside a title or text adds a "
                "column, so replace such tabs with spaces."
            )
        yield number, fields


def _tsv_columns_message(
    path: Path, number: int, kind: str, allowed_columns: tuple[int, ...], fields: list[str]
) -> str:
    layouts = {2: "id<TAB>text", 3: "id<TAB>title<TAB>text"}
    expected = " or ".join(layouts[columns] for columns in allowed_columns)
    return (
        f"{path}, line {number}: a {kind} line needs {expected}, found {len(fields)} "
        "tab-separated columns. Fix the line, and replace tabs inside a title or text with spaces."
    )


def _is_tsv_header(fields: list[str]) -> bool:
    names = [field.strip().lower() for field in fields]
    return names[0] in _TSV_ID_HEADERS and all(name in _TSV_FIELD_HEADERS for name in names[1:])


def _tsv_id(path: Path, number: int, field: str) -> str:
    identifier = field.strip()
    if not identifier:
        raise SourceError(f"{path}, line {number}: missing id in the first column. Add the id.")
    return identifier


# ---------------------------------------------------------------------------
# JSON records


def _parse_json_object(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise SourceError(
            f"{path}, line {number}: invalid JSON ({error.msg} at column {error.colno}). "
            "Each line must contain one complete JSON object. Fix or remove the line."
        ) from None
    if not isinstance(record, dict):
        raise SourceError(
            f"{path}, line {number}: expected a JSON object, found {type(record).__name__}. "
            'Write one object per line, such as {"_id": "d1", "text": "..."}.'
        )
    return record


def _json_id(path: Path, number: int, record: dict[str, Any]) -> str:
    """Return the record's id from the first key of JSON_ID_KEYS with a non-null value.

    A string id is kept exactly. A JSON integer becomes ``str(int)``, because the original
    text (such as leading zeros) is lost once the line is parsed. A float id raises
    SourceError, because its text cannot be recovered exactly either.
    """
    for key in JSON_ID_KEYS:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, float):
            raise SourceError(
                f"{path}, line {number}: id {value!r} in key {key!r} is a JSON number with a "
                "fraction or exponent, so its original text cannot be kept. "
                "Write ids as JSON strings."
            )
        raise SourceError(
            f"{path}, line {number}: invalid id {value!r} in key {key!r}. "
            "Write the id as a non-empty JSON string."
        )
    raise SourceError(
        f"{path}, line {number}: missing id. Give the record one of the keys "
        f"{', '.join(JSON_ID_KEYS)} with a non-empty string value."
    )


def _json_text(path: Path, number: int, record: dict[str, Any], record_id: str) -> str:
    """Return the first non-null text key of JSON_TEXT_KEYS, or "" when there is none."""
    for key in JSON_TEXT_KEYS:
        if record.get(key) is not None:
            return _json_string(path, number, record, key, record_id)
    return ""


def _json_query_text(path: Path, number: int, record: dict[str, Any], query_id: str) -> str:
    """Return the text under the first key of JSON_QUERY_TEXT_KEYS with a non-null value.

    Raises SourceError naming the keys found and the accepted keys when no such key exists or
    its text is empty or blank, since an empty query would silently find nothing.
    """
    found = ", ".join(repr(key) for key in record)
    accepted = ", ".join(repr(key) for key in JSON_QUERY_TEXT_KEYS)
    for key in JSON_QUERY_TEXT_KEYS:
        if record.get(key) is None:
            continue
        text = _json_string(path, number, record, key, query_id)
        if not text.strip():
            raise SourceError(
                f"{path}, line {number}: query {query_id!r} has an empty text in key {key!r} "
                f"(keys found: {found}). Write the query text under one of {accepted}, or "
                "remove the line."
            )
        return text
    raise SourceError(
        f"{path}, line {number}: query {query_id!r} has no text: none of the accepted keys "
        f"{accepted} holds a string (keys found: {found}). Put the query text under one of "
        "them."
    )


def _json_string(path: Path, number: int, record: dict[str, Any], key: str, record_id: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SourceError(
            f"{path}, line {number}: field {key!r} of id {record_id!r} is "
            f"{type(value).__name__}, not a string. Write it as a JSON string."
        )
    return value


# ---------------------------------------------------------------------------
# Qrels files


def _read_qrels_file(path: Path) -> dict[str, dict[str, int]]:
    """Read a BEIR TSV (3 columns, optional header) or TREC (4 columns) qrels file.

    The first line decides the format by its number of columns. Three tab-separated
    columns are BEIR, four whitespace-separated columns are TREC
    ``qid iteration docid relevance``, and three whitespace-separated columns are read
    like BEIR.
    """
    return _collect_qrels(_iter_qrels_rows(path), str(path))


def _iter_qrels_rows(path: Path) -> Iterator[tuple[str, str, int]]:
    separator: str | None = None
    columns = 0
    for number, line in iter_lines(path):
        if columns == 0:
            separator, columns = _qrels_layout(path, number, line)
            if columns == 3 and not _is_integer(line.split(separator)[2].strip()):
                logger.debug("%s, line %d: skipping the header line", path, number)
                continue
        yield _parse_qrels_line(path, number, line, separator, columns)


def _qrels_layout(path: Path, number: int, line: str) -> tuple[str | None, int]:
    if len(line.split("\t")) == 3:
        return "\t", 3
    columns = len(line.split())
    if columns in (3, 4):
        return None, columns
    raise SourceError(
        f"{path}, line {number}: found {columns} columns, so this is neither BEIR qrels "
        "(query-id<TAB>corpus-id<TAB>score) nor TREC qrels (qid iteration docid relevance). "
        "Convert the file to one of these formats."
    )


def _parse_qrels_line(
    path: Path, number: int, line: str, separator: str | None, columns: int
) -> tuple[str, str, int]:
    fields = [field.strip() for field in line.split(separator)]
    if len(fields) != columns:
        layout = "query-id corpus-id score" if columns == 3 else "qid iteration docid relevance"
        raise SourceError(
            f"{path}, line {number}: expected {columns} columns ({layout}) as on the first "
            f"line, found {len(fields)}. Fix the line."
        )
    if columns == 3:
        query_id, document_id, relevance_text = fields
    else:
        query_id, _iteration, document_id, relevance_text = fields
    if not query_id or not document_id:
        raise SourceError(f"{path}, line {number}: missing query id or document id. Fix the line.")
    if not _is_integer(relevance_text):
        raise SourceError(
            f"{path}, line {number}: relevance {relevance_text!r} of query {query_id!r} and "
            f"document {document_id!r} is not an integer. Write relevance as an integer."
        )
    return query_id, document_id, int(relevance_text)


def _is_integer(text: str) -> bool:
    """Return whether text is a base-10 integer in ASCII digits, with an optional sign."""
    return _INTEGER.fullmatch(text) is not None


def _warn_collapsed(source: object, collapsed: int) -> None:
    if collapsed:
        logger.warning(
            "%s: %d judgments repeat an earlier (query id, document id) pair. "
            "Kept the maximum relevance of each pair",
            source,
            collapsed,
        )


# ---------------------------------------------------------------------------
# ir_datasets


def _load_irds(dataset_id: str) -> Any:
    import ir_datasets  # imported here because importing it is slow

    try:
        return ir_datasets.load(dataset_id)
    except KeyError:
        raise SourceError(
            f"ir_datasets has no dataset {dataset_id!r}. Check the id in the ir_datasets "
            "catalogue, for example irds:beir/scifact/test."
        ) from None


def _require_irds_part(dataset: Any, dataset_id: str, part: str) -> None:
    if not getattr(dataset, f"has_{part}")():
        raise SourceError(
            f"ir_datasets dataset {dataset_id!r} has no {part}. Pass an id that has them, "
            "such as a split id like irds:beir/scifact/test."
        )


def _open_irds_documents(dataset_id: str) -> DocumentSource:
    dataset = _load_irds(dataset_id)
    _require_irds_part(dataset, dataset_id, "docs")

    def iterate() -> Iterator[Document]:
        for doc in dataset.docs_iter():
            yield _irds_document(dataset_id, doc)

    def count_documents() -> int | None:
        docs_count = getattr(dataset, "docs_count", None)
        return docs_count() if docs_count is not None else None

    return DocumentSource(f"ir_datasets {dataset_id}", iterate, count_documents)


def _irds_document(dataset_id: str, doc: Any) -> Document:
    document_id = str(doc.doc_id)
    title = _irds_string(dataset_id, document_id, "title", getattr(doc, "title", None))
    if hasattr(doc, "text"):
        text = _irds_string(dataset_id, document_id, "text", doc.text)
    elif hasattr(doc, "default_text"):
        # NOTE: for some ir_datasets document types default_text() already contains the
        # title, so full_text() repeats it.
        text = doc.default_text()
    else:
        raise SourceError(
            f"ir_datasets dataset {dataset_id!r}: document {document_id!r} "
            f"({type(doc).__name__}) has neither text nor default_text(). "
            "Use a dataset whose documents have text."
        )
    return Document(document_id, title, text)


def _irds_string(dataset_id: str, record_id: str, field: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SourceError(
            f"ir_datasets dataset {dataset_id!r}: field {field!r} of id {record_id!r} is "
            f"{type(value).__name__}, not a string. Use a dataset with text fields."
        )
    return value


def _read_irds_queries(dataset_id: str) -> list[Query]:
    dataset = _load_irds(dataset_id)
    _require_irds_part(dataset, dataset_id, "queries")

    queries: list[Query] = []
    positions: dict[str, int] = {}
    for position, query in enumerate(dataset.queries_iter(), start=1):
        query_id = str(query.query_id)
        if query_id in positions:
            raise SourceError(
                f"ir_datasets dataset {dataset_id!r}: query id {query_id!r} appears at "
                f"positions {positions[query_id]} and {position}. Use a dataset with unique "
                "query ids."
            )
        positions[query_id] = position
        if hasattr(query, "text"):
            text = _irds_string(dataset_id, query_id, "text", query.text)
        else:
            text = query.default_text()
        queries.append(Query(query_id, text))
    return queries


def _read_irds_qrels(dataset_id: str) -> dict[str, dict[str, int]]:
    dataset = _load_irds(dataset_id)
    _require_irds_part(dataset, dataset_id, "qrels")
    return _collect_qrels(
        ((str(row.query_id), str(row.doc_id), int(row.relevance)) for row in dataset.qrels_iter()),
        f"ir_datasets {dataset_id}",
    )


def _collect_qrels(rows: Iterable[tuple[str, str, int]], source: str) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    collapsed = 0
    for query_id, document_id, relevance in rows:
        judgments = qrels.setdefault(query_id, {})
        if document_id in judgments:
            collapsed += 1
            judgments[document_id] = max(judgments[document_id], relevance)
        else:
            judgments[document_id] = relevance
    _warn_collapsed(source, collapsed)
    return qrels
