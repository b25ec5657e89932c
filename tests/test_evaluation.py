"""Tests for TREC run files and for metrics, checked by hand and against ir_measures."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import pytest

from mice_engine.evaluation import (
    DEFAULT_METRICS,
    Evaluation,
    Run,
    evaluate,
    read_trec_run,
    write_trec_run,
)
from mice_engine.sources import SourceError, read_qrels

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real collections not found at {DATA}")
    return DATA


# ---------------------------------------------------------------------------
# Metrics computed by hand


def test_reciprocal_rank_at_rank_two() -> None:
    run: Run = {"q1": [("d9", 2.0), ("d1", 1.0)]}
    result = evaluate(run, {"q1": {"d1": 1}}, ["RR@10"])
    assert result.metrics["RR@10"] == pytest.approx(0.5, abs=1e-12)


def test_reciprocal_rank_beyond_cutoff() -> None:
    run: Run = {"q1": [(f"x{rank}", 100.0 - rank) for rank in range(10)] + [("d1", 0.0)]}
    result = evaluate(run, {"q1": {"d1": 1}}, ["RR@10"])
    assert result.metrics["RR@10"] == 0.0


def test_ndcg_graded_by_hand() -> None:
    run: Run = {"q1": [("d3", 3.0), ("d2", 2.0), ("d1", 1.0)]}
    qrels = {"q1": {"d1": 3, "d2": 1, "d3": 0}}
    # Gains are the relevance values with a log2(rank + 1) discount, as in trec_eval.
    dcg = 0 / math.log2(2) + 1 / math.log2(3) + 3 / math.log2(4)
    ideal_dcg = 3 / math.log2(2) + 1 / math.log2(3)

    result = evaluate(run, qrels, ["nDCG@10"])

    assert result.metrics["nDCG@10"] == pytest.approx(dcg / ideal_dcg, abs=1e-12)


def test_recall_half_found() -> None:
    run: Run = {"q1": [("d1", 1.0), ("d7", 0.5)]}
    result = evaluate(run, {"q1": {"d1": 1, "d2": 2, "d3": 0}}, ["R@100"])
    assert result.metrics["R@100"] == pytest.approx(0.5, abs=1e-12)


def test_default_metrics() -> None:
    result = evaluate({"q1": [("d1", 1.0)]}, {"q1": {"d1": 1}})
    assert DEFAULT_METRICS == ("nDCG@10", "RR@10", "R@100")
    assert list(result.metrics) == list(DEFAULT_METRICS)
    assert all(value == pytest.approx(1.0) for value in result.metrics.values())


def test_metric_name_kept_as_given() -> None:
    result = evaluate({"q1": [("d1", 1.0)]}, {"q1": {"d1": 1}}, ["nDCG(cutoff=10)", "P@1"])
    assert list(result.metrics) == ["nDCG(cutoff=10)", "P@1"]
    assert list(result.per_query) == ["nDCG(cutoff=10)", "P@1"]


# ---------------------------------------------------------------------------
# Coverage of judged queries


def test_missing_query_counts_zero() -> None:
    run: Run = {"q1": [("d1", 1.0)]}
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}

    result = evaluate(run, qrels, ["RR@10"])

    assert isinstance(result, Evaluation)
    assert result.metrics["RR@10"] == pytest.approx(0.5, abs=1e-12)
    assert result.missing_queries == ["q2"]
    assert result.per_query["RR@10"] == {"q1": 1.0, "q2": 0.0}
    assert result.judged_queries == 2


def test_empty_result_list_counts_missing() -> None:
    result = evaluate(
        {"q1": [("d1", 1.0)], "q2": []}, {"q1": {"d1": 1}, "q2": {"d2": 1}}, ["RR@10"]
    )
    assert result.missing_queries == ["q2"]
    assert result.metrics["RR@10"] == pytest.approx(0.5, abs=1e-12)


def test_missing_query_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mice_engine.evaluation"):
        evaluate({}, {"q1": {"d1": 1}}, ["RR@10"])
    assert "1 of 1 judged queries have no results" in caplog.text


def test_unjudged_queries_ignored() -> None:
    run: Run = {"q1": [("d1", 1.0)], "extra": [("d1", 1.0)], "other": [("d2", 1.0)]}
    result = evaluate(run, {"q1": {"d1": 1}}, ["RR@10"])
    assert result.unjudged_queries == 2
    assert result.metrics["RR@10"] == 1.0
    assert list(result.per_query["RR@10"]) == ["q1"]


def test_query_without_relevant_documents() -> None:
    run: Run = {"q1": [("d1", 1.0)], "q2": [("d2", 1.0)]}
    result = evaluate(run, {"q1": {"d1": 1}, "q2": {"d2": 0}}, ["nDCG@10"])
    assert result.per_query["nDCG@10"]["q2"] == 0.0
    assert result.metrics["nDCG@10"] == pytest.approx(0.5, abs=1e-12)


# ---------------------------------------------------------------------------
# Ranking order


def test_list_order_decides_ties() -> None:
    # With equal scores, the list order is the ranking for every metric provider.
    qrels = {"q1": {"b": 1}}
    tie_first = evaluate({"q1": [("b", 1.0), ("a", 1.0)]}, qrels, ["RR@10", "nDCG@10"])
    tie_second = evaluate({"q1": [("a", 1.0), ("b", 1.0)]}, qrels, ["RR@10", "nDCG@10"])
    assert tie_first.metrics["RR@10"] == 1.0
    assert tie_second.metrics["RR@10"] == 0.5
    assert tie_first.metrics["nDCG@10"] == pytest.approx(1.0)
    assert tie_second.metrics["nDCG@10"] == pytest.approx(1 / math.log2(3))


def test_list_order_overrides_scores() -> None:
    run: Run = {"q1": [("d9", 0.1), ("d1", 0.9)]}
    result = evaluate(run, {"q1": {"d1": 1}}, ["RR@10"])
    assert result.metrics["RR@10"] == 0.5


def test_duplicate_document_in_run_rejected() -> None:
    with pytest.raises(ValueError, match="'d1' twice"):
        evaluate({"q1": [("d1", 2.0), ("d1", 1.0)]}, {"q1": {"d1": 1}})


# ---------------------------------------------------------------------------
# Invalid arguments


def test_unknown_metric_error() -> None:
    with pytest.raises(ValueError) as error:
        evaluate({"q1": [("d1", 1.0)]}, {"q1": {"d1": 1}}, ["nDCG@10", "MAP@wrong"])
    assert "'MAP@wrong'" in str(error.value)
    assert "nDCG@10, RR@10" in str(error.value)


def test_trec_eval_name_rejected() -> None:
    with pytest.raises(ValueError, match="'ndcg_cut_10'"):
        evaluate({"q1": [("d1", 1.0)]}, {"q1": {"d1": 1}}, ["ndcg_cut_10"])


def test_empty_qrels_rejected() -> None:
    with pytest.raises(ValueError, match="qrels are empty"):
        evaluate({"q1": [("d1", 1.0)]}, {})


def test_empty_metrics_rejected() -> None:
    with pytest.raises(ValueError, match="no metrics"):
        evaluate({"q1": [("d1", 1.0)]}, {"q1": {"d1": 1}}, [])


# ---------------------------------------------------------------------------
# Agreement with ir_measures


def synthetic_run(qrels: dict[str, dict[str, int]], seed: int) -> Run:
    """Build a run that ranks judged and random documents by distinct scores for each query."""
    generator = random.Random(seed)
    run: Run = {}
    for query_id, judgments in qrels.items():
        documents = list(judgments) + [f"random-{generator.randrange(10**6)}" for _ in range(40)]
        documents = list(dict.fromkeys(documents))
        generator.shuffle(documents)
        ranked_documents = documents[: generator.randrange(1, len(documents) + 1)]
        run[query_id] = [
            (document_id, 1000.0 - rank) for rank, document_id in enumerate(ranked_documents)
        ]
    return run


def test_matches_ir_measures_cranfield(data_dir: Path) -> None:
    import ir_measures

    qrels = read_qrels(data_dir / "cranfield")
    run = synthetic_run(qrels, seed=7)
    metrics = ["nDCG@10", "RR@10", "R@100", "AP", "P@5"]

    result = evaluate(run, qrels, metrics)
    scores = {query_id: dict(results) for query_id, results in run.items()}
    reference = ir_measures.calc_aggregate(
        [ir_measures.parse_measure(name) for name in metrics], qrels, scores
    )

    assert result.missing_queries == []
    for name in metrics:
        assert result.metrics[name] == pytest.approx(
            reference[ir_measures.parse_measure(name)], abs=1e-9
        ), name


def test_matches_ir_measures_scifact(data_dir: Path) -> None:
    import ir_measures

    qrels = read_qrels(data_dir / "scifact")
    run = synthetic_run(qrels, seed=11)

    result = evaluate(run, qrels)
    scores = {query_id: dict(results) for query_id, results in run.items()}
    reference = ir_measures.calc_aggregate(
        [ir_measures.parse_measure(name) for name in DEFAULT_METRICS], qrels, scores
    )

    for name in DEFAULT_METRICS:
        assert result.metrics[name] == pytest.approx(
            reference[ir_measures.parse_measure(name)], abs=1e-9
        ), name


# ---------------------------------------------------------------------------
# TREC run files


def test_run_round_trip(tmp_path: Path) -> None:
    run: Run = {
        "0012": [("007", 3.5), ("0100", 1.25), ("doc-é", -0.5)],
        "3": [("12", 0.75)],
    }
    path = tmp_path / "run.trec"

    write_trec_run(path, run, "mice")

    assert read_trec_run(path) == run


def test_run_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    write_trec_run(path, {"0012": [("007", 3.5), ("8", 0.1)]}, "mice")
    assert path.read_text(encoding="utf-8") == "0012 Q0 007 1 3.5 mice\n0012 Q0 8 2 0.1 mice\n"


def test_run_score_precision(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    write_trec_run(path, {"q": [("d", 1 / 3)]}, "t")
    assert path.read_text(encoding="utf-8").split()[4] == "0.333333333"


def test_run_query_order_kept(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    write_trec_run(path, {"b": [("d", 1.0)], "a": [("d", 1.0)], "10": [("d", 1.0)]}, "t")
    assert list(read_trec_run(path)) == ["b", "a", "10"]


def test_run_write_leaves_no_temporary(tmp_path: Path) -> None:
    write_trec_run(tmp_path / "run.trec", {"q": [("d", 1.0)]}, "t")
    assert [path.name for path in tmp_path.iterdir()] == ["run.trec"]


def test_run_failed_write_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    path.write_text("old\n", encoding="utf-8")

    with pytest.raises(ValueError):
        write_trec_run(path, {"q1": [("d1", 1.0)], "q2": [("bad id", 1.0)]}, "t")

    assert path.read_text(encoding="utf-8") == "old\n"
    assert [entry.name for entry in tmp_path.iterdir()] == ["run.trec"]


def test_run_tie_break_docid_descending(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    path.write_text(
        "q1 Q0 a 1 1.0 t\nq1 Q0 c 2 1.0 t\nq1 Q0 b 3 1.0 t\nq1 Q0 z 4 0.5 t\nq1 Q0 y 5 2.0 t\n",
        encoding="utf-8",
    )
    ranked = [document_id for document_id, _score in read_trec_run(path)["q1"]]
    assert ranked == ["y", "c", "b", "a", "z"]


def test_run_rank_column_ignored(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 low 1 0.1 t\nq1 Q0 high 2 0.9 t\n", encoding="utf-8")
    assert read_trec_run(path) == {"q1": [("high", 0.9), ("low", 0.1)]}


def test_run_write_warns_on_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mice_engine.evaluation"):
        write_trec_run(tmp_path / "run.trec", {"q1": [("a", 1.0), ("b", 1.0)]}, "t")
    assert "1 queries list results in an order" in caplog.text


def test_run_write_sorted_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mice_engine.evaluation"):
        write_trec_run(tmp_path / "run.trec", {"q1": [("b", 1.0), ("a", 1.0), ("c", 0.5)]}, "t")
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("run", "tag", "value"),
    [
        ({"q 1": [("d1", 1.0)]}, "t", "'q 1'"),
        ({"q1": [("d\t1", 1.0)]}, "t", "'d\\t1'"),
        ({"q1": [("d1", 1.0)]}, "my tag", "'my tag'"),
        ({"q1": [("d1", 1.0)]}, "", "''"),
    ],
)
def test_run_whitespace_rejected(tmp_path: Path, run: Run, tag: str, value: str) -> None:
    with pytest.raises(ValueError) as error:
        write_trec_run(tmp_path / "run.trec", run, tag)
    assert value in str(error.value)


def test_run_non_string_id_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not a string"):
        write_trec_run(tmp_path / "run.trec", {"q1": [(7, 1.0)]}, "t")  # type: ignore[list-item]


def test_run_nan_score_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NaN"):
        write_trec_run(tmp_path / "run.trec", {"q1": [("d1", math.nan)]}, "t")


def test_run_duplicate_write_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="twice"):
        write_trec_run(tmp_path / "run.trec", {"q1": [("d1", 2.0), ("d1", 1.0)]}, "t")


def test_run_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 d1 1 1.0 t\n\nq1 Q0 d2 2 0.5\n", encoding="utf-8")
    with pytest.raises(SourceError) as error:
        read_trec_run(path)
    assert "line 3" in str(error.value)
    assert "found 5" in str(error.value)


def test_run_invalid_score(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 d1 1 high t\n", encoding="utf-8")
    with pytest.raises(SourceError, match="line 1"):
        read_trec_run(path)


@pytest.mark.parametrize("score", ["nan", "inf", "-inf", "1e400"])
def test_run_non_finite_score_read_rejected(tmp_path: Path, score: str) -> None:
    path = tmp_path / "run.trec"
    path.write_text(f"q1 Q0 d1 1 {score} t\n", encoding="utf-8")
    with pytest.raises(SourceError, match=f"score '{score}' .* is not a finite number"):
        read_trec_run(path)


def test_run_invalid_rank(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 d1 first 1.0 t\n", encoding="utf-8")
    with pytest.raises(SourceError, match="rank 'first'"):
        read_trec_run(path)


def test_run_duplicate_pair(tmp_path: Path) -> None:
    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 d1 1 2.0 t\nq2 Q0 d1 1 2.0 t\nq1 Q0 d1 2 1.0 t\n", encoding="utf-8")
    with pytest.raises(SourceError) as error:
        read_trec_run(path)
    assert "line 3" in str(error.value)
    assert "first on line 1" in str(error.value)


def test_run_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="run file not found"):
        read_trec_run(tmp_path / "absent.trec")


def test_run_file_evaluates_like_trec_eval(tmp_path: Path) -> None:
    # A run read from a file is in trec_eval's order, so the pytrec_eval provider agrees
    # with evaluate() even when scores tie.
    import ir_measures

    path = tmp_path / "run.trec"
    path.write_text("q1 Q0 a 1 1.0 t\nq1 Q0 b 2 1.0 t\nq1 Q0 c 3 1.0 t\n", encoding="utf-8")
    qrels = {"q1": {"a": 2, "c": 1}}
    run = read_trec_run(path)

    result = evaluate(run, qrels, ["nDCG@10"])
    reference = ir_measures.calc_aggregate(
        [ir_measures.parse_measure("nDCG@10")], qrels, {"q1": {"a": 1.0, "b": 1.0, "c": 1.0}}
    )

    assert result.metrics["nDCG@10"] == pytest.approx(
        reference[ir_measures.parse_measure("nDCG@10")], abs=1e-12
    )
