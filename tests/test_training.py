"""Training: losses, schedule, one real step, exact resumption, shipping as a float16 delta."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from mice_engine.model import DELTA_FILE, MiceModel, ModelError
from mice_engine.training import (
    BiEncoderTeacher,
    PairScorer,
    StateCache,
    TrainingError,
    TrainSettings,
    build_model,
    default_warmup_steps,
    learning_rate_factor,
    listwise_distillation_loss,
    listwise_softmax_loss,
    load_checkpoint,
    margin_mse_loss,
    read_teacher_triples,
    settings_with_preset,
    train,
)

# A small BEIR-layout collection in the tiny backbone's vocabulary.
DOCUMENTS = {
    "d1": "protein gene dna study",
    "d2": "cancer cell blood patients",
    "d3": "wing pressure heat boundary layer",
    "d4": "retrieval information search query document",
    "d5": "index system model data test",
    "d6": "flow high low effect",
    "d7": "gene cancer protein results",
    "d8": "search index query system",
}
QUERIES = {
    "q1": "gene protein",
    "q2": "cancer blood",
    "q3": "boundary layer pressure",
    "q4": "search query retrieval",
    "q5": "index data model",
    "q6": "flow effect",
}
QRELS = {"q1": "d1", "q2": "d2", "q3": "d3", "q4": "d4", "q5": "d5", "q6": "d6"}


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train-collection")
    with open(folder / "corpus.jsonl", "w") as handle:
        handle.writelines(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n" for doc_id, text in DOCUMENTS.items())
    with open(folder / "queries.jsonl", "w") as handle:
        handle.writelines(json.dumps({"_id": query_id, "text": text}) + "\n" for query_id, text in QUERIES.items())
    (folder / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, d in QRELS.items()]
    (folder / "qrels" / "train.tsv").write_text("\n".join(lines) + "\n")
    return folder


def tiny_settings(tiny_backbone, collection, output, **changes) -> TrainSettings:
    values = dict(
        train=str(collection), output=str(output), backbone=str(tiny_backbone), merge_layer=2,
        interaction_layers=2, query_max_length=16, doc_max_length=32, batch_size=2, group_size=3,
        steps=4, learning_rate=1e-3, warmup_steps=1, dev_queries=2, eval_every=2,
        eval_candidates=5, checkpoint_every=2, negatives_depth=5, seed=3,
    )
    values.update(changes)
    return settings_with_preset(None, **values)


# --------------------------------------------------------------------------------------------
# Losses and schedule against hand-computed values
def test_listwise_loss_matches_hand_computation():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    first = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + math.exp(0)))
    second = math.log(3)
    assert listwise_softmax_loss(scores).item() == pytest.approx((first + second) / 2, abs=1e-6)


def test_listwise_loss_needs_a_group():
    with pytest.raises(ValueError, match="group"):
        listwise_softmax_loss(torch.tensor([[1.0], [2.0]]))


def test_margin_mse_matches_hand_computation():
    positive = torch.tensor([3.0, 1.0])
    negative = torch.tensor([1.0, 2.0])
    teacher_positive = torch.tensor([10.0, 4.0])
    teacher_negative = torch.tensor([9.0, 1.0])
    # margins: student (2, -1), teacher (1, 3): squared errors 1 and 16, mean 8.5
    assert margin_mse_loss(positive, negative, teacher_positive, teacher_negative).item() == 8.5


def test_listwise_distillation_matches_hand_computation():
    student = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.2, 0.1], [0.3, 0.3]])
    # Row 1: teacher softmax of (2, 1) at temperature 0.1 against the student's of (1, 0): the
    # same distribution, KL 0. Row 2: both uniform, KL 0. Then a row where they differ.
    assert listwise_distillation_loss(student, teacher, 0.1).item() == pytest.approx(0, abs=1e-6)
    target = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    uniform = [0.5, 0.5]
    expected = sum(t * math.log(t / u) for t, u in zip(target, uniform))
    value = listwise_distillation_loss(torch.zeros(1, 2), torch.tensor([[0.1, 0.0]]), 0.1)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_bi_encoder_teacher_cosine_by_hand(tiny_backbone):
    from transformers import AutoModel, AutoTokenizer

    texts = [DOCUMENTS["d1"], DOCUMENTS["d4"], DOCUMENTS["d6"]]
    teacher = BiEncoderTeacher(str(tiny_backbone), texts, torch.device("cpu"), batch_size=2)
    scores = teacher.scores("gene protein", [2, 0, 2])
    # The same scores built by hand, one text at a time (no padding).
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone))
    model = AutoModel.from_pretrained(str(tiny_backbone)).eval()

    def vector(text):
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        return hidden.mean(0) / hidden.mean(0).norm()

    query = vector("gene protein")
    expected = torch.stack([vector(texts[i]) @ query for i in (2, 0, 2)])
    assert torch.allclose(scores, expected, atol=1e-5)
    assert scores[0] == scores[2]
    assert scores[0] != scores[1]


def test_distilled_run_trains_and_needs_the_listwise_loss(tiny_backbone, collection, tmp_path):
    plain = train(tiny_settings(tiny_backbone, collection, tmp_path / "plain", steps=2,
                                freeze_lower=True, dev_queries=0), progress=False)
    settings = tiny_settings(tiny_backbone, collection, tmp_path / "distilled", steps=2,
                             freeze_lower=True, dev_queries=0, distill_teacher="backbone",
                             distill_weight=2.0)
    distilled = train(settings, progress=False)
    # Same draws and weights at step 0: the distillation term adds a KL divergence (>= 0).
    assert distilled.losses[0] > plain.losses[0]
    saved = MiceModel.load(distilled.output / "model")
    assert saved.config.training["settings"]["distill_teacher"] == "backbone"
    with pytest.raises(TrainingError, match="listwise"):
        settings_with_preset(None, train="x", output="o", loss="margin-mse",
                             teacher="t", distill_teacher="backbone")


def test_learning_rate_warms_up_then_decays_linearly():
    factors = [learning_rate_factor(step, 4, 12) for step in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert factors[8] == pytest.approx(0.5)
    assert factors[11] == pytest.approx(1 / 8)
    assert learning_rate_factor(12, 4, 12) == 0.0


def test_paper_preset_has_the_published_settings():
    settings = settings_with_preset("paper", train="irds:msmarco-passage/train/triples-small",
                                    output="out", teacher_scores="scores.tsv")
    assert (settings.batch_size, settings.steps, settings.learning_rate) == (32, 125_000, 7e-6)
    assert (settings.warmup_steps, settings.weight_decay, settings.max_grad_norm) == (5_000, 0.0, 1.0)
    assert settings.doc_max_length == 512 and settings.loss == "margin-mse"
    assert settings.select_metric == "RR@10" and settings.dev_queries == 500


def test_explicit_values_override_the_preset():
    settings = settings_with_preset("paper", train="x", output="o", teacher_scores="s.tsv",
                                    steps=10, warmup_steps=2)
    assert settings.steps == 10 and settings.learning_rate == 7e-6
    assert settings.warmup_steps == 2


@pytest.mark.parametrize(("steps", "warmup"), [
    (1, 0), (4, 0), (5, 1), (14, 1), (15, 2), (50, 5), (100, 10), (994, 99), (995, 100),
    (1000, 100), (125_000, 100),
])
def test_default_warmup_is_a_tenth_of_the_steps(steps, warmup):
    assert default_warmup_steps(steps) == warmup
    settings = settings_with_preset(None, train="x", output="o", steps=steps)
    assert settings.warmup_steps == warmup
    assert settings.warmup_steps < settings.steps
    assert TrainSettings(train="x", output="o", steps=steps).warmup_steps == warmup


def test_default_settings_keep_a_warmup_of_100():
    settings = settings_with_preset(None, train="x", output="o")
    assert (settings.steps, settings.warmup_steps) == (1000, 100)


@pytest.mark.parametrize(("steps", "warmup"), [
    (None, 60), (600, 60), (61, 60), (60, 6), (30, 3), (4, 0),
])
def test_preset_warmup_is_kept_while_below_the_steps(steps, warmup):
    settings = settings_with_preset("scifact-cpu", train="x", output="o", steps=steps)
    assert settings.warmup_steps == warmup


@pytest.mark.parametrize(("steps", "warmup"), [(10, 10), (10, 50), (1, 1)])
def test_explicit_warmup_not_below_steps_is_rejected(steps, warmup):
    with pytest.raises(TrainingError) as error:
        settings_with_preset(None, train="x", output="o", steps=steps, warmup_steps=warmup)
    message = str(error.value)
    assert f"warmup-steps={warmup}" in message
    assert f"steps={steps}" in message
    assert f"--warmup-steps below {steps}" in message
    with pytest.raises(TrainingError, match=f"warmup-steps={warmup}"):
        settings_with_preset("scifact-cpu", train="x", output="o", steps=steps,
                             warmup_steps=warmup)


@pytest.mark.parametrize("changes, message", [
    ({"architecture": "colbert"}, "architecture 'colbert'"),
    ({"loss": "hinge"}, "loss 'hinge'"),
    ({"group_size": 1}, "group-size=1 is invalid: it must be at least 2"),
    ({"warmup_steps": 50, "steps": 10}, "warmup-steps=50"),
    ({"warmup_steps": -1}, "warmup-steps=-1 is invalid: it must be 0 or more"),
    ({"dev_queries": -1}, "dev-queries=-1 is invalid: it must be 0 or more"),
    ({"batch_size": 0}, "batch-size=0 is invalid: it must be at least 1"),
    ({"steps": 0}, "steps=0 is invalid: it must be at least 1"),
    ({"eval_every": -3}, "eval-every=-3 is invalid: it must be at least 1"),
    ({"merge_layer": 0}, "merge-layer=0 is invalid: it must be at least 1"),
    ({"doc_max_length": 2}, "doc-max-length=2 is invalid: it must be at least 3"),
    ({"learning_rate": 0.0}, "learning-rate=0.0 is invalid: it must be above 0"),
    ({"weight_decay": -0.1}, "weight-decay=-0.1 is invalid: it must be 0 or more"),
    ({"max_grad_norm": 0.0}, "max-grad-norm=0.0 is invalid: it must be above 0"),
    ({"seed": -1}, "seed=-1 is invalid"),
    ({"distill_weight": -1.0}, "distill-weight=-1.0 is invalid: it must be 0 or more"),
    ({"states_from": "idx"}, "--freeze-lower"),
    ({"architecture": "cross-encoder", "freeze_lower": True}, "MICE only"),
    ({"select_metric": "MAP"}, "select-metric 'MAP' is unknown"),
    ({"device": "gpu0"}, "device 'gpu0' is invalid"),
    ({"mask": "mask1"}, "--mask mask1 applies to --architecture cross-encoder"),
    ({"architecture": "cross-encoder", "mask": "mask9"}, "mask 'mask9' is unknown"),
    ({"architecture": "cross-encoder", "mask": "mask3"}, "--mask mask3 needs --mask3-layers"),
    ({"architecture": "cross-encoder", "mask3_layers": 2}, "--mask3-layers 2 applies to"),
    ({"loss": "margin-mse"}, "--loss margin-mse needs teacher scores"),
    ({"loss": "margin-mse", "teacher": "t", "teacher_scores": "s.tsv"}, "pass one"),
    ({"teacher_scores": "s.tsv"}, "--teacher-scores applies to --loss margin-mse"),
])
def test_invalid_settings_name_the_value(changes, message):
    values = {"train": "x", "output": "o", **changes}
    with pytest.raises(TrainingError) as error:
        settings_with_preset(None, **values)
    assert message in str(error.value)


def test_zero_dev_queries_and_zero_warmup_are_valid():
    settings = settings_with_preset(None, train="x", output="o", dev_queries=0, warmup_steps=0,
                                    weight_decay=0.0, distill_weight=0.0, seed=0)
    assert (settings.dev_queries, settings.warmup_steps) == (0, 0)


def test_frozen_margin_mse_rejected_early():
    with pytest.raises(TrainingError) as error:
        settings_with_preset(None, train="x", output="o", loss="margin-mse",
                             teacher_scores="s.tsv", freeze_lower=True)
    message = str(error.value)
    assert "--freeze-lower" in message
    assert "--loss margin-mse" in message
    assert "--train-lower" in message
    # The paper preset trains every layer, and --freeze-lower on top of it is rejected the same.
    with pytest.raises(TrainingError, match="--train-lower"):
        settings_with_preset("paper", train="x", output="o", teacher_scores="s.tsv",
                             freeze_lower=True)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(TrainingError, match="paper, scifact-cpu"):
        settings_with_preset("fast", train="x", output="o")


def test_teacher_file_is_read_and_checked(tmp_path):
    path = tmp_path / "teacher.tsv"
    path.write_text("9.5\t1.25\tgene query\tpositive text\tnegative text\n")
    (triple,) = read_teacher_triples(path)
    assert (triple.teacher_positive, triple.teacher_negative) == (9.5, 1.25)
    assert (triple.query, triple.positive, triple.negative) == (
        "gene query", "positive text", "negative text")
    path.write_text("9.5\t1.25\tonly a query\n")
    with pytest.raises(TrainingError, match="teacher.tsv:1: expected 5"):
        list(read_teacher_triples(path))
    path.write_text("high\t1\tq\tp\tn\n")
    with pytest.raises(TrainingError, match="'high'"):
        list(read_teacher_triples(path))


# --------------------------------------------------------------------------------------------
# Real steps
def _first_batch_loss(model, settings, collection_folder) -> float:
    """Listwise loss, with dropout off, of the batch that the trainer draws at step 0."""
    from mice_engine.training import LabelledCollection

    data = LabelledCollection(str(collection_folder), "train", negatives_depth=5)
    rng = np.random.default_rng([settings.seed, 0])
    chosen = rng.choice(len(data.queries), size=settings.batch_size, replace=False)
    groups = data.draw_groups([int(i) for i in chosen], rng, settings.group_size)
    scorer = PairScorer(model, None, data.texts)
    model.eval()
    with torch.no_grad():
        queries = [data.queries[i][1] for i, rows in groups for _ in rows]
        rows = [row for _, rows in groups for row in rows]
        scores = scorer(queries, rows).view(len(groups), 3)
    return listwise_softmax_loss(scores).item()


def test_one_step_changes_the_weights_and_lowers_the_loss(tiny_backbone, collection, tmp_path):
    # Without dropout the step follows the exact gradient of the loss measured here.
    import shutil

    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_backbone, backbone)
    config = json.loads((backbone / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (backbone / "config.json").write_text(json.dumps(config))
    settings = tiny_settings(backbone, collection, tmp_path / "run", steps=1,
                             batch_size=6, dev_queries=0, learning_rate=1e-4, warmup_steps=0)
    initial = build_model(settings)
    before = _first_batch_loss(initial, settings, collection)
    result = train(settings, progress=False)
    trained = MiceModel.load(result.output / "model")
    after = _first_batch_loss(trained, settings, collection)
    changed = [name for name, tensor in trained.state_dict().items()
               if not torch.equal(tensor, initial.state_dict()[name])]
    assert "scorer.weight" in changed and any(n.startswith("lower_layers.") for n in changed)
    assert after < before
    assert trained.config.trained is True
    assert trained.config.training["settings"]["steps"] == 1


def test_frozen_lower_layers_stay_the_backbone(tiny_backbone, collection, tmp_path):
    settings = tiny_settings(tiny_backbone, collection, tmp_path / "run", steps=2,
                             freeze_lower=True, dev_queries=0)
    initial = build_model(settings)
    result = train(settings, progress=False)
    trained = MiceModel.load(result.output / "model")
    assert trained.weights_sha256(lower_only=True) == initial.weights_sha256(lower_only=True)
    assert not torch.equal(trained.scorer.weight, initial.scorer.weight)


def test_frozen_states_come_from_an_index_with_the_same_lower_layers(
        tiny_backbone, collection, tmp_path):
    from mice_engine.indexing import build_index

    settings = tiny_settings(tiny_backbone, collection, tmp_path / "run", steps=2,
                             freeze_lower=True, dev_queries=2)
    model = build_model(settings)
    build_index(collection, tmp_path / "index", model=model, show_progress=False)
    from_index = tiny_settings(tiny_backbone, collection, tmp_path / "run-index", steps=2,
                               freeze_lower=True, dev_queries=2, states_from=str(tmp_path / "index"))
    computed = train(settings, progress=False)
    read = train(from_index, progress=False)
    # The stored float16 states are the ones the cache computes: same losses, same evaluations.
    assert read.losses == pytest.approx(computed.losses, abs=1e-6)
    assert read.evaluations[-1]["dev"] == pytest.approx(computed.evaluations[-1]["dev"])
    cache = StateCache(model)
    assert cache.documents([0], [DOCUMENTS["d1"]])[0].dtype == np.float16


def test_resumed_run_continues_exactly(tiny_backbone, collection, tmp_path):
    whole = train(tiny_settings(tiny_backbone, collection, tmp_path / "whole"), progress=False)
    settings = tiny_settings(tiny_backbone, collection, tmp_path / "split")
    first = train(settings, progress=False, stop_after=2)  # stops like a crash after step 2
    assert first.steps == 2
    saved = load_checkpoint(tmp_path / "split" / "checkpoint")
    assert saved["step"] == 2
    with pytest.raises(TrainingError, match="--resume"):
        train(settings, progress=False)
    second = train(settings, resume=True, progress=False)
    assert second.steps == 4
    assert first.losses + second.losses == whole.losses
    final = load_checkpoint(tmp_path / "split" / "checkpoint")
    reference = load_checkpoint(tmp_path / "whole" / "checkpoint")
    for name, tensor in reference["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    # Adam's moments and step counts carried over: identical after the same four steps.
    for key, state in reference["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(final["optimizer"]["state"][key][field], value), (key, field)


def test_resume_with_other_settings_is_refused(tiny_backbone, collection, tmp_path):
    train(tiny_settings(tiny_backbone, collection, tmp_path / "run"), progress=False, stop_after=2)
    other = tiny_settings(tiny_backbone, collection, tmp_path / "run", learning_rate=5e-4)
    with pytest.raises(TrainingError, match="learning_rate"):
        train(other, resume=True, progress=False)


def test_best_model_is_selected_on_held_out_queries(tiny_backbone, collection, tmp_path):
    result = train(tiny_settings(tiny_backbone, collection, tmp_path / "run"), progress=False)
    assert [e["step"] for e in result.evaluations] == [2, 4]
    best = max(result.evaluations, key=lambda e: e["dev"]["nDCG@10"])
    assert result.best["value"] == best["dev"]["nDCG@10"]
    saved = MiceModel.load(tmp_path / "run" / "model")
    assert saved.config.training["dev"] == result.best["dev"]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert sum("eval" in r for r in log) == 2


# --------------------------------------------------------------------------------------------
# Shipping a model as its float16 difference from the backbone
def test_delta_round_trip_scores_like_the_full_model(tiny_backbone, collection, tmp_path):
    settings = tiny_settings(tiny_backbone, collection, tmp_path / "run", steps=2,
                             freeze_lower=True, dev_queries=0)
    result = train(settings, progress=False)
    trained = MiceModel.load(result.output / "model")
    summary = trained.save_delta(tmp_path / "delta")
    stored = set(__import__("safetensors").safe_open(
        str(tmp_path / "delta" / DELTA_FILE), framework="pt").keys())
    assert not any(name.startswith(("embeddings.", "lower_layers.")) for name in stored)
    assert "scorer.weight" in stored and summary["tensors"] == len(stored)
    loaded = MiceModel.load(tmp_path / "delta")
    assert loaded.config.trained is True
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=2e-3, rtol=0)
    data_scorer = PairScorer(trained, None, list(DOCUMENTS.values()))
    loaded_scorer = PairScorer(loaded, None, list(DOCUMENTS.values()))
    with torch.no_grad():
        expected = data_scorer(["gene protein"] * 8, list(range(8)))
        actual = loaded_scorer(["gene protein"] * 8, list(range(8)))
    torch.testing.assert_close(actual, expected, atol=1e-2, rtol=0)


def test_delta_on_other_backbone_weights_is_refused(tiny_backbone, collection, tmp_path):
    settings = tiny_settings(tiny_backbone, collection, tmp_path / "run", steps=1, dev_queries=0,
                             warmup_steps=0)
    trained = MiceModel.load(train(settings, progress=False).output / "model")
    trained.save_delta(tmp_path / "delta")
    config = json.loads((tmp_path / "delta" / "mice_config.json").read_text())
    config["head_seed"] = 99  # another initial head: the stored differences no longer apply
    (tmp_path / "delta" / "mice_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="hash differs"):
        MiceModel.load(tmp_path / "delta")


# --------------------------------------------------------------------------------------------
# The command
def test_mice_train_and_export_commands(tiny_backbone, collection, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, [
        "train", str(collection), "-o", str(tmp_path / "run"), "--backbone", str(tiny_backbone),
        "--merge-layer", "2", "--interaction-layers", "2", "--steps", "2", "--batch-size", "2",
        "--group-size", "3", "--dev-queries", "2", "--eval-every", "1", "--eval-candidates", "4",
        "--negatives-depth", "4", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "selected step" in result.output
    # Two steps train without --warmup-steps: the default warm-up is 10% of them, rounded.
    saved = json.loads((tmp_path / "run" / "train_settings.json").read_text())
    assert saved["warmup_steps"] == 0
    assert (tmp_path / "run" / "model" / "mice_config.json").is_file()
    again = runner.invoke(app, ["train", str(collection), "-o", str(tmp_path / "run"),
                                "--backbone", str(tiny_backbone), "--quiet"])
    assert again.exit_code == 2 and "--resume" in again.output
    exported = runner.invoke(app, ["export", str(tmp_path / "run" / "model"),
                                   "-o", str(tmp_path / "shipped")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "shipped" / DELTA_FILE).is_file()
    assert MiceModel.load(tmp_path / "shipped").config.trained


def tiny_command(tiny_backbone, collection, output, *options: str) -> list[str]:
    return ["train", str(collection), "-o", str(output), "--backbone", str(tiny_backbone),
            "--merge-layer", "2", "--interaction-layers", "2", "--batch-size", "2",
            "--group-size", "3", "--dev-queries", "2", "--eval-candidates", "4",
            "--negatives-depth", "4", "--quiet", *options]


@pytest.mark.parametrize(("options", "message"), [
    (["--dev-queries", "-1"], "dev-queries=-1 is invalid: it must be 0 or more"),
    (["--steps", "5", "--warmup-steps", "5"], "--warmup-steps below 5"),
    (["--loss", "margin-mse", "--teacher-scores", "teacher.tsv", "--freeze-lower"],
     "--train-lower"),
    (["--mask", "mask2"], "--architecture cross-encoder"),
])
def test_invalid_train_command_writes_nothing(tiny_backbone, collection, tmp_path, options,
                                              message):
    output = tmp_path / "run"
    result = CliRunner().invoke(app, tiny_command(tiny_backbone, collection, output, *options))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not output.exists()


def test_failed_setup_writes_nothing(tiny_backbone, collection, tmp_path):
    # Each of these fails once the model or the data loads, which is before the output is
    # written to; an existing empty folder stays empty.
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ({"train": str(tmp_path / "missing")}, "missing"),
        ({"dev_queries": len(QUERIES)}, "leaves no training query"),
        ({"loss": "margin-mse", "teacher_scores": str(tmp_path / "none.tsv")}, "none.tsv"),
        ({"freeze_lower": True, "states_from": str(tmp_path / "no-index")}, "no-index"),
    ]
    for changes, message in cases:
        for output in (tmp_path / "run", empty):
            settings = tiny_settings(tiny_backbone, collection, output, **changes)
            with pytest.raises(Exception, match=message):
                train(settings, progress=False)
            assert not (tmp_path / "run").exists(), changes
            assert list(empty.iterdir()) == [], changes


def teacher_lines(count: int) -> list[str]:
    return [f"{9 - i}\t{i}\tgene protein\t{DOCUMENTS['d1']}\t{DOCUMENTS[f'd{i + 2}']}"
            for i in range(count)]


def test_run_failing_before_first_checkpoint_can_run_again(tiny_backbone, collection, tmp_path):
    # Steps 1 and 2 read the first four triples; step 3 reaches the malformed fifth line.
    teacher = tmp_path / "teacher.tsv"
    teacher.write_text("\n".join([*teacher_lines(4), "9\t1\tonly a query"]) + "\n")
    output = tmp_path / "run"
    settings = tiny_settings(tiny_backbone, collection, output, loss="margin-mse",
                             teacher_scores=str(teacher), checkpoint_every=10)
    with pytest.raises(TrainingError, match="teacher.tsv:5"):
        train(settings, progress=False)
    assert not output.exists()

    teacher.write_text("\n".join(teacher_lines(6)) + "\n")
    result = train(settings, progress=False)
    assert result.steps == 4
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4]
    assert json.loads((output / "train_settings.json").read_text())["loss"] == "margin-mse"
    assert load_checkpoint(output / "checkpoint")["step"] == 4


def test_interrupt_before_first_checkpoint_removes_the_run(tiny_backbone, collection, tmp_path,
                                                           monkeypatch):
    from mice_engine import training

    output = tmp_path / "run"
    append_log = training._append_log
    model_at_interrupt = []

    def interrupt_at_step_three(path, record):
        append_log(path, record)
        if record.get("step") == 3:
            model_at_interrupt.append((output / "model" / "mice_config.json").is_file())
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_append_log", interrupt_at_step_three)
    command = tiny_command(tiny_backbone, collection, output, "--steps", "4", "--eval-every", "1",
                           "--checkpoint-every", "10")
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 130, result.output
    assert "nothing to resume" in result.output
    assert model_at_interrupt == [True]
    assert not output.exists()

    monkeypatch.undo()
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    assert (output / "model" / "mice_config.json").is_file()
    assert load_checkpoint(output / "checkpoint")["step"] == 4


def test_interrupt_after_a_checkpoint_keeps_the_run(tiny_backbone, collection, tmp_path,
                                                    monkeypatch):
    from mice_engine import training

    output = tmp_path / "run"
    append_log = training._append_log

    def interrupt_at_step_three(path, record):
        append_log(path, record)
        if record.get("step") == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_append_log", interrupt_at_step_three)
    command = tiny_command(tiny_backbone, collection, output, "--steps", "4",
                           "--checkpoint-every", "2")
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 130, result.output
    assert "--resume" in result.output
    assert load_checkpoint(output / "checkpoint")["step"] == 2
    assert (output / "train_settings.json").is_file()


def test_new_run_replaces_a_stale_log(tiny_backbone, collection, tmp_path):
    # What a run killed before its first checkpoint (no cleanup possible) leaves behind.
    output = tmp_path / "run"
    output.mkdir()
    (output / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    (output / "train_settings.json").write_text("{}\n")
    settings = tiny_settings(tiny_backbone, collection, output, steps=2, dev_queries=0)
    result = train(settings, progress=False)
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [record["loss"] for record in log] == [round(loss, 6) for loss in result.losses]
    assert json.loads((output / "train_settings.json").read_text())["steps"] == 2


def test_training_split_without_judgments_is_a_clear_error(tiny_backbone, collection, tmp_path):
    settings = tiny_settings(tiny_backbone, collection, tmp_path / "run", split="dev")
    with pytest.raises(Exception, match="dev"):
        train(settings, progress=False)


def test_first_stage_feature_learns_a_scale_that_search_applies(tiny_backbone, collection, tmp_path):
    whole = train(tiny_settings(tiny_backbone, collection, tmp_path / "whole",
                                first_stage_feature=True), progress=False)
    settings = tiny_settings(tiny_backbone, collection, tmp_path / "split", first_stage_feature=True)
    train(settings, progress=False, stop_after=2)
    resumed = train(settings, resume=True, progress=False)
    assert resumed.losses == whole.losses[2:]
    saved = MiceModel.load(tmp_path / "split" / "model")
    scale = saved.config.fusion["first_stage_scale"]
    assert saved.config.fusion["mode"] == "sum" and scale != settings.first_stage_scale_init
    assert resumed.best["dev"]["fusion"]["first_stage_scale"] == pytest.approx(scale)


def test_first_stage_feature_excludes_the_blend():
    with pytest.raises(TrainingError, match="choose one"):
        settings_with_preset(None, train="x", output="o", first_stage_feature=True,
                             fuse_first_stage=True)


@pytest.mark.parametrize("freeze_lower", [False, True])
def test_maxsim_blend_is_tuned_with_bm25_and_saved(tiny_backbone, collection, tmp_path,
                                                   freeze_lower):
    from mice_engine.training import LabelledCollection, StateCache, evaluate_reranking

    settings = tiny_settings(tiny_backbone, collection, tmp_path / "run", fuse_first_stage=True,
                             fuse_maxsim=True, freeze_lower=freeze_lower, dev_queries=3)
    result = train(settings, progress=False)
    dev = result.best["dev"]
    fused = dev["fusion"]
    assert fused["first_stage_weight"] >= 0.0
    assert fused["maxsim_weight"] >= 0.0
    assert fused["first_stage_weight"] + fused["maxsim_weight"] <= 1.0 + 1e-9
    assert set(dev["maxsim_alone"]) == {"nDCG@10", "RR@10", "R@5"}
    saved = MiceModel.load(tmp_path / "run" / "model")
    if fused["first_stage_weight"] > 0 or fused["maxsim_weight"] > 0:
        assert saved.config.fusion["first_stage_weight"] == fused["first_stage_weight"]
        assert saved.config.fusion["maxsim_weight"] == fused["maxsim_weight"]

    # The grid with MaxSim contains the grid without it, so its best is at least as good.
    labelled = LabelledCollection(str(collection), "train", negatives_depth=5)
    cache = StateCache(saved) if freeze_lower else None
    scorer = PairScorer(saved, cache, labelled.texts)
    queries = list(range(len(labelled.queries)))
    with_maxsim = evaluate_reranking(scorer, labelled, queries, 5, fusion=True, maxsim=True)
    without = evaluate_reranking(scorer, labelled, queries, 5, fusion=True)
    assert with_maxsim["fusion"]["nDCG@10"] >= without["fusion"]["nDCG@10"]
    assert with_maxsim["nDCG@10"] == without["nDCG@10"]


def test_blend_needs_held_out_queries():
    with pytest.raises(TrainingError, match="--dev-queries is 0; pass --dev-queries 100"):
        settings_with_preset("scifact-cpu", train="x", output="o", dev_queries=0)
    assert not settings_with_preset("scifact-cpu", train="x", output="o", dev_queries=0,
                                    fuse_first_stage=False).fuse_first_stage


def test_maxsim_blend_needs_the_bm25_blend_and_mice():
    with pytest.raises(TrainingError, match="--fuse-maxsim adds a term to the BM25 blend"):
        settings_with_preset(None, train="x", output="o", fuse_maxsim=True)
    with pytest.raises(TrainingError, match="--fuse-maxsim needs the stored states"):
        settings_with_preset(None, train="x", output="o", fuse_first_stage=True,
                             fuse_maxsim=True, architecture="cross-encoder")
    # The preset's MaxSim term follows its blend and its architecture.
    assert settings_with_preset("scifact-cpu", train="x", output="o").fuse_maxsim
    assert not settings_with_preset("scifact-cpu", train="x", output="o",
                                    fuse_first_stage=False).fuse_maxsim
    assert not settings_with_preset("scifact-cpu", train="x", output="o", freeze_lower=False,
                                    architecture="cross-encoder").fuse_maxsim
