"""`mice bench`: suite files, statistics, arithmetic counts, and the smoke suite end to end."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, shared_collection
from typer.testing import CliRunner

from cli.main import app
from mice_engine.bench import BenchError, check_suite, load_suite
from mice_engine.bench.stats import (
    paired_t_test,
    percentiles_ms,
    randomization_test,
    regularized_incomplete_beta,
    student_t_two_sided_p,
)
from mice_engine.bench.suite import parse_suite
from mice_engine.evaluation import read_trec_run
from mice_engine.search import length_batches

SUITES = REPO / "benchmarks" / "suites"
SMOKE = SUITES / "smoke.toml"
runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# Statistics

# Two-sided 5% and 1% critical values of Student's t, from standard tables.
T_TABLE = [
    (1, 12.706204736, 0.05), (5, 2.570581836, 0.05), (10, 2.228138852, 0.05),
    (30, 2.042272456, 0.05), (100, 1.983971519, 0.05), (10, 3.169272673, 0.01),
    (299, 2.592371884, 0.01),
]


@pytest.mark.parametrize(("df", "t", "p"), T_TABLE)
def test_t_p_values_match_t_table(df, t, p):
    assert student_t_two_sided_p(t, df) == pytest.approx(p, rel=1e-5)
    assert student_t_two_sided_p(-t, df) == pytest.approx(p, rel=1e-5)


def test_incomplete_beta_closed_forms():
    for x in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        assert regularized_incomplete_beta(1.0, 1.0, x) == pytest.approx(x, abs=1e-12)
        assert regularized_incomplete_beta(3.0, 1.0, x) == pytest.approx(x**3, abs=1e-12)
        assert regularized_incomplete_beta(1.0, 4.0, x) == pytest.approx(1 - (1 - x) ** 4,
                                                                        abs=1e-12)
    for a in (0.5, 2.0, 37.5, 400.0):
        assert regularized_incomplete_beta(a, a, 0.5) == pytest.approx(0.5, abs=1e-10)


def test_incomplete_beta_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="positive"):
        regularized_incomplete_beta(0.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        regularized_incomplete_beta(1.0, 1.0, 1.5)


def test_paired_t_test_equals_scipy():
    stats = pytest.importorskip("scipy.stats")
    generator = np.random.default_rng(3)
    for count in (2, 5, 40, 300):
        baseline = generator.random(count)
        system = baseline + generator.normal(0.02, 0.1, count)
        ours = paired_t_test(system, baseline)
        expected = stats.ttest_rel(system, baseline)
        assert ours["n"] == count
        assert ours["t"] == pytest.approx(expected.statistic, rel=1e-9)
        assert ours["p_value"] == pytest.approx(expected.pvalue, rel=1e-7, abs=1e-12)


def test_paired_t_test_by_hand():
    # Differences 1, 2, 3: mean 2, sample deviation 1, t = 2 / (1 / sqrt(3)) = 2 sqrt(3).
    result = paired_t_test([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert result["mean_difference"] == pytest.approx(2.0)
    assert result["t"] == pytest.approx(2 * math.sqrt(3))
    assert result["degrees_of_freedom"] == 2
    # For 2 degrees of freedom, P(|T| >= t) = 1 - t / sqrt(t^2 + 2).
    t = 2 * math.sqrt(3)
    assert result["p_value"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-10)


def test_paired_t_test_degenerate_cases():
    same = paired_t_test([0.3, 0.5, 0.9], [0.3, 0.5, 0.9])
    assert same["t"] == 0.0
    assert same["p_value"] == 1.0
    shifted = paired_t_test([0.5, 0.75, 1.0], [0.25, 0.5, 0.75])
    assert shifted["p_value"] == 0.0
    single = paired_t_test([0.4], [0.3])
    assert single["p_value"] is None
    with pytest.raises(ValueError, match="as many values"):
        paired_t_test([0.1, 0.2], [0.1])


def test_randomization_test_is_seeded():
    generator = np.random.default_rng(5)
    baseline = generator.random(30)
    system = baseline + generator.normal(0.01, 0.1, 30)
    first = randomization_test(system, baseline, trials=2000, seed=7)
    again = randomization_test(system, baseline, trials=2000, seed=7)
    assert first["p_value"] == again["p_value"]
    assert 0 < first["p_value"] <= 1


def test_randomization_test_extremes():
    baseline = np.linspace(0, 1, 20)
    strong = randomization_test(baseline + 0.5, baseline, trials=999, seed=0)
    # Only the identity sign pattern (and its mirror) reaches the observed sum.
    assert strong["p_value"] == pytest.approx(1 / 1000)
    none = randomization_test(baseline, baseline, trials=999, seed=0)
    assert none["p_value"] == 1.0


def test_percentiles_are_ordered():
    values = percentiles_ms([random.Random(1).random() for _ in range(500)])
    assert values["p50"] <= values["p95"] <= values["p99"] <= values["max"]
    assert values["count"] == 500
    with pytest.raises(ValueError, match="no durations"):
        percentiles_ms([])


# ---------------------------------------------------------------------------------------------
# Batching by length


@pytest.mark.parametrize("seed", range(5))
def test_length_batches_bound_padding(seed):
    generator = np.random.default_rng(seed)
    lengths = generator.integers(1, 513, size=int(generator.integers(1, 300)))
    batches = length_batches(lengths, 64, max_padding=0.1)
    positions = np.concatenate(batches)
    assert sorted(positions.tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= 64
        padded = len(batch) * lengths[batch].max()
        assert len(batch) == 1 or padded <= 1.1 * lengths[batch].sum()
    widths = [lengths[batch].max() for batch in batches]
    assert widths == sorted(widths, reverse=True)


# ---------------------------------------------------------------------------------------------
# Suite files

MINIMAL = {
    "name": "mini",
    "collections": [{"name": "adi", "source": "irds:adi"}],
    "systems": [{"name": "bm25"}, {"name": "bm25>mice", "reranker": "mice"}],
}


def suite_with(**changes):
    values = json.loads(json.dumps(MINIMAL))
    for key, value in changes.items():
        if key.startswith("system_"):
            values["systems"][1][key.removeprefix("system_")] = value
        else:
            values[key] = value
    return values


@pytest.mark.parametrize("path", sorted(SUITES.glob("*.toml")), ids=lambda path: path.name)
def test_suite_files_load(path):
    suite = load_suite(path)
    assert suite.name == path.stem
    assert suite.systems[0].reranker == "none"
    assert {system.reranker for system in suite.systems} >= {"none", "mice", "cross-encoder"}


def test_suite_defaults():
    suite = parse_suite(suite_with())
    assert suite.metrics == ["nDCG@10", "RR@10", "R@100"]
    assert suite.depth == 100
    assert suite.significance == "paired-t"
    assert suite.systems[1].model == "mice"
    assert suite.models == {"mice": "default"}
    assert suite.index_model == "mice"


@pytest.mark.parametrize(("changes", "message"), [
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"name": "a b"}, "name 'a b' is invalid"),
    ({"depth": 0}, "depth must be at least 1"),
    ({"depth": True}, "depth must be an integer"),
    ({"query_order": "shuffled"}, "query_order 'shuffled' is invalid"),
    ({"significance": "wilcoxon"}, "significance 'wilcoxon' is invalid"),
    ({"alpha": 2}, "alpha 2.0 must be between 0 and 1"),
    ({"metrics": []}, "metrics must be a non-empty list"),
    ({"systems": []}, "systems is empty"),
    ({"collections": []}, "collections is empty"),
    ({"system_reranker": "colbert"}, "reranker 'colbert' is invalid"),
    ({"system_first_stage": "splade"}, "first_stage 'splade' is invalid"),
    ({"system_model": "other"}, "model 'other' is not in"),
    ({"system_candidates": 10}, "candidates (10) must be at least the suite's depth (100)"),
    ({"system_max_queries": -1}, "max_queries must be 0"),
    ({"system_name": "bm25"}, "two systems are named 'bm25'"),
    ({"system_candidate": 100}, "unknown key 'candidate'"),
    ({"efficiency": {"bare_forward_documents": -1}},
     "bare_forward_documents must be 0 (no probe) or more, got -1"),
    ({"efficiency": {"interaction_queries": -2}},
     "interaction_queries must be 0 (no probe) or more, got -2"),
    ({"efficiency": {"interaction_candidates": 0}},
     "interaction_candidates must be at least 1, got 0"),
    ({"efficiency": {"matmul_size": -5}}, "matmul_size must be at least 1, got -5"),
])
def test_suite_rejects_invalid_values(changes, message):
    with pytest.raises(BenchError) as error:
        parse_suite(suite_with(**changes))
    assert message in str(error.value)


def test_suite_rejects_compression_without_mice():
    values = suite_with()
    values["systems"][0]["compression"] = "int8"
    with pytest.raises(BenchError, match="only a MICE reranker reads"):
        parse_suite(values)


def test_suite_rejects_model_without_reranker():
    values = suite_with()
    values["systems"][0]["model"] = "mice"
    with pytest.raises(BenchError, match="takes no model"):
        parse_suite(values)


def test_suite_overrides(tmp_path):
    suite = parse_suite(suite_with(), models={"mice": str(tmp_path)},
                        sources={"adi": "irds:cranfield"}, max_queries=7)
    assert suite.models["mice"] == str(tmp_path.resolve())
    assert suite.collections[0].source == "irds:cranfield"
    assert [system.max_queries for system in suite.systems] == [7, 7]
    assert suite.efficiency.interaction_queries == 7
    with pytest.raises(BenchError, match="no collection named"):
        parse_suite(suite_with(), sources={"vaswani": "irds:vaswani"})


def test_system_selection_keeps_suite_order():
    values = suite_with()
    values["systems"].append({"name": "bm25>ce", "reranker": "cross-encoder"})
    suite = parse_suite(values, systems=["bm25>ce", "bm25"])
    assert [system.name for system in suite.systems] == ["bm25", "bm25>ce"]
    with pytest.raises(BenchError, match=r"no system named \['colbert'\]"):
        parse_suite(values, systems=["colbert"])


def test_efficiency_probes_can_be_turned_off():
    suite = parse_suite(suite_with(efficiency={"bare_forward_documents": 0,
                                               "interaction_queries": 0}))
    assert suite.efficiency.bare_forward_documents == 0
    assert suite.efficiency.interaction_queries == 0


def test_negative_max_queries_is_rejected():
    with pytest.raises(BenchError, match="max_queries=-3 is invalid: it must be 0"):
        parse_suite(suite_with(), max_queries=-3)


def test_max_queries_keeps_smaller_system_limits():
    values = suite_with(system_max_queries=3)
    suite = parse_suite(values, max_queries=10)
    assert [system.max_queries for system in suite.systems] == [10, 3]


def test_missing_suite_file_is_reported(tmp_path):
    with pytest.raises(BenchError, match="not found"):
        load_suite(tmp_path / "nothing.toml")
    (tmp_path / "broken.toml").write_text("name = \n")
    with pytest.raises(BenchError, match="not valid TOML"):
        load_suite(tmp_path / "broken.toml")


def test_relative_paths_resolve_against_suite_folder(tmp_path):
    data = tmp_path / "data" / "mini"
    data.mkdir(parents=True)
    folder = tmp_path / "suites"
    folder.mkdir()
    (folder / "mini.toml").write_text(
        'name = "mini"\n[[collections]]\nname = "mini"\nsource = "../data/mini"\n'
        '[[systems]]\nname = "bm25"\n')
    suite = load_suite(folder / "mini.toml")
    assert suite.collections[0].source == str(data.resolve())


def test_suite_rejects_unknown_index_options():
    with pytest.raises(BenchError, match=r"index_options \['shards'\] are unknown"):
        parse_suite(suite_with(system_index_options={"shards": 3}))


def test_check_suite_rejects_unknown_search_options():
    suite = parse_suite(suite_with(system_search_options={"beam": 3}))
    with pytest.raises(BenchError, match=r"search_options \['beam'\] are invalid"):
        check_suite(suite, plots=False)
    suite = parse_suite(suite_with(system_search_options={"first_stage": "dense"}))
    with pytest.raises(BenchError, match="the system's own keys"):
        check_suite(suite, plots=False)
    check_suite(parse_suite(suite_with(system_search_options={"nprobe": 4})), plots=False)


def test_index_chain_shares_steps():
    from mice_engine.bench.indexes import index_chain, index_name

    suite = parse_suite(suite_with())
    plain, mice = suite.systems
    compressed = parse_suite(suite_with(system_compression="int8")).systems[1]
    hybrid = parse_suite(suite_with(system_first_stage="hybrid",
                                    system_compression="ivfpq8")).systems[1]
    assert index_chain("mice", plain) == index_chain("mice", mice) == index_chain("mice")
    assert index_chain("mice", compressed)[:-1] == index_chain("mice")
    chain = index_chain("mice", hybrid)
    assert [sorted(key) for key in chain] == [["build", "model"], ["build", "dense", "model"],
                                              ["build", "codec", "dense", "model"]]
    names = [index_name("adi", key) for key in chain]
    assert len(set(names)) == 3
    assert names[2].startswith("adi-mice-dense-ivfpq8-")


# ---------------------------------------------------------------------------------------------
# Arithmetic counts against PyTorch's own FLOP counter


@pytest.fixture(scope="module")
def tiny_mice(tiny_backbone):
    from mice_engine.model import MiceModel

    return MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                   query_max_length=16, doc_max_length=64, seed=3)


def counted_flops(function) -> int:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The math backend runs attention as plain matrix products, which the counter records.
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(
            display=False) as counter:
        function()
    return counter.get_total_flops()


@pytest.mark.parametrize(("mode", "query_length", "interaction_layers"), [
    ("folded", 6, 2), ("projected", 6, 2), ("auto", 12, 2), ("folded", 5, 1), ("auto", 7, 3),
])
def test_mice_flops_match_flop_counter(tiny_backbone, mode, query_length, interaction_layers):
    import torch

    from mice_engine.bench.flops import mice_interaction_flops
    from mice_engine.model import MiceModel

    model = MiceModel.from_backbone(tiny_backbone, merge_layer=1,
                                    interaction_layers=interaction_layers, query_max_length=16,
                                    doc_max_length=64, seed=3)
    model.cross_attention_mode = mode
    stored = 23
    query = torch.randn(1, query_length, model.hidden_size)
    documents = torch.randn(4, stored, model.hidden_size)
    counted = counted_flops(lambda: model.score_states(
        query, torch.ones(1, query_length), documents, torch.ones(4, stored, dtype=torch.bool)))
    expected = mice_interaction_flops(model, query_length, [stored] * 4)
    assert expected["total"] == counted
    assert expected["per_document"] == pytest.approx(counted / 4)


def test_cross_encoder_flops_match_flop_counter(tiny_backbone):
    import torch

    from mice_engine.bench.flops import cross_encoder_flops
    from mice_engine.cross_encoder import CrossEncoderModel

    model = CrossEncoderModel.from_backbone(tiny_backbone, seed=3)
    cls_id, sep_id = model.tokenizer.cls_token_id, model.tokenizer.sep_token_id
    query = torch.tensor([[cls_id, 7, 8, 9, sep_id]])
    documents = torch.tensor([[cls_id, *range(10, 40), sep_id]] * 3)
    counted = counted_flops(lambda: model(query, torch.ones_like(query), documents,
                                          torch.ones_like(documents)))
    pair_length = query.shape[1] + documents.shape[1] - 1
    expected = cross_encoder_flops(model.backbone_config, model.config.num_layers,
                                   [pair_length] * 3)
    assert expected["total"] == counted


# ---------------------------------------------------------------------------------------------
# The smoke suite end to end

SLICE_DOCUMENTS = 30


@pytest.fixture(scope="module")
def adi_slice(tmp_path_factory) -> Path:
    """The first 30 documents of ADI, the queries judged on them, and those judgments."""
    adi = shared_collection("adi")
    folder = tmp_path_factory.mktemp("adi-slice")
    lines = (adi / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:SLICE_DOCUMENTS]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    kept_ids = {json.loads(line)["_id"] for line in lines}
    qrels = (adi / "qrels" / "test.tsv").read_text().splitlines()
    judged = [line for line in qrels[1:] if line.split("\t")[1] in kept_ids]
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("\n".join([qrels[0], *judged]) + "\n")
    (folder / "queries.jsonl").write_text((adi / "queries.jsonl").read_text(encoding="utf-8"),
                                          encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def smoke(tiny_mice, adi_slice, tmp_path_factory):
    """Run the committed smoke suite through `mice bench` with tiny models on the ADI slice."""
    folder = tmp_path_factory.mktemp("smoke")
    model_folder = tiny_mice.save(folder / "tiny-mice")
    output = folder / "results"
    result = runner.invoke(app, [
        "bench", str(SMOKE), "--output", str(output), "--index-dir", str(folder / "indexes"),
        "--model", f"mice={model_folder}", "--model", "cross-encoder=default",
        "--collection", f"adi={adi_slice}", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    record = json.loads((output / "record.json").read_text())
    return record, output, result.output


def test_smoke_record_lists_every_system_and_metric(smoke):
    record, _, _ = smoke
    suite = load_suite(SMOKE)
    systems = record["collections"]["adi"]["systems"]
    assert list(systems) == [system.name for system in suite.systems]
    for system in systems.values():
        assert set(system["metrics"]) == set(suite.metrics)
        for metric in suite.metrics:
            assert set(system["per_query"][metric]) == set(system["queries"])


def test_smoke_metrics_are_query_means(smoke):
    record, _, _ = smoke
    for system in record["collections"]["adi"]["systems"].values():
        for metric, value in system["metrics"].items():
            per_query = list(system["per_query"][metric].values())
            assert 0.0 <= value <= 1.0
            assert value == pytest.approx(sum(per_query) / len(per_query))


def test_smoke_covers_judged_queries(smoke, adi_slice):
    from mice_engine.sources import read_qrels

    record, _, _ = smoke
    collection = record["collections"]["adi"]
    judged = read_qrels(adi_slice)
    assert collection["judged_queries"] == len(judged)
    systems = collection["systems"]
    assert systems["bm25"]["query_count"] == len(judged)
    assert systems["bm25>mice"]["query_count"] == len(judged)
    assert systems["bm25>ce"]["query_count"] == min(10, len(judged))
    assert systems["bm25>ce"]["queries"] == systems["bm25"]["queries"][:10]


def test_smoke_rerankers_keep_bm25_recall(smoke):
    record, _, _ = smoke
    systems = record["collections"]["adi"]["systems"]
    bm25 = systems["bm25"]["per_query"]["R@100"]
    for name in ("bm25>mice", "bm25>mice-int8", "bm25>ce"):
        for query_id, value in systems[name]["per_query"]["R@100"].items():
            assert value == bm25[query_id], (name, query_id)


def test_smoke_runs_match_record(smoke):
    record, output, _ = smoke
    for name, system in record["collections"]["adi"]["systems"].items():
        run = read_trec_run(output / system["run_file"])
        assert set(run) <= set(system["queries"]), name
        assert len(run) == system["query_count"] - system["queries_without_results"], name
        for results in run.values():
            assert len(results) <= record["suite"]["settings"]["depth"]


def test_smoke_latency_percentiles_are_ordered(smoke):
    record, _, _ = smoke
    for name, system in record["collections"]["adi"]["systems"].items():
        assert "end_to_end" in system["latency_ms"], name
        for stage, values in system["latency_ms"].items():
            assert 0 <= values["p50"] <= values["p95"] <= values["p99"] <= values["max"], stage
            assert values["count"] == system["query_count"]
        assert system["queries_per_second"] > 0
        assert system["peak_rss_mib"] > 0
    mice = record["collections"]["adi"]["systems"]["bm25>mice"]
    assert set(mice["latency_ms"]) >= {"first_stage", "query_encoding", "load_states",
                                       "interaction"}
    assert mice["end_to_end_over_interaction"]["mean"] >= 1.0
    ce = record["collections"]["adi"]["systems"]["bm25>ce"]
    assert set(ce["latency_ms"]) >= {"first_stage", "load_texts", "interaction"}


def test_smoke_index_sizes_are_consistent(smoke):
    from mice_engine.bench.probes import folder_bytes

    record, _, _ = smoke
    collection = record["collections"]["adi"]
    for name, index in collection["indexes"].items():
        assert index["measured_in_this_run"], name
        assert index["documents"] == SLICE_DOCUMENTS, name
        assert index["bytes"] == folder_bytes(Path(index["path"])), name
        assert index["bytes_per_token"] == pytest.approx(index["bytes"] / index["tokens"],
                                                         abs=0.01), name
    index = collection["indexes"][collection["base_index"]]
    assert index["kind"] == "encoded"
    assert index["state_bytes_per_token"] == 2 * 32  # float16, hidden size 32
    assert index["bytes"] > index["states_file_bytes"] > index["tokens"] * 64
    assert index["dense"] is None
    systems = collection["systems"]
    assert systems["bm25>mice"]["index_bytes"] == index["bytes"]
    assert systems["bm25"]["index_bytes"] == index["bm25_bytes"]
    assert systems["bm25>ce"]["index_bytes"] == index["bm25_bytes"] + index["text_bytes"]


def test_smoke_derived_indexes(smoke):
    record, _, _ = smoke
    collection = record["collections"]["adi"]
    indexes, systems = collection["indexes"], collection["systems"]
    base = collection["base_index"]
    assert len(indexes) == 3
    compressed = indexes[systems["bm25>mice-int8"]["index"]]
    assert compressed["kind"] == "derived"
    assert compressed["derived_from"] == base
    assert compressed["compression"] == "int8"
    assert compressed["state_bytes_per_token"] == 32  # one byte per dimension
    assert compressed["codec"]["reconstruction"]
    assert compressed["derive_seconds"] > 0
    assert systems["dense>mice"]["index"] == systems["hybrid>mice"]["index"]
    dense = indexes[systems["dense>mice"]["index"]]
    assert dense["derived_from"] == base
    assert dense["dense"] is not None
    assert dense["dense_bytes"] > 0
    assert dense["state_bytes_per_token"] == 64
    assert systems["dense>mice"]["index_bytes"] == dense["bytes"]


def test_smoke_efficiency_probes_are_recorded(smoke):
    record, _, _ = smoke
    collection = record["collections"]["adi"]
    index = collection["indexes"][collection["base_index"]]
    bare = index["bare_forward"]
    for when in ("before", "after"):
        assert bare[when]["documents"] == SLICE_DOCUMENTS
        assert bare[when]["tokens"] == index["tokens"]
        assert bare[when]["tokens_per_second"] > 0
    # Fractions are recorded to 4 decimals: a small one, on a loaded machine, needs an absolute
    # tolerance for that rounding beside the relative one.
    assert bare["indexing_fraction"] == pytest.approx(
        index["tokens_per_second"] / bare["tokens_per_second"], rel=1e-3, abs=1e-4)
    assert 0 < index["forward_seconds"] < index["encode_seconds"] <= index["build_seconds"]
    assert bare["indexing_fraction_in_build"] == pytest.approx(
        index["forward_seconds"] / index["build_seconds"], rel=1e-3, abs=1e-4)
    assert index["memory"]["peak_rss_mib"] > 0
    for when in ("start", "end"):
        assert record["matmul"][when]["best_gflops"] > 0


def test_smoke_interaction_benchmark(smoke):
    record, _, _ = smoke
    interaction = record["collections"]["adi"]["interaction"]
    assert interaction["query_count"] == 3
    assert interaction["ratio"] == pytest.approx(
        interaction["cross_encoder_seconds"] / interaction["mice_seconds"])
    for row in interaction["queries"]:
        assert row["candidates"] <= 100
        assert row["mice_seconds"] > 0
        assert row["cross_encoder_seconds"] > 0
        assert row["cross_encoder_gflop"] > row["mice_gflop"] > 0
        assert row["pair_tokens"] == row["stored_tokens"] + row["candidates"] * (
            row["query_tokens"] - 1)
    for key in ("mice_gflops", "cross_encoder_gflops", "mice_time_over_arithmetic",
                "cross_encoder_time_over_arithmetic", "arithmetic_ratio"):
        assert math.isfinite(interaction[key]), key
        assert interaction[key] > 0, key
    operators = interaction["profile"]["operators"]
    assert operators and all(operator["self_ms"] >= 0 for operator in operators)


def test_smoke_subset_comparison_uses_same_queries(smoke):
    record, _, _ = smoke
    collection = record["collections"]["adi"]
    systems = collection["systems"]
    (subset,) = collection["subsets"]
    assert subset["query_count"] == systems["bm25>ce"]["query_count"]
    assert subset["ran_by"] == ["bm25>ce"]
    assert set(subset["systems"]) == set(systems)
    first = systems["bm25>ce"]["queries"]
    for name, row in subset["systems"].items():
        values = systems[name]["per_query"]["nDCG@10"]
        assert row["nDCG@10"] == pytest.approx(np.mean([values[query] for query in first]))


def test_smoke_significance_against_first_system(smoke):
    record, _, _ = smoke
    systems = record["collections"]["adi"]["systems"]
    assert "significance" not in systems["bm25"]
    for name in ("bm25>ce", "bm25>mice"):
        test = systems[name]["significance"]
        assert test["against"] == "bm25"
        assert test["queries"] == systems[name]["query_count"]
        for result in test["metrics"].values():
            assert result["n"] == test["queries"]
            assert result["p_value"] is None or 0.0 <= result["p_value"] <= 1.0
    # BM25 > MICE re-orders BM25's own candidates: recall cannot differ.
    recall = systems["bm25>mice"]["significance"]["metrics"]["R@100"]
    assert recall["mean_difference"] == 0.0
    assert recall["p_value"] == 1.0


def test_smoke_record_has_provenance(smoke):
    record, _, _ = smoke
    assert record["format"] == "mice-bench-record"
    assert record["seed"] == 0
    assert record["suite"]["sha256"] == load_suite(SMOKE).sha256
    assert record["versions"]["torch"]
    assert record["hardware"]["logical_cores"] >= 1
    assert "commit" in record["git"]
    assert record["load_average"]["start"] is None or len(record["load_average"]["start"]) == 3
    assert set(record["models"]) == {"mice", "cross-encoder"}


def test_smoke_report_and_plots_exist(smoke):
    record, output, printed = smoke
    report = (output / "report.md").read_text()
    for name in record["collections"]["adi"]["systems"]:
        assert f"| {name} |" in report
        assert f"adi {name} (" in printed
    assert "Speed ratio cross-encoder : MICE" in report
    for plot in ("quality_vs_latency.png", "quality_vs_size.png"):
        data = (output / plot).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 5000
        assert f"]({plot})" in report


def test_bench_refuses_existing_results(smoke):
    _, output, _ = smoke
    result = runner.invoke(app, ["bench", str(SMOKE), "--output", str(output), "--no-plots"])
    assert result.exit_code == 2
    assert "already contains benchmark results; pass --overwrite" in result.output


def test_bench_rejects_invalid_codec_before_writing(tiny_mice, tmp_path):
    model_folder = tiny_mice.save(tmp_path / "model")
    suite = tmp_path / "codec.toml"
    suite.write_text('name = "codec"\n[[collections]]\nname = "adi"\nsource = "irds:adi"\n'
                     '[[systems]]\nname = "pq"\nreranker = "mice"\ncompression = "ivfpq7"\n')
    output = tmp_path / "results"
    result = runner.invoke(app, ["bench", str(suite), "--output", str(output),
                                 "--model", f"mice={model_folder}", "--no-plots"])
    assert result.exit_code == 2
    assert "system 'pq'" in result.output
    assert "ivfpq7" in result.output
    assert not output.exists()


def test_bench_reports_invalid_arguments(tmp_path):
    result = runner.invoke(app, ["bench", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2
    assert "not found" in result.output
    result = runner.invoke(app, ["bench", str(SMOKE), "--model", "mice"])
    assert result.exit_code == 2
    assert "--model 'mice' is invalid; write it as NAME=VALUE" in result.output


def test_system_warm_up_is_not_timed(smoke, tiny_mice, adi_slice, monkeypatch):
    import time

    from mice_engine import encoding
    from mice_engine.bench.suite import SystemSpec
    from mice_engine.bench.systems import run_system
    from mice_engine.search import Searcher
    from mice_engine.sources import read_queries

    record, _, _ = smoke
    collection = record["collections"]["adi"]

    # The first query encoding is slow, as a model's first call is, so the warm-up must absorb it.
    encoded = []
    encode_query = encoding.encode_query

    def slow_first_call(model, text):
        encoded.append(text)
        if len(encoded) == 1:
            time.sleep(1.5)
        return encode_query(model, text)

    monkeypatch.setattr(encoding, "encode_query", slow_first_call)
    queries = read_queries(adi_slice, split="test")[:4]
    searcher = Searcher(collection["indexes"][collection["base_index"]]["path"], model=tiny_mice,
                        device="cpu")
    try:
        outcome = run_system(SystemSpec("bm25>mice", reranker="mice", model="mice"), searcher,
                             queries, 100, device="cpu")
    finally:
        searcher.close()
    assert encoded == [queries[0].text, *[query.text for query in queries]]
    assert len(outcome.timings) == len(queries)
    assert list(outcome.run) == [query.id for query in queries]
    assert outcome.warm_up_seconds >= 1.5
    # A timed encoding of the tiny model takes milliseconds; 1.5 s leaves room for a busy machine.
    assert max(timing["query_encoding"] for timing in outcome.timings) < 1.5
    for name, system in collection["systems"].items():
        assert system["warm_up_seconds"] > 0, name
