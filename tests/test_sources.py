"""Tests for mice_engine.sources on small files written here and on the real collections."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mice_engine.sources import (
    Document,
    DocumentSource,
    Query,
    SourceError,
    open_documents,
    read_qrels,
    read_queries,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
DATA = SHARED / "data"


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real collections not found at {DATA}")
    return DATA


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(record, ensure_ascii=False) for record in records])


def make_beir_folder(root: Path, splits: dict[str, list[str]] | None) -> Path:
    """Write a small BEIR folder with three queries and the given qrels lines per split."""
    root.mkdir()
    write_jsonl(root / "corpus.jsonl", [{"_id": "d1", "title": "T", "text": "one"}])
    write_jsonl(
        root / "queries.jsonl",
        [
            {"_id": "q1", "text": "first"},
            {"_id": "q2", "text": "second"},
            {"_id": "q3", "text": "third"},
        ],
    )
    if splits is not None:
        (root / "qrels").mkdir()
        for split, rows in splits.items():
            write_lines(root / "qrels" / f"{split}.tsv", ["query-id\tcorpus-id\tscore", *rows])
    return root


# ---------------------------------------------------------------------------
# Document and DocumentSource


def test_full_text_joins_title_and_text() -> None:
    assert Document("d", "Title", "body").full_text() == "Title body"


def test_full_text_empty_title() -> None:
    assert Document("d", "", " body ").full_text() == "body"


def test_full_text_empty_text() -> None:
    assert Document("d", " Title ", "").full_text() == "Title"


def test_full_text_both_empty() -> None:
    assert Document("d", "", "").full_text() == ""


def test_document_source_is_reiterable(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "docs.jsonl", [{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}]
    )
    source = open_documents(path)

    first = [document.id for document in source]
    second = [document.id for document in source]

    assert isinstance(source, DocumentSource)
    assert first == ["a", "b"]
    assert second == first


def test_document_source_description_names_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"_id": "a", "text": "x"}])
    assert str(path) in open_documents(path).description


# ---------------------------------------------------------------------------
# Real collections


def test_scifact_document_count(data_dir: Path) -> None:
    assert open_documents(data_dir / "scifact").count() == 5183


def test_scifact_document_iteration(data_dir: Path) -> None:
    documents = list(open_documents(data_dir / "scifact"))
    assert len(documents) == 5183
    assert len({document.id for document in documents}) == 5183
    assert all(isinstance(document.id, str) for document in documents)


def test_scifact_description(data_dir: Path) -> None:
    description = open_documents(data_dir / "scifact").description
    assert description.startswith("BEIR corpus ")
    assert description.endswith("corpus.jsonl.gz")


def test_scifact_test_queries(data_dir: Path) -> None:
    queries = read_queries(data_dir / "scifact")
    assert len(queries) == 300
    assert all(isinstance(query, Query) for query in queries)


def test_scifact_test_queries_match_qrels(data_dir: Path) -> None:
    queries = read_queries(data_dir / "scifact", split="test")
    qrels = read_qrels(data_dir / "scifact", split="test")
    assert {query.id for query in queries} == set(qrels)


def test_scifact_test_qrels(data_dir: Path) -> None:
    qrels = read_qrels(data_dir / "scifact")
    assert len(qrels) == 300
    assert sum(len(judgments) for judgments in qrels.values()) == 339


def test_scifact_train_split(data_dir: Path) -> None:
    queries = read_queries(data_dir / "scifact", split="train")
    qrels = read_qrels(data_dir / "scifact", split="train")
    assert len(queries) == 809
    assert sum(len(judgments) for judgments in qrels.values()) == 919


def test_scifact_split_filter_logged(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mice_engine.sources"):
        read_queries(data_dir / "scifact")
    assert "left out 809 of the file's 1109 queries" in caplog.text


def test_cranfield_graded_qrels(data_dir: Path) -> None:
    qrels = read_qrels(data_dir / "cranfield")
    relevances = [value for judgments in qrels.values() for value in judgments.values()]

    assert len(qrels) == 225
    assert len(relevances) == 1837
    assert set(relevances) == {0, 1, 2, 3, 4}
    assert relevances.count(0) == 225
    assert relevances.count(4) == 128


def test_cranfield_first_judgments(data_dir: Path) -> None:
    judgments = read_qrels(data_dir / "cranfield")["1"]
    assert judgments["184"] == 3
    assert judgments["29"] == 3


def test_cranfield_empty_document_kept(data_dir: Path) -> None:
    documents = {document.id: document for document in open_documents(data_dir / "cranfield")}
    assert len(documents) == 1400
    assert documents["471"].full_text() == ""


def test_cranfield_document_fields(data_dir: Path) -> None:
    first = next(iter(open_documents(data_dir / "cranfield")))
    assert first.id == "1"
    assert first.title.startswith("experimental investigation of the aerodynamics")
    assert first.text.startswith("experimental investigation")


# ---------------------------------------------------------------------------
# Ids and encodings


def test_jsonl_leading_zero_id_kept(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['{"_id": "007", "text": "bond"}'])
    assert [document.id for document in open_documents(path)] == ["007"]


def test_tsv_leading_zero_id_kept(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "queries.tsv", ["007\tlicence to kill", " 0012 \tpadded"])
    assert [query.id for query in read_queries(path)] == ["007", "0012"]


def test_qrels_leading_zero_ids_kept(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qrels.tsv", ["query-id\tcorpus-id\tscore", "007\t0042\t1"])
    assert read_qrels(path) == {"007": {"0042": 1}}


def test_trec_qrels_leading_zero_ids_kept(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qrels.txt", ["007 0 0042 2", "007 0 0043 0"])
    assert read_qrels(path) == {"007": {"0042": 2, "0043": 0}}


def test_json_string_id_kept_exactly(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['{"_id": " 1.50 ", "text": "x"}'])
    assert next(iter(open_documents(path))).id == " 1.50 "


def test_json_integer_id_converted(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['{"_id": 7, "text": "x"}'])
    assert next(iter(open_documents(path))).id == "7"


def test_json_float_id_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['{"_id": 7.0, "text": "x"}'])
    with pytest.raises(SourceError, match="JSON strings"):
        list(open_documents(path))


def test_json_alternative_keys(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['{"docid": "p1", "contents": "passage"}'])
    document = next(iter(open_documents(path)))
    assert document.id == "p1"
    assert document.text == "passage"


def test_non_ascii_ids_and_text(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "docs.jsonl",
        [{"_id": "doc-é", "title": "Café", "text": "naïve"}, {"_id": "文档1", "text": "北京"}],
    )
    documents = list(open_documents(path))
    assert [document.id for document in documents] == ["doc-é", "文档1"]
    assert documents[0].full_text() == "Café naïve"
    assert documents[1].text == "北京"


def test_non_ascii_qrels_ids(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qrels.tsv", ["q-ü\tdoc-é\t1"])
    assert read_qrels(path) == {"q-ü": {"doc-é": 1}}


def test_bom_and_crlf_file(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"_id": "q1", "text": "first"}\r\n\r\n{"_id": "q2", "text": "second"}\r\n'
    )
    assert read_queries(path) == [Query("q1", "first"), Query("q2", "second")]


def test_bom_and_crlf_tsv(tmp_path: Path) -> None:
    path = tmp_path / "docs.tsv"
    path.write_bytes(b"\xef\xbb\xbfd1\ttitle\ttext\r\nd2\tT2\tX2\r\n")
    documents = list(open_documents(path))
    assert documents[0] == Document("d1", "title", "text")
    assert documents[1] == Document("d2", "T2", "X2")


def test_gzip_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.write('{"_id": "a", "title": "A", "text": "alpha"}\n')
        stream.write('{"_id": "b", "text": "beta"}\n')
    source = open_documents(path)
    assert source.count() == 2
    assert list(source) == [Document("a", "A", "alpha"), Document("b", "", "beta")]


def test_gzip_invalid_data(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(b"not gzip at all\n")
    with pytest.raises(SourceError, match="gzip"):
        list(open_documents(path))


def test_gzip_invalid_data_count(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"_id": "a"}\n')[:-6])
    with pytest.raises(SourceError, match="truncated gzip"):
        open_documents(path).count()


def test_invalid_utf8_error(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(SourceError) as error:
        list(open_documents(path))
    assert str(path) in str(error.value)
    assert "line 2" in str(error.value)
    assert "UTF-8" in str(error.value)
    assert "Re-encode" in str(error.value)


# ---------------------------------------------------------------------------
# Record content


def test_null_and_missing_fields_become_empty(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "docs.jsonl",
        ['{"_id": "a", "title": null, "text": null}', '{"_id": "b"}'],
    )
    assert list(open_documents(path)) == [Document("a", "", ""), Document("b", "", "")]


def test_non_string_text_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['{"_id": "a", "text": ["x"]}'])
    with pytest.raises(SourceError, match="line 1"):
        list(open_documents(path))


def test_malformed_json_error(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "docs.jsonl", ['{"_id": "a", "text": "x"}', '{"_id": "b", "text": ']
    )
    with pytest.raises(SourceError) as error:
        list(open_documents(path))
    assert str(path) in str(error.value)
    assert "line 2" in str(error.value)
    assert "invalid JSON" in str(error.value)


def test_json_array_line_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['["a", "x"]'])
    with pytest.raises(SourceError, match="expected a JSON object"):
        list(open_documents(path))


def test_missing_id_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['{"_id": "a"}', '{"text": "no id"}'])
    with pytest.raises(SourceError) as error:
        list(open_documents(path))
    assert "line 2" in str(error.value)
    assert "missing id" in str(error.value)


def test_empty_id_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['{"_id": "", "text": "x"}'])
    with pytest.raises(SourceError, match="line 1"):
        list(open_documents(path))


def test_duplicate_document_ids_yielded(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.jsonl", ['{"_id": "a"}', '{"_id": "a"}'])
    assert [document.id for document in open_documents(path)] == ["a", "a"]


def test_duplicate_query_id_error(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "queries.jsonl",
        [
            '{"_id": "q1", "text": "a"}',
            '{"_id": "q2", "text": "b"}',
            "",
            '{"_id": "q1", "text": "c"}',
        ],
    )
    with pytest.raises(SourceError) as error:
        read_queries(path)
    assert "'q1'" in str(error.value)
    assert "line 4" in str(error.value)
    assert "line 1" in str(error.value)


def test_jsonl_query_text_under_query_key(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "queries.jsonl",
        [{"qid": "q1", "query": "wing flow"}, {"_id": "q2", "contents": "heat"}],
    )
    assert read_queries(path) == [Query("q1", "wing flow"), Query("q2", "heat")]


def test_tsv_query_header_accepted(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "queries.tsv", ["qid\tquery", "q1\twing flow"])
    assert read_queries(path) == [Query("q1", "wing flow")]


@pytest.mark.parametrize(
    ("record", "problem", "found"),
    [
        ({"_id": "q2", "question": "wing flow"}, "has no text", "'_id', 'question'"),
        ({"_id": "q2", "text": None}, "has no text", "'_id', 'text'"),
        ({"_id": "q2", "text": ""}, "empty text in key 'text'", "'_id', 'text'"),
        ({"_id": "q2", "query": "  "}, "empty text in key 'query'", "'_id', 'query'"),
    ],
)
def test_jsonl_query_without_text_rejected(
    tmp_path: Path, record: dict, problem: str, found: str
) -> None:
    path = write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "fine"}, record])
    with pytest.raises(SourceError) as error:
        read_queries(path)
    message = str(error.value)
    assert f"{path}, line 2" in message
    assert "query 'q2'" in message
    assert problem in message
    assert f"keys found: {found}" in message
    assert "'text', 'contents', 'query'" in message


def test_beir_query_without_text_rejected(tmp_path: Path) -> None:
    folder = make_beir_folder(tmp_path / "beir", None)
    with open(folder / "queries.jsonl", "a", encoding="utf-8") as queries:
        queries.write(json.dumps({"_id": "q4", "title": "no text"}) + "\n")
    with pytest.raises(SourceError, match="line 4: query 'q4' has no text"):
        read_queries(folder)


def test_tsv_query_with_empty_text_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "queries.tsv", ["q1\tfine", "q2\t  "])
    with pytest.raises(SourceError) as error:
        read_queries(path)
    message = str(error.value)
    assert f"{path}, line 2" in message
    assert "query 'q2' has an empty text" in message


# ---------------------------------------------------------------------------
# TSV files


def test_tsv_two_columns(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.tsv", ["d1\tfirst text", "d2\tsecond text"])
    source = open_documents(path)
    assert source.count() == 2
    assert list(source) == [Document("d1", "", "first text"), Document("d2", "", "second text")]


def test_tsv_three_columns(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.tsv", ["d1\tTitle\tbody", "d2\t\tno title"])
    assert list(open_documents(path)) == [
        Document("d1", "Title", "body"),
        Document("d2", "", "no title"),
    ]


def test_tsv_quotes_and_escapes_kept_literally(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.tsv", ['d1\t"quoted, text"\tline one\\nline two'])
    assert list(open_documents(path)) == [Document("d1", '"quoted, text"', "line one\\nline two")]


def test_very_long_id_kept(tmp_path: Path) -> None:
    long_id = "x" * 5000 + "-007"
    path = write_jsonl(tmp_path / "docs.jsonl", [{"_id": long_id, "text": "body"}])
    assert [doc.id for doc in open_documents(path)] == [long_id]


def test_tsv_header_skipped(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.tsv", ["id\ttitle\ttext", "d1\tT\tX"])
    source = open_documents(path)
    assert source.count() == 1
    assert list(source) == [Document("d1", "T", "X")]


def test_tsv_wrong_column_count(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.tsv", ["d1\tT\tX", "d2\tT\tX\textra"])
    with pytest.raises(SourceError) as error:
        list(open_documents(path))
    assert str(path) in str(error.value)
    assert "line 2" in str(error.value)
    assert "found 4" in str(error.value)


def test_tsv_single_column_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "docs.tsv", ["just-an-id"])
    with pytest.raises(SourceError, match="line 1"):
        list(open_documents(path))


def test_tsv_queries_three_columns_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "queries.tsv", ["q1\ttext\tmore"])
    with pytest.raises(SourceError, match="id<TAB>text"):
        read_queries(path)


def test_tsv_missing_id_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "queries.tsv", ["q1\tfine", "  \tno id"])
    with pytest.raises(SourceError, match="line 2"):
        read_queries(path)


def test_unknown_extension_detected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "queries.txt", ["q1\tfirst"])
    assert read_queries(path) == [Query("q1", "first")]


# ---------------------------------------------------------------------------
# Qrels


def test_duplicate_qrels_collapsed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_lines(
        tmp_path / "qrels.tsv",
        ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td1\t2", "q1\td1\t0", "q2\td1\t1"],
    )
    with caplog.at_level(logging.WARNING, logger="mice_engine.sources"):
        qrels = read_qrels(path)
    assert qrels == {"q1": {"d1": 2}, "q2": {"d1": 1}}
    assert "2 judgments repeat" in caplog.text


def test_qrels_without_header(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qrels.tsv", ["q1\td1\t1", "q1\td2\t0"])
    assert read_qrels(path) == {"q1": {"d1": 1, "d2": 0}}


def test_trec_qrels_crlf(tmp_path: Path) -> None:
    path = tmp_path / "qrels"
    path.write_bytes(b"q1 0 d1 1\r\nq1 0 d2 -1\r\nq2\tQ0\td3\t3\r\n")
    assert read_qrels(path) == {"q1": {"d1": 1, "d2": -1}, "q2": {"d3": 3}}


def test_qrels_wrong_column_count(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qrels.tsv", ["q1\td1\t1", "q1\td2"])
    with pytest.raises(SourceError, match="line 2"):
        read_qrels(path)


def test_qrels_non_integer_relevance(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qrels.txt", ["q1 0 d1 1", "q1 0 d2 0.5"])
    with pytest.raises(SourceError) as error:
        read_qrels(path)
    assert "line 2" in str(error.value)
    assert "'0.5'" in str(error.value)


def test_qrels_unknown_layout(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "qrels.txt", ["q1 d1"])
    with pytest.raises(SourceError, match="neither BEIR qrels"):
        read_qrels(path)


# ---------------------------------------------------------------------------
# BEIR folders


def test_beir_unknown_split_lists_splits(tmp_path: Path) -> None:
    folder = make_beir_folder(tmp_path / "beir", {"test": ["q1\td1\t1"], "dev": ["q2\td1\t1"]})
    with pytest.raises(SourceError) as error:
        read_queries(folder, split="train")
    assert "'train'" in str(error.value)
    assert "'dev', 'test'" in str(error.value)


def test_beir_unknown_split_qrels(tmp_path: Path) -> None:
    folder = make_beir_folder(tmp_path / "beir", {"test": ["q1\td1\t1"]})
    with pytest.raises(SourceError, match="Available splits: 'test'"):
        read_qrels(folder, split="train")


def test_beir_split_keeps_judged_queries(tmp_path: Path) -> None:
    folder = make_beir_folder(tmp_path / "beir", {"test": ["q3\td1\t1", "q1\td1\t0"]})
    assert [query.id for query in read_queries(folder)] == ["q1", "q3"]


def test_beir_without_qrels_returns_all(tmp_path: Path) -> None:
    folder = make_beir_folder(tmp_path / "beir", None)
    assert [query.id for query in read_queries(folder)] == ["q1", "q2", "q3"]


def test_beir_qrels_without_qrels_folder(tmp_path: Path) -> None:
    folder = make_beir_folder(tmp_path / "beir", None)
    with pytest.raises(SourceError, match="no qrels folder"):
        read_qrels(folder)


def test_beir_split_path_rejected(tmp_path: Path) -> None:
    folder = make_beir_folder(tmp_path / "beir", {"test": ["q1\td1\t1"]})
    with pytest.raises(SourceError, match="invalid split name"):
        read_qrels(folder, split="../test")


def test_beir_two_corpus_files_rejected(tmp_path: Path) -> None:
    folder = make_beir_folder(tmp_path / "beir", None)
    with gzip.open(folder / "corpus.jsonl.gz", "wt", encoding="utf-8") as stream:
        stream.write('{"_id": "d1"}\n')
    with pytest.raises(SourceError, match="Remove one"):
        open_documents(folder)


def test_beir_folder_without_corpus(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(SourceError, match="no corpus.jsonl"):
        open_documents(folder)


def test_missing_path_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(SourceError) as error:
        open_documents(missing)
    assert str(missing) in str(error.value)
    assert "BEIR folder" in str(error.value)
    assert "irds:" in str(error.value)


def test_missing_path_queries_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="source not found"):
        read_queries(tmp_path / "queries.jsonl")


def test_source_error_is_value_error() -> None:
    assert issubclass(SourceError, ValueError)


def test_irds_empty_id_error() -> None:
    with pytest.raises(SourceError, match="no dataset id"):
        open_documents("irds:")


# ---------------------------------------------------------------------------
# ir_datasets

IRDS_SCRIPT = """
import json
from mice_engine.sources import SourceError, open_documents, read_qrels, read_queries

source = open_documents("irds:beir/scifact/test")
result = {
    "count": source.count(),
    "iterated": sum(1 for _ in source),
    "description": source.description,
    "queries": len(read_queries("irds:beir/scifact/test")),
    "qrels": sum(len(j) for j in read_qrels("irds:beir/scifact/test").values()),
}
for bad_id in ("irds:beir/no-such-dataset", "irds:beir"):
    try:
        open_documents(bad_id)
        result[bad_id] = "no error"
    except SourceError as error:
        result[bad_id] = str(error)
print(json.dumps(result))
"""


@pytest.mark.skipif(
    not (SHARED / "ir_datasets").is_dir(), reason=f"ir_datasets archives not found at {SHARED}"
)
def test_irds_scifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "ir_datasets"
    shutil.copytree(SHARED / "ir_datasets", home)
    monkeypatch.setenv("IR_DATASETS_HOME", str(home))

    # ir_datasets reads IR_DATASETS_HOME when it is imported, so the check runs in a new process.
    completed = subprocess.run(
        [sys.executable, "-c", IRDS_SCRIPT],
        check=False,
        cwd=REPO_ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    assert result["count"] == 5183
    assert result["iterated"] == 5183
    assert result["description"] == "ir_datasets beir/scifact/test"
    assert result["queries"] == 300
    assert result["qrels"] == 339
    assert "has no dataset" in result["irds:beir/no-such-dataset"]
    assert "has no docs" in result["irds:beir"]
