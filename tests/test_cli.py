"""The `mice` command end to end on the real ADI collection with the default model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from conftest import REPO, shared_collection
from mice_engine.evaluation import evaluate, read_trec_run
from mice_engine.sources import read_qrels

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def adi_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "adi"
    result = invoke("index", shared_collection("adi"), "--output", folder, "--quiet")
    assert result.exit_code == 0, result.output
    return folder


def test_help_does_not_import_torch():
    code = ("import sys; from cli.main import app; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                               text=True)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("command", [[], ["search"], ["index"], ["train"], ["rerank"]])
def test_help_shows_no_type_for_flags(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "--help" in result.output
    assert "<bool>" not in result.output
    if command:
        assert "<path>" in result.output  # options that take a value keep their type


def test_index_reports_counts_and_size(adi_index):
    result = invoke("info", adi_index)
    manifest = json.loads(result.stdout)
    assert manifest["counts"]["documents"] == 82
    assert manifest["model"]["name"] == "MICE-l3+3"
    # Built with the shipped default: trained, recorded by name so it reloads anywhere.
    assert manifest["model"]["trained"] is True
    assert manifest["model"]["source"] == "default"


@pytest.mark.parametrize(("source", "name"), [
    ("irds:beir/scifact/test", "beir-scifact-test"),
    ("../shared/data/scifact/", "scifact"),
    ("corpus.jsonl.gz", "corpus"),
    ("docs.tsv", "docs"),
])
def test_default_index_name(source, name):
    from cli.main import _default_index_name

    assert _default_index_name(source) == name


def test_index_refuses_existing_folder(adi_index):
    result = invoke("index", shared_collection("adi"), "--output", adi_index, "--quiet")
    assert result.exit_code == 2
    assert "already exists; pass --overwrite" in result.output


def test_index_rejects_resume_with_overwrite(tmp_path):
    result = invoke("index", shared_collection("adi"), "-o", tmp_path / "x", "--resume",
                    "--overwrite")
    assert result.exit_code == 2
    assert "exclude each other" in result.output


def test_search_json_lists_hits_and_trained_flag(adi_index):
    result = invoke("search", adi_index, "computer indexing of documents", "-k", "5",
                    "--format", "json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["hits"]) == 5
    assert payload["model_trained"] is True
    assert payload["system"] == "bm25>mice"
    assert [hit["rank"] for hit in payload["hits"]] == [1, 2, 3, 4, 5]
    assert "untrained" not in result.stderr
    assert "blended with BM25" in result.stderr


def test_search_with_the_untrained_backbone_head_warns(adi_index):
    result = invoke("search", adi_index, "computer indexing of documents", "-k", "5",
                    "--format", "json", "--model", "all-MiniLM-L6-v2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model_trained"] is False
    assert "untrained" in result.stderr


def test_search_query_starting_with_dash(adi_index):
    result = invoke("search", adi_index, "--format", "json", "-k", "3", "--",
                    "-computer indexing")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["query"] == "-computer indexing"


def test_search_text_prints_table(adi_index):
    result = invoke("search", adi_index, "computer indexing", "-k", "3", "--first-stage-only")
    assert result.exit_code == 0, result.output
    assert "BM25: 3 of" in result.stdout
    assert "doc id" in result.stdout
    assert "untrained" not in result.stderr


def test_query_set_run_and_eval_agree_with_api(adi_index, tmp_path):
    adi = shared_collection("adi")
    run_file = tmp_path / "run.trec"
    result = invoke("search", adi_index, "--queries", adi, "--output", run_file, "--quiet",
                    "--timings", tmp_path / "timings.json")
    assert result.exit_code == 0, result.output
    lines = run_file.read_text().splitlines()
    assert len(lines) == 35 * 10
    assert lines[0].split()[1] == "Q0"
    assert lines[0].split()[5] == "mice"
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert len(timings["per_query_seconds"]) == 35
    assert "interaction" in timings["summary_ms"]

    result = invoke("eval", run_file, "--qrels", adi, "--format", "json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    expected = evaluate(read_trec_run(run_file), read_qrels(adi))
    assert payload["metrics"] == expected.metrics
    assert payload["judged_queries"] == 35
    assert set(payload["metrics"]) == {"nDCG@10", "RR@10", "R@100"}


def test_first_stage_run_writes_bm25_tag(adi_index, tmp_path):
    run_file = tmp_path / "bm25.trec"
    result = invoke("search", adi_index, "--queries", shared_collection("adi"), "-o", run_file,
                    "--first-stage-only", "-q")
    assert result.exit_code == 0, result.output
    assert run_file.read_text().splitlines()[0].endswith(" bm25")


def test_rerank_of_a_bm25_run_matches_search(adi_index, tmp_path):
    adi = shared_collection("adi")
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join((adi / "queries.jsonl").read_text().splitlines()[:10]) + "\n")
    bm25_run, search_run = tmp_path / "bm25.trec", tmp_path / "search.trec"
    reranked_run = tmp_path / "reranked.trec"
    depth = ("-k", "20", "--candidates", "20")
    result = invoke("search", adi_index, "--queries", queries, "--first-stage-only", *depth,
                    "-o", bm25_run, "-q")
    assert result.exit_code == 0, result.output
    result = invoke("search", adi_index, "--queries", queries, *depth, "-o", search_run, "-q")
    assert result.exit_code == 0, result.output
    result = invoke("rerank", "--run", bm25_run, "--queries", queries, "--collection", adi,
                    "-o", reranked_run, "--depth", "20")
    assert result.exit_code == 0, result.output
    from mice_engine.model import load_model
    from mice_engine.search import FirstStageBlend

    shipped = FirstStageBlend.for_model(load_model(None))
    assert shipped is not None and shipped.needs_maxsim
    assert f"ranking: {shipped.describe()}" in result.stderr
    # The shipped weight was tuned on 100 candidates per query.
    assert "10 of 10 queries have a candidate count other than 100" in result.stderr

    searched, reranked = read_trec_run(search_run), read_trec_run(reranked_run)
    assert list(reranked) == list(searched)
    # Search reads float16 states from the index and rerank encodes the texts in float32, so
    # the blended scores differ by about 1e-3. Two documents may swap only when search scores
    # them closer than that.
    tolerance = 5e-3
    for query_id, results in searched.items():
        search_scores = dict(results)
        rerank_order = [doc_id for doc_id, _ in reranked[query_id]]
        assert sorted(rerank_order) == sorted(search_scores), query_id
        for doc_id, score in reranked[query_id]:
            assert score == pytest.approx(search_scores[doc_id], abs=tolerance), doc_id
        for position, doc_id in enumerate(rerank_order):
            for later in rerank_order[position + 1:]:
                gap = search_scores[later] - search_scores[doc_id]
                assert gap < tolerance, f"{query_id}: {later} ranks after {doc_id}"


def test_eval_ranks_by_score_not_rank_column(tmp_path):
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 d1 1\nq2 0 d1 1\n")
    run_file = tmp_path / "run.trec"
    # q1 lists its relevant document first but scores it lower; q2 ties two documents, and
    # trec_eval puts the larger id, d2, first. Ranked by score, d1 is second in both.
    run_file.write_text("q1 Q0 d1 1 0.5 x\nq1 Q0 d2 2 0.9 x\n"
                        "q2 Q0 d1 1 0.7 x\nq2 Q0 d2 2 0.7 x\n")
    result = invoke("eval", run_file, "--qrels", qrels, "-m", "RR@10", "--per-query",
                    "--format", "json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["per_query"]["RR@10"] == {"q1": 0.5, "q2": 0.5}
    assert payload["metrics"]["RR@10"] == 0.5


def test_eval_counts_missing_queries(tmp_path):
    adi = shared_collection("adi")
    run_file = tmp_path / "partial.trec"
    run_file.write_text("1 Q0 17 1 3.5 x\n")
    result = invoke("eval", run_file, "--qrels", adi, "-m", "nDCG@10")
    assert result.exit_code == 0, result.output
    assert "missing from the run (counted as 0): 34" in result.stdout


def test_search_needs_output_for_query_set(adi_index):
    result = invoke("search", adi_index, "--queries", shared_collection("adi"))
    assert result.exit_code == 2
    assert "--output" in result.output


def test_search_missing_index_fails_clearly(tmp_path):
    result = invoke("search", tmp_path / "none", "query")
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_eval_unknown_metric_fails_clearly(tmp_path):
    run_file = tmp_path / "run.trec"
    run_file.write_text("1 Q0 17 1 3.5 x\n")
    result = invoke("eval", run_file, "--qrels", shared_collection("adi"), "-m", "nDCG@ten")
    assert result.exit_code == 2
    assert "nDCG@ten" in result.output


def test_interrupted_overwrite_hint_works(tiny_backbone, tmp_path, monkeypatch):
    from mice_engine import indexing
    from mice_engine.check import check_index

    index = tmp_path / "adi"
    staging = tmp_path / ".adi.building"
    command = ["index", shared_collection("adi"), "--output", index, "--model", tiny_backbone,
               "--merge-layer", "2", "--interaction-layers", "2", "--doc-max-length", "64",
               "--chunk-size", "20", "--quiet"]
    assert invoke(*command).exit_code == 0
    manifest_before = (index / "manifest.json").read_bytes()

    real_build_index = indexing.build_index

    def build_and_interrupt(*args, **kwargs):
        committed = []

        def stop(position):
            committed.append(position)
            if len(committed) == 2:
                raise KeyboardInterrupt

        return real_build_index(*args, **kwargs, progress_callback=stop)

    monkeypatch.setattr(indexing, "build_index", build_and_interrupt)
    interrupted = invoke(*command, "--overwrite")
    monkeypatch.undo()
    assert interrupted.exit_code == 130
    assert f"interrupted: the index at {index} is intact and still usable" in interrupted.output
    assert f"2 committed shards, is in {staging}" in interrupted.output
    assert "rerun the same command with --resume in place of --overwrite" in interrupted.output
    assert f"rm -r {staging}" in interrupted.output
    assert (index / "manifest.json").read_bytes() == manifest_before
    assert check_index(index).problems == []
    assert len(list((staging / "shards").glob("part-*.h5"))) == 2

    resumed = invoke(*command, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert not staging.exists()
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["build"]["resumed_after_shards"] == 2
    assert manifest["content_sha256"] == json.loads(manifest_before)["content_sha256"]
    assert check_index(index).problems == []


def test_search_notes_cut_query_and_depth(adi_index):
    long_query = " ".join(["information retrieval of documents"] * 40)
    result = invoke("search", adi_index, long_query, "-k", "5", "--candidates", "20")
    assert result.exit_code == 0, result.output
    assert "note: the query was cut to 64 tokens for MICE" in result.stderr
    assert "note: --candidates is 20, but the blend weights were tuned on 100" in result.stderr
    result = invoke("search", adi_index, "information retrieval", "-k", "5")
    assert result.exit_code == 0, result.output
    assert "note:" not in result.stderr
