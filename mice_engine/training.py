"""Training of MICE models and of the cross-encoder baselines (``mice train``).

Two recipes share one loop:

* **listwise**, for collections with relevance judgments and no teacher: each training query
  contributes one judged-relevant document and ``group_size - 1`` hard negatives drawn from the
  engine's BM25 ranking, and the loss is the softmax cross-entropy of the positive's score
  within its group;
* **margin-mse**, the paper's distillation (Hofstaetter et al., 2020): (query, positive,
  negative) triples with teacher scores, and the loss is the squared difference between the
  student's and the teacher's score margins. Teacher scores come from a file in the published
  MS MARCO layout (``pos_score<TAB>neg_score<TAB>query<TAB>positive<TAB>negative``) or from a
  teacher model run on the fly.

The optimiser is AdamW with linear warm-up and linear decay, gradient clipping and gradient
accumulation; mixed precision (bf16, or fp16 with loss scaling) on GPU and float32 on CPU. The
randomness of step ``s`` (which queries, positives and negatives) comes from a generator seeded
with ``(seed, s)``, so a resumed run draws exactly what the uninterrupted run would have drawn.

With ``freeze_lower`` (MICE only), the embeddings and lower layers keep the backbone's weights:
document states are computed once without gradients (or read from an existing index built with
the same lower layers) and only the interaction layers and the head learn. Indexes built with
the backbone stay valid for the trained model, and training costs a fraction of a full pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .cross_encoder import MASKS
from .encoding import pad, tokenize
from .model import MiceModel, ModelError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "model"
LOG_FILE = "train_log.jsonl"
SETTINGS_FILE = "train_settings.json"
ARCHITECTURES = ("mice", "cross-encoder")
LOSSES = ("listwise", "margin-mse")
# Maximum warm-up, in steps, of a run whose warm-up neither --warmup-steps nor a preset sets.
DEFAULT_WARMUP_STEPS = 100

# Named settings. "paper" is the authors' recipe (MS MARCO triples with teacher margins);
# "scifact-cpu" is the recipe of the model shipped with mice-engine.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "loss": "margin-mse",
        "batch_size": 32,
        "steps": 125_000,
        "learning_rate": 7e-6,
        "warmup_steps": 5_000,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "doc_max_length": 512,
        "freeze_lower": False,
        "dev_queries": 500,
        "eval_every": 5_000,
        "checkpoint_every": 1_000,
        "select_metric": "RR@10",
    },
    "scifact-cpu": {
        "loss": "listwise",
        "batch_size": 4,
        "group_size": 8,
        "steps": 600,
        "learning_rate": 6e-5,
        "warmup_steps": 60,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "freeze_lower": True,
        "dev_queries": 100,
        "eval_every": 150,
        "eval_candidates": 100,
        "checkpoint_every": 150,
        "select_metric": "nDCG@10",
        "fuse_first_stage": True,
        "fuse_maxsim": True,
    },
}


class TrainingError(ValueError):
    """Training settings or data that cannot be used."""


@dataclass
class TrainSettings:
    """Everything that defines a training run; saved beside its checkpoints."""

    train: str
    output: str
    architecture: str = "mice"
    backbone: str | None = None
    merge_layer: int = 3
    interaction_layers: int = 3
    mask: str = "none"
    mask3_layers: int | None = None
    # None: 64 query and 512 document tokens, or the backbone's positions when fewer.
    query_max_length: int | None = None
    doc_max_length: int | None = None
    loss: str = "listwise"
    teacher_scores: str | None = None
    teacher: str | None = None
    split: str = "train"
    dev: str | None = None
    dev_split: str = "dev"
    dev_queries: int = 100
    batch_size: int = 8
    group_size: int = 8
    accumulation: int = 1
    steps: int = 1000
    learning_rate: float = 2e-5
    # None: default_warmup_steps(steps), resolved when the settings are created.
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    negatives_depth: int = 100
    freeze_lower: bool = False
    states_from: str | None = None
    eval_every: int = 200
    eval_candidates: int = 100
    select_metric: str = "nDCG@10"
    # Tune a BM25 blend weight on the held-out queries at each evaluation, select checkpoints by
    # the blended metric, and save the weight with the model (see search.fuse_scores).
    fuse_first_stage: bool = False
    # With fuse_first_stage: blend the MaxSim score of the stored states too (see
    # model.maxsim_scores), its weight tuned with the BM25 weight on the held-out queries.
    fuse_maxsim: bool = False
    # Train the sum "MICE score + scale * BM25 score" with a learnt scale, so that MICE learns
    # what BM25 misses; the scale is saved with the model and search adds the same term.
    first_stage_feature: bool = False
    first_stage_scale_init: float = 0.5
    first_stage_scale_lr: float = 1e-2
    # Listwise distillation from a bi-encoder (mean-pooled embeddings, cosine similarity),
    # added to the listwise loss: "backbone" is the backbone the model was built from, or a
    # sentence-embedding folder or Hugging Face id. See BiEncoderTeacher.
    distill_teacher: str | None = None
    distill_weight: float = 1.0
    distill_temperature: float = 0.05
    checkpoint_every: int = 200
    precision: str = "auto"
    device: str = "auto"
    preset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.warmup_steps is None:
            self.warmup_steps = default_warmup_steps(self.steps)

    def check(self) -> None:
        """Raise TrainingError for a value or a combination of options that cannot train.

        Everything that can be decided from the settings alone is checked here, so that a bad
        command fails before it loads a model or writes to the output folder.
        """
        self._check_choices()
        self._check_numbers()
        self._check_combinations()

    def _check_choices(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise TrainingError(f"architecture {self.architecture!r} is unknown; use one of "
                                f"{', '.join(ARCHITECTURES)}")
        if self.loss not in LOSSES:
            raise TrainingError(f"loss {self.loss!r} is unknown; use one of {', '.join(LOSSES)}")
        if self.mask not in MASKS:
            raise TrainingError(f"mask {self.mask!r} is unknown; use one of {', '.join(MASKS)}")
        if self.precision not in ("auto", "float32", "bf16", "fp16"):
            raise TrainingError(f"precision {self.precision!r} is unknown; use auto, float32, "
                                "bf16 or fp16")
        metrics = ("nDCG@10", "RR@10", f"R@{self.eval_candidates}")
        if self.select_metric not in metrics:
            raise TrainingError(f"select-metric {self.select_metric!r} is unknown; use one of "
                                f"{', '.join(metrics)} (the metrics of each evaluation)")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise TrainingError(f"device {self.device!r} is invalid; use cpu, cuda, cuda:N "
                                    "or auto") from None

    def _check_numbers(self) -> None:
        minimums = {"batch_size": 1, "accumulation": 1, "steps": 1, "dev_queries": 0,
                    "eval_every": 1, "eval_candidates": 1, "checkpoint_every": 1,
                    "negatives_depth": 1}
        if self.architecture == "mice":
            minimums.update(merge_layer=1, interaction_layers=1)
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value < minimum:
                rule = "0 or more" if minimum == 0 else f"at least {minimum}"
                raise TrainingError(f"{name.replace('_', '-')}={value} is invalid: it must be "
                                    f"{rule}")

        for name in ("query_max_length", "doc_max_length"):
            value = getattr(self, name)
            if value is not None and value < 3:
                raise TrainingError(f"{name.replace('_', '-')}={value} is invalid: it must be at "
                                    "least 3 ([CLS], one token and [SEP])")

        if not 0 <= self.seed < 2**32:
            raise TrainingError(f"seed={self.seed} is invalid: it must be between 0 and 2**32 - 1")
        if self.loss == "listwise" and self.group_size < 2:
            raise TrainingError(f"group-size={self.group_size} is invalid: it must be at least 2, "
                                "because the listwise loss needs a positive and at least one "
                                "negative")

        if self.warmup_steps < 0:
            raise TrainingError(f"warmup-steps={self.warmup_steps} is invalid: it must be 0 or "
                                "more")
        if self.warmup_steps >= self.steps:
            raise TrainingError(
                f"warmup-steps={self.warmup_steps} is invalid with steps={self.steps}: the "
                f"warm-up must end before the last step. Pass --warmup-steps below {self.steps} "
                "(or leave it out for a warm-up of 10% of the steps), or raise --steps above "
                f"{self.warmup_steps}")

        # Real-valued options: (name, lower bound, whether the bound itself is allowed).
        bounds = (("learning_rate", 0.0, False), ("weight_decay", 0.0, True),
                  ("max_grad_norm", 0.0, False), ("distill_weight", 0.0, True),
                  ("distill_temperature", 0.0, False))
        for name, bound, inclusive in bounds:
            value = getattr(self, name)
            if value < bound or (value == bound and not inclusive):
                rule = f"{bound:g} or more" if inclusive else f"above {bound:g}"
                raise TrainingError(f"{name.replace('_', '-')}={value} is invalid: it must be "
                                    f"{rule}")

    def _check_combinations(self) -> None:
        if self.freeze_lower and self.architecture != "mice":
            raise TrainingError("--freeze-lower applies to MICE only: a cross-encoder has no "
                                "document states to precompute; pass --train-lower (a preset "
                                "such as scifact-cpu turns --freeze-lower on)")
        if self.states_from and not self.freeze_lower:
            raise TrainingError("--states-from needs --freeze-lower: stored states come from the "
                                "backbone's lower layers, which must then stay fixed")
        if self.mask != "none" and self.architecture == "mice":
            raise TrainingError(f"--mask {self.mask} applies to --architecture cross-encoder; "
                                "MICE has its own masks, so drop --mask")
        if self.mask == "mask3" and (self.mask3_layers is None or self.mask3_layers < 1):
            raise TrainingError(f"--mask mask3 needs --mask3-layers of at least 1, got "
                                f"{self.mask3_layers}; for k = 0 use --mask mask2")
        if self.mask != "mask3" and self.mask3_layers is not None:
            raise TrainingError(f"--mask3-layers {self.mask3_layers} applies to --mask mask3 only, "
                                f"but the mask is {self.mask}; drop --mask3-layers or pass "
                                "--mask mask3")
        if self.loss == "margin-mse":
            if self.teacher_scores is None and self.teacher is None:
                raise TrainingError("--loss margin-mse needs teacher scores: pass --teacher-scores "
                                    "FILE (MS MARCO layout) or --teacher MODEL")
            if self.teacher_scores is not None and self.teacher is not None:
                raise TrainingError("--teacher-scores and --teacher are two sources of teacher "
                                    "scores for margin-mse; pass one")
            if self.freeze_lower:
                raise TrainingError("--freeze-lower does not work with --loss margin-mse: teacher "
                                    "triples carry texts, not indexed documents whose states can "
                                    "be computed once. Pass --train-lower, or use --loss "
                                    "listwise")
        else:
            for option, value in (("--teacher-scores", self.teacher_scores),
                                  ("--teacher", self.teacher)):
                if value is not None:
                    raise TrainingError(f"{option} applies to --loss margin-mse, but the loss is "
                                        f"{self.loss}; pass --loss margin-mse or drop {option}")
        if self.fuse_first_stage and self.dev_queries == 0:
            raise TrainingError("--fuse-first-stage tunes the blend weights on held-out queries, "
                                "but --dev-queries is 0; pass --dev-queries 100 (or more), or "
                                "--no-fuse-first-stage for a model that ranks by MICE alone")
        if self.fuse_maxsim and not self.fuse_first_stage:
            raise TrainingError("--fuse-maxsim adds a term to the BM25 blend; pass "
                                "--fuse-first-stage too, or drop --fuse-maxsim")
        if self.fuse_maxsim and self.architecture != "mice":
            raise TrainingError(f"--fuse-maxsim needs the stored states of a MICE model, but "
                                f"the architecture is {self.architecture}; pass --architecture "
                                "mice or drop --fuse-maxsim")
        if self.first_stage_feature and self.fuse_first_stage:
            raise TrainingError("--first-stage-feature and --fuse-first-stage are two ways to use "
                                "BM25; choose one (a preset such as scifact-cpu turns --fuse-first-stage on: pass "
                                "--no-fuse-first-stage with --first-stage-feature)")
        if self.first_stage_feature and self.loss != "listwise":
            raise TrainingError("--first-stage-feature needs --loss listwise (BM25 scores come "
                                "from the collection's own index)")
        if self.distill_teacher is not None and self.loss != "listwise":
            raise TrainingError("--distill-teacher adds to the listwise loss; use --loss listwise "
                                "(margin-mse takes its teacher from --teacher)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def default_warmup_steps(steps: int) -> int:
    """Return the warm-up of a run whose settings name none: a tenth of ``steps``, rounded to
    the nearest step (halves up), at most DEFAULT_WARMUP_STEPS.

    The result is 0 below 5 steps and always below ``steps``, so any ``steps`` of 1 or more
    is valid without ``--warmup-steps``.
    """
    return max(0, min(DEFAULT_WARMUP_STEPS, (steps + 5) // 10))


def settings_with_preset(preset: str | None, **values: Any) -> TrainSettings:
    """Build settings from a preset's values, overridden by every value that is not None.

    A preset's warm-up is kept unless the steps, overridden, no longer exceed it. The warm-up
    then follows :func:`default_warmup_steps`, as it does without a preset. A preset's
    ``fuse_maxsim`` is dropped when the values turn ``fuse_first_stage`` off or choose an
    architecture other than MICE.
    """
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise TrainingError(f"preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
        merged.update(PRESETS[preset])
        merged["preset"] = preset
    merged.update({key: value for key, value in values.items() if value is not None})
    warmup_from_preset = values.get("warmup_steps") is None and "warmup_steps" in merged
    if warmup_from_preset and merged["warmup_steps"] >= merged.get("steps", math.inf):
        del merged["warmup_steps"]
    # A preset's MaxSim term belongs to its BM25 blend and to MICE: it goes when the command
    # line turns the blend off or trains another architecture.
    if values.get("fuse_maxsim") is None and merged.get("fuse_maxsim") and (
            not merged.get("fuse_first_stage") or merged.get("architecture", "mice") != "mice"):
        del merged["fuse_maxsim"]
    settings = TrainSettings.from_dict(merged)
    settings.check()
    return settings


# --------------------------------------------------------------------------------------------
# Losses
def listwise_softmax_loss(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of column 0 (the positive) in each row of ``scores`` (B, G)."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape (batch, group >= 2), got {tuple(scores.shape)}")
    return -(scores[:, 0] - torch.logsumexp(scores, dim=1)).mean()


def margin_mse_loss(positive: torch.Tensor, negative: torch.Tensor,
                    teacher_positive: torch.Tensor, teacher_negative: torch.Tensor) -> torch.Tensor:
    """Margin-MSE: mean of ((s+ - s-) - (t+ - t-))^2 over the batch."""
    student = positive - negative
    teacher = (teacher_positive - teacher_negative).to(student.dtype)
    return F.mse_loss(student, teacher)


def listwise_distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                               temperature: float) -> torch.Tensor:
    """KL divergence from the teacher's softmax over each row of ``teacher / temperature`` to the
    student's softmax over the same row of ``student`` (B, G), averaged over rows."""
    target = F.softmax(teacher.to(student.dtype) / temperature, dim=-1)
    return F.kl_div(F.log_softmax(student, dim=-1), target, reduction="batchmean")


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then linear decay to 0 at the end."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = total_steps - step
    return max(0.0, remaining / max(1, total_steps - warmup_steps))


# --------------------------------------------------------------------------------------------
# Data
@dataclass
class Triple:
    query: str
    positive: str
    negative: str
    teacher_positive: float
    teacher_negative: float


class LabelledCollection:
    """A collection with training queries, their judgments and BM25 hard negatives.

    Queries are held in memory with the document texts (fine for BEIR-size collections). BM25
    runs over the whole corpus; the documents judged relevant to a query are never drawn as its
    negatives, and a query without a relevant document in the corpus is left out with a count.
    """

    def __init__(self, source: str, split: str, *, negatives_depth: int,
                 bm25: Any = None, doc_ids: Sequence[str] | None = None,
                 texts: Sequence[str] | None = None) -> None:
        from .first_stage import BM25FirstStage
        from .sources import open_documents, read_qrels, read_queries

        self.source = source
        if doc_ids is None or texts is None:
            documents = list(open_documents(source))
            doc_ids = [document.id for document in documents]
            texts = [document.full_text() for document in documents]
        self.doc_ids = list(doc_ids)
        self.texts = list(texts)
        self.row_of = {doc_id: row for row, doc_id in enumerate(self.doc_ids)}
        self.bm25 = bm25 if bm25 is not None else BM25FirstStage.build(self.texts)
        queries = read_queries(source, split=split)
        qrels = read_qrels(source, split=split)
        self.negatives_depth = negatives_depth
        self.queries: list[tuple[str, str, list[int]]] = []  # (id, text, positive rows)
        self.qrels = qrels
        unknown = 0
        for query in queries:
            judged = qrels.get(query.id, {})
            positives = sorted(self.row_of[d] for d, rel in judged.items()
                               if rel > 0 and d in self.row_of)
            unknown += sum(1 for d, rel in judged.items() if rel > 0 and d not in self.row_of)
            if positives:
                self.queries.append((query.id, query.text, positives))
        if unknown:
            logger.warning("%d relevant judgments of %s (%s) name documents missing from the "
                           "corpus; they are ignored", unknown, source, split)
        if not self.queries:
            raise TrainingError(f"{source} has no {split} query with a relevant document in the "
                                "corpus; pass a source with judgments for that split")
        self._negatives: dict[str, np.ndarray] = {}
        self._all_scores: dict[str, np.ndarray] = {}

    def negatives(self, index: int) -> np.ndarray:
        """BM25 rows of the query's top ``negatives_depth`` documents that are not judged relevant."""
        query_id, text, positives = self.queries[index]
        if query_id not in self._negatives:
            rows, _ = self.bm25.retrieve(text, self.negatives_depth + len(positives))
            judged = set(self.qrels.get(query_id, {}))
            keep = [int(r) for r in rows if self.doc_ids[int(r)] not in judged]
            self._negatives[query_id] = np.array(keep[: self.negatives_depth], dtype=np.int64)
        return self._negatives[query_id]

    def first_stage_scores(self, index: int) -> np.ndarray:
        """BM25 score of every document for the query (0 where it shares no term)."""
        query_id, text, _ = self.queries[index]
        if query_id not in self._all_scores:
            self._all_scores[query_id] = self.bm25.score_all(text)
        return self._all_scores[query_id]

    def split_off(self, count: int, seed: int) -> list[int]:
        """Hold out ``count`` queries (seeded choice) for development; returns their indexes."""
        if count == 0:
            return []
        if count >= len(self.queries):
            raise TrainingError(f"dev-queries={count} leaves no training query out of "
                                f"{len(self.queries)}; lower --dev-queries")
        chosen = random.Random(seed).sample(range(len(self.queries)), count)
        return sorted(chosen)

    def draw_groups(self, indexes: Sequence[int], rng: np.random.Generator,
                    group_size: int) -> list[tuple[int, list[int]]]:
        """For each query index: (query index, [positive row, negative rows...])."""
        groups = []
        for index in indexes:
            positives = self.queries[index][2]
            positive = positives[int(rng.integers(len(positives)))]
            pool = self.negatives(index)
            if len(pool) == 0:  # BM25 found nothing else: draw from the whole corpus
                pool = np.array([r for r in range(len(self.doc_ids)) if r not in positives])
            need = group_size - 1
            chosen = rng.choice(pool, size=need, replace=len(pool) < need)
            groups.append((index, [positive, *map(int, chosen)]))
        return groups


def read_teacher_triples(path: str | os.PathLike) -> Iterator[Triple]:
    """Stream triples from a teacher-score TSV in the published MS MARCO layout.

    Each line is ``pos_score<TAB>neg_score<TAB>query<TAB>positive<TAB>negative``. A malformed
    line raises TrainingError with its number.
    """
    from .sources import iter_lines

    for number, line in iter_lines(Path(path)):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 5:
            raise TrainingError(f"{path}:{number}: expected 5 tab-separated fields (pos_score, "
                                f"neg_score, query, positive, negative), found {len(parts)}")
        try:
            positive_score, negative_score = float(parts[0]), float(parts[1])
        except ValueError:
            raise TrainingError(f"{path}:{number}: the first two fields must be teacher scores, "
                                f"got {parts[0]!r} and {parts[1]!r}") from None
        if not (math.isfinite(positive_score) and math.isfinite(negative_score)):
            raise TrainingError(f"{path}:{number}: teacher scores must be finite")
        yield Triple(parts[2], parts[3], parts[4], positive_score, negative_score)


def read_irds_triples(dataset_id: str) -> Iterator[tuple[str, str, str]]:
    """Stream (query, positive, negative) texts from an ir_datasets dataset with docpairs,
    such as ``msmarco-passage/train/triples-small``; nothing is loaded whole."""
    import ir_datasets

    dataset = ir_datasets.load(dataset_id)
    if not dataset.has_docpairs():
        raise TrainingError(f"irds:{dataset_id} has no training triples (docpairs); use e.g. "
                            "irds:msmarco-passage/train/triples-small")
    queries = {query.query_id: query.text for query in dataset.queries_iter()}
    store = dataset.docs_store()
    for pair in dataset.docpairs_iter():
        positive = store.get(pair.doc_id_a)
        negative = store.get(pair.doc_id_b)
        yield queries[pair.query_id], positive.text, negative.text


class TripleStream:
    """Repeatable stream of triples, consumed in order; ``skip`` replays a resumed run."""

    def __init__(self, factory: Callable[[], Iterator[Triple]]) -> None:
        self._factory = factory
        self._iterator = factory()
        self.consumed = 0

    def take(self, count: int) -> list[Triple]:
        taken = []
        while len(taken) < count:
            try:
                taken.append(next(self._iterator))
            except StopIteration:
                if self.consumed == 0 and not taken:
                    raise TrainingError("the training triples are empty") from None
                self._iterator = self._factory()  # next epoch
                continue
            self.consumed += 1
        return taken

    def skip(self, count: int) -> None:
        for _ in range(count):
            self.take(1)


# --------------------------------------------------------------------------------------------
# Models
def build_model(settings: TrainSettings) -> torch.nn.Module:
    """A fresh model to train, from the backbone."""
    if settings.architecture == "mice":
        return MiceModel.from_backbone(
            settings.backbone, merge_layer=settings.merge_layer,
            interaction_layers=settings.interaction_layers,
            query_max_length=settings.query_max_length, doc_max_length=settings.doc_max_length,
            seed=settings.seed,
        )
    try:
        from .cross_encoder import CrossEncoderModel
    except ImportError as error:  # pragma: no cover - shipped together
        raise TrainingError(f"the cross-encoder is not available: {error}") from error
    return CrossEncoderModel.from_backbone(
        settings.backbone, mask=settings.mask, mask3_layers=settings.mask3_layers,
        query_max_length=settings.query_max_length, doc_max_length=settings.doc_max_length,
        seed=settings.seed,
    )


def trainable_parameters(model: torch.nn.Module, freeze_lower: bool) -> list[torch.nn.Parameter]:
    for name, parameter in model.named_parameters():
        frozen = freeze_lower and name.startswith(("embeddings.", "lower_layers."))
        parameter.requires_grad_(not frozen)
    return [p for p in model.parameters() if p.requires_grad]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} was asked for but PyTorch sees no GPU; use "
                            "--device cpu or auto")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision type: bf16 (or fp16) on GPU for ``auto``; never on CPU unless asked."""
    if precision == "float32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


class StateCache:
    """Lower-layer states of documents and queries for frozen-lower MICE training.

    Document states come from an index (``states_from``, checked to have the same lower
    layers) or are computed on first use without gradients; all are kept in float16, as an
    index stores them, so training sees exactly what search will see.
    """

    def __init__(self, model: MiceModel, index: Any = None) -> None:
        self.model = model
        self.index = index
        self._documents: dict[int, np.ndarray] = {}
        self._queries: dict[str, torch.Tensor] = {}

    def documents(self, rows: Sequence[int], texts: Sequence[str]) -> list[np.ndarray]:
        # Lower layers run in eval mode (no dropout), as at indexing time.
        missing = [r for r in dict.fromkeys(rows) if r not in self._documents]
        if missing and self.index is not None:
            store = self.index.store
            for row in missing:
                start, end = store.windows(row)[0]
                self._documents[row] = np.asarray(store.rows(start, end), dtype=np.float16)
        elif missing:
            from .encoding import encode_sequences

            tokens = tokenize(self.model.tokenizer, [texts[r] for r in missing],
                              self.model.config.doc_max_length)
            with torch.no_grad(), _lower_layers_in_eval(self.model):
                states = encode_sequences(self.model, tokens.input_ids, batch_size=32)
            self._documents.update(zip(missing, states, strict=True))
        return [self._documents[r] for r in rows]

    def query(self, text: str) -> torch.Tensor:
        if text not in self._queries:
            tokens = tokenize(self.model.tokenizer, [text], self.model.config.query_max_length)
            ids, mask = pad(tokens.input_ids, self.model.tokenizer.pad_token_id or 0,
                            self.model.device)
            with torch.no_grad(), _lower_layers_in_eval(self.model):
                self._queries[text] = self.model.encode(ids, mask)[0].to(torch.float32)
        return self._queries[text]


class BiEncoderTeacher:
    """Relevance scores from a bi-encoder: the cosine similarity of mean-pooled token
    embeddings of query and document, as sentence-transformers models such as all-MiniLM-L6-v2
    are trained to give.

    A MICE model built from such a backbone shares its lower layers, but its relevance head
    starts from nothing. The bi-encoder scores every document of a group, not only the judged
    one. Document embeddings are computed once per row and kept.
    """

    def __init__(self, spec: str, texts: Sequence[str], device: torch.device,
                 batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        from .model import resolve_backbone

        location, self.label = resolve_backbone(spec)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location)
            self.model = AutoModel.from_pretrained(location).to(device).eval()
        except OSError as error:
            raise TrainingError(f"--distill-teacher {spec}: cannot load a bi-encoder from "
                                f"{location} ({error})") from error
        self.max_length = _sentence_max_length(Path(location), self.tokenizer)
        self.texts = texts
        self.device = device
        self.batch_size = batch_size
        self._documents: dict[int, torch.Tensor] = {}
        self._queries: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length mean-pooled embeddings of ``texts``, (N, H) float32."""
        parts = []
        for first in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[first : first + self.batch_size]), padding=True,
                                   truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            weights = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            parts.append(F.normalize(pooled, dim=-1))
        return torch.cat(parts)

    def scores(self, query: str, rows: Sequence[int]) -> torch.Tensor:
        """Cosine similarities of ``query`` with the documents at ``rows``, (len(rows),)."""
        missing = [r for r in dict.fromkeys(rows) if r not in self._documents]
        if missing:
            vectors = self.embed([self.texts[r] for r in missing])
            self._documents.update(zip(missing, vectors, strict=True))
        if query not in self._queries:
            self._queries[query] = self.embed([query])[0]
        documents = torch.stack([self._documents[r] for r in rows])
        return documents @ self._queries[query]


def _sentence_max_length(folder: Path, tokenizer: Any) -> int:
    """Return the input length that a sentence-embedding model was trained for (its
    sentence_bert_config.json), else the tokenizer's limit, at most 512."""
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    return min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)


class _lower_layers_in_eval:
    """Context that runs the embeddings and lower layers without dropout."""

    def __init__(self, model: MiceModel) -> None:
        self.modules = [model.embeddings, model.lower_layers]
        self.modes: list[bool] = []

    def __enter__(self) -> None:
        self.modes = [module.training for module in self.modules]
        for module in self.modules:
            module.eval()

    def __exit__(self, *exc: object) -> None:
        for module, mode in zip(self.modules, self.modes, strict=True):
            module.train(mode)


def stack_states(arrays: Sequence[np.ndarray | torch.Tensor], device: torch.device):
    """Pad (length, hidden) arrays into (batch, longest, hidden) float32 plus a bool mask."""
    width = max(a.shape[0] for a in arrays)
    hidden = arrays[0].shape[1]
    states = torch.zeros(len(arrays), width, hidden, dtype=torch.float32)
    mask = torch.zeros(len(arrays), width, dtype=torch.bool)
    for i, array in enumerate(arrays):
        tensor = torch.from_numpy(np.array(array)) if isinstance(array, np.ndarray) else array
        states[i, : tensor.shape[0]] = tensor.to(torch.float32)
        mask[i, : tensor.shape[0]] = True
    return states.to(device), mask.to(device)


class PairScorer:
    """Scores (query text, document) pairs with gradients, the way the model will serve them."""

    def __init__(self, model: torch.nn.Module, cache: StateCache | None,
                 texts: Sequence[str] | None, bucket: int = 16) -> None:
        self.model = model
        self.cache = cache
        self.texts = texts
        self.bucket = bucket

    def __call__(self, queries: Sequence[str], documents: Sequence[int | str]) -> torch.Tensor:
        model = self.model
        device = next(model.parameters()).device
        if self.cache is not None:
            rows = [int(d) for d in documents]
            doc_arrays = self.cache.documents(rows, self.texts)
            query_arrays = [self.cache.query(q) for q in queries]
            # Pairs of similar document length go together, so that little padding is scored.
            order = sorted(range(len(rows)), key=lambda i: doc_arrays[i].shape[0])
            parts = []
            for first in range(0, len(order), self.bucket):
                chosen = order[first : first + self.bucket]
                doc_states, doc_mask = stack_states([doc_arrays[i] for i in chosen], device)
                query_states, query_mask = stack_states([query_arrays[i] for i in chosen], device)
                parts.append(model.score_states(query_states, query_mask, doc_states, doc_mask))
            scores = torch.cat(parts)
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            return scores[inverse.to(scores.device)]
        doc_texts = [self.texts[int(d)] if not isinstance(d, str) else d for d in documents]
        query_tokens = tokenize(model.tokenizer, list(queries), model.config.query_max_length)
        doc_tokens = tokenize(model.tokenizer, doc_texts, model.config.doc_max_length)
        pad_id = model.tokenizer.pad_token_id or 0
        query_ids, query_mask = pad(query_tokens.input_ids, pad_id, device)
        doc_ids, doc_mask = pad(doc_tokens.input_ids, pad_id, device)
        return model(query_ids, query_mask, doc_ids, doc_mask)

    @torch.no_grad()
    def maxsim(self, query: str, rows: Sequence[int]) -> np.ndarray:
        """MaxSim scores of one query against the documents at ``rows``, from the same
        lower-layer states that :meth:`__call__` scores (see :func:`model.maxsim_scores`)."""
        from .model import maxsim_scores

        model = self.model
        device = next(model.parameters()).device
        rows = [int(r) for r in rows]
        if self.cache is not None:
            query_states = self.cache.query(query)[None]
            query_mask = torch.ones(query_states.shape[:2], dtype=torch.bool, device=device)
            parts = []
            for first in range(0, len(rows), self.bucket):
                arrays = self.cache.documents(rows[first : first + self.bucket], self.texts)
                doc_states, doc_mask = stack_states(arrays, device)
                parts.append(maxsim_scores(query_states, query_mask, doc_states, doc_mask))
            return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, dtype=np.float32)
        pad_id = model.tokenizer.pad_token_id or 0
        query_tokens = tokenize(model.tokenizer, [query], model.config.query_max_length)
        query_ids, query_mask = pad(query_tokens.input_ids, pad_id, device)
        with _lower_layers_in_eval(model):
            query_states = model.encode(query_ids, query_mask)
            parts = []
            for first in range(0, len(rows), self.bucket):
                texts = [self.texts[r] for r in rows[first : first + self.bucket]]
                doc_tokens = tokenize(model.tokenizer, texts, model.config.doc_max_length)
                doc_ids, doc_mask = pad(doc_tokens.input_ids, pad_id, device)
                doc_states = model.encode(doc_ids, doc_mask)
                parts.append(maxsim_scores(query_states, query_mask, doc_states, doc_mask))
        return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Evaluation on development queries
FUSION_GRID = tuple(round(0.05 * i, 2) for i in range(21))
# The keys of a blend's weights in the "fusion" part of an evaluation.
BLEND_KEYS = ("first_stage_weight", "first_stage_scale", "maxsim_weight")


def evaluate_reranking(scorer: PairScorer, collection: LabelledCollection, indexes: Sequence[int],
                       candidates: int, batch_size: int = 64, fusion: bool = False,
                       select_metric: str = "nDCG@10",
                       first_stage_scale: float | None = None,
                       maxsim: bool = False) -> dict[str, Any]:
    """Re-rank each query's BM25 top ``candidates``; return nDCG@10, RR@10 and R@<candidates>.

    Ties rank by descending document id, as the search engine does. With ``fusion``, the
    result also holds ``fusion``: the BM25 blend weight of :data:`FUSION_GRID` that maximises
    ``select_metric`` (see :func:`mice_engine.search.fuse_scores`) and the metrics it gives;
    with ``maxsim`` as well, the pair of BM25 and MaxSim weights (each on the grid, summing to 1
    at most) that maximises it, and ``maxsim_alone``, the metrics of the MaxSim ranking.
    With ``first_stage_scale``, it also holds ``fusion``: the metrics of the sum
    ``MICE + scale * BM25`` that the model was trained to produce.
    """
    from .evaluation import evaluate
    from .search import fuse_scores, rank_order

    model = scorer.model
    was_training = model.training
    model.eval()
    lists: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
    maxsims: dict[str, np.ndarray] = {}
    try:
        with torch.inference_mode():
            for index in indexes:
                query_id, text, _ = collection.queries[index]
                rows, first_scores = collection.bm25.retrieve(text, candidates)
                scores = []
                for first in range(0, len(rows), batch_size):
                    part = [int(r) for r in rows[first : first + batch_size]]
                    scores.append(scorer([text] * len(part), part).float().cpu().numpy())
                values = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
                ids = [collection.doc_ids[int(r)] for r in rows]
                lists[query_id] = (ids, values, first_scores)
                if maxsim and fusion:
                    maxsims[query_id] = scorer.maxsim(text, rows)
    finally:
        model.train(was_training)
    dev_qrels = {collection.queries[i][0]: collection.qrels[collection.queries[i][0]]
                 for i in indexes}
    names = ["nDCG@10", "RR@10", f"R@{candidates}"]

    def metrics_for(weight: float, maxsim_weight: float = 0.0) -> dict[str, float]:
        run = {}
        for query_id, (ids, values, first_scores) in lists.items():
            blended = (fuse_scores(values, first_scores, weight, maxsims.get(query_id),
                                   maxsim_weight) if len(ids) else values)
            run[query_id] = [(ids[i], float(blended[i])) for i in rank_order(ids, blended)]
        return dict(evaluate(run, dev_qrels, names).metrics)

    result: dict[str, Any] = metrics_for(0.0)
    if first_stage_scale is not None:
        run = {}
        for query_id, (ids, values, first_scores) in lists.items():
            summed = values + first_stage_scale * first_scores
            run[query_id] = [(ids[i], float(summed[i])) for i in rank_order(ids, summed)]
        result["fusion"] = {"first_stage_scale": first_stage_scale,
                            **evaluate(run, dev_qrels, names).metrics}
    elif fusion and maxsims:
        # Every (BM25, MaxSim) pair of the grid whose sum is at most 1; MICE takes the rest.
        best_pair, best = (0.0, 0.0), result
        for weight in FUSION_GRID:
            for maxsim_weight in FUSION_GRID:
                if weight + maxsim_weight > 1.0 + 1e-9 or weight == maxsim_weight == 0.0:
                    continue
                metrics = metrics_for(weight, maxsim_weight)
                if metrics[select_metric] > best[select_metric]:
                    best_pair, best = (weight, maxsim_weight), metrics
        result["fusion"] = {"first_stage_weight": best_pair[0], "maxsim_weight": best_pair[1],
                            **best}
        result["maxsim_alone"] = metrics_for(0.0, 1.0)
    elif fusion:
        best_weight, best = 0.0, result
        for weight in FUSION_GRID[1:]:
            metrics = metrics_for(weight)
            if metrics[select_metric] > best[select_metric]:
                best_weight, best = weight, metrics
        result["fusion"] = {"first_stage_weight": best_weight, **best}
    return result


# --------------------------------------------------------------------------------------------
# Checkpoints
def _fsync_replace(temporary: Path, final: Path) -> None:
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)


def save_checkpoint(folder: Path, *, step: int, model: torch.nn.Module, optimizer: Any,
                    scaler: Any, settings: TrainSettings, best: dict[str, Any] | None,
                    consumed: int, scale: torch.Tensor | None = None) -> None:
    """Write the resumable state atomically: a reader sees the previous or the new checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "settings": settings.to_dict(),
        "best": best,
        "consumed": consumed,
        "first_stage_scale": None if scale is None else scale.detach().cpu(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    temporary = folder / "trainer.pt.tmp"
    torch.save(state, temporary)
    _fsync_replace(temporary, folder / "trainer.pt")


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    path = folder / "trainer.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# Settings that may differ between a run and its resumption (they do not change what is learnt).
_RESUMABLE_CHANGES = {"output", "device", "checkpoint_every", "states_from", "extra"}


def _check_resume(saved: dict[str, Any], settings: TrainSettings) -> None:
    current = settings.to_dict()
    differences = [f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in current
                   if key not in _RESUMABLE_CHANGES and saved.get(key) != current[key]]
    if differences:
        raise TrainingError("the checkpoint was written with other settings; resume with the same "
                            "settings or start a new output folder. Differences: "
                            + "; ".join(differences))


# --------------------------------------------------------------------------------------------
# The loop
@dataclass
class TrainResult:
    output: Path
    steps: int
    best: dict[str, Any] | None
    evaluations: list[dict[str, Any]]
    seconds: float
    losses: list[float]


def train(settings: TrainSettings, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> TrainResult:
    """Run (or resume) a training run; the best model by the dev metric is saved in
    ``output/model``. ``stop_after`` ends the call after that many steps of this call (used to
    test resumption), leaving the checkpoint as a crash would.

    The settings, the model and the data are checked and loaded before anything is written to
    ``output``. A new run that fails or is interrupted before its first checkpoint deletes the
    files it wrote, so the same call can start it again without ``resume``.
    """
    settings.check()
    output = Path(settings.output)
    checkpoint_folder = output / CHECKPOINT_DIR
    saved = load_checkpoint(checkpoint_folder)
    if saved is not None and not resume:
        raise TrainingError(f"{output} already holds a training checkpoint; pass --resume to "
                            "continue it, or choose another output folder")
    if resume and saved is None:
        raise TrainingError(f"--resume: {output} holds no checkpoint "
                            f"({checkpoint_folder / 'trainer.pt'} is missing)")
    if saved is not None:
        _check_resume(saved["settings"], settings)

    # Everything that can fail on the settings, the model or the data runs before anything is
    # written to the output folder.
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)
    model = build_model(settings)
    model.to(device)
    parameters = trainable_parameters(model, settings.freeze_lower)
    decay = [p for p in parameters if p.dim() > 1]
    no_decay = [p for p in parameters if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    scale = None
    if settings.first_stage_feature:
        scale = torch.nn.Parameter(torch.tensor(float(settings.first_stage_scale_init),
                                                device=device))
        groups.append({"params": [scale], "weight_decay": 0.0,
                       "base_lr": settings.first_stage_scale_lr})
        parameters = [*parameters, scale]
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, foreach=True)
    amp_dtype = autocast_dtype(settings.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    collection, cache, texts, triples = _prepare_data(settings, model)
    scorer = PairScorer(model, cache, texts)
    distiller = None
    if settings.distill_teacher is not None:
        spec = (model.config.backbone if settings.distill_teacher == "backbone"
                else settings.distill_teacher)
        distiller = BiEncoderTeacher(spec, texts, device)
        logger.info("distilling from the bi-encoder %s (weight %g, temperature %g)",
                    distiller.label, settings.distill_weight, settings.distill_temperature)
    train_indexes: list[int] = []
    dev_indexes: list[int] = []
    if collection is not None:
        dev_indexes = collection.split_off(settings.dev_queries, settings.seed)
        held = set(dev_indexes)
        train_indexes = [i for i in range(len(collection.queries)) if i not in held]
        logger.info("training on %d queries of %s (%s split), %d held out for development",
                    len(train_indexes), settings.train, settings.split, len(dev_indexes))

    step = 0
    best: dict[str, Any] | None = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        if scale is not None:
            with torch.no_grad():
                scale.copy_(saved["first_stage_scale"])
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved["scaler"] is not None:
            scaler.load_state_dict(saved["scaler"])
        step = saved["step"]
        best = saved["best"]
        torch.set_rng_state(saved["torch_rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        if triples is not None:
            triples.skip(saved["consumed"])
        logger.info("resumed %s at step %d of %d", output, step, settings.steps)

    created_output = not output.exists()
    _start_output(output, settings, fresh=saved is None)
    log_path = output / LOG_FILE
    saved_best = False
    evaluations: list[dict[str, Any]] = []
    losses: list[float] = []
    started = time.perf_counter()
    bar = _progress_bar(settings.steps, step, progress)
    model.train()
    steps_this_call = 0
    try:
        while step < settings.steps:
            for group in optimizer.param_groups:
                group["lr"] = group.get("base_lr", settings.learning_rate) * learning_rate_factor(
                    step, settings.warmup_steps, settings.steps)
            rng = np.random.default_rng([settings.seed, step])
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for part in range(settings.accumulation):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = _batch_loss(settings, scorer, collection, train_indexes, triples,
                                       rng, scale=scale, distiller=distiller)
                    loss = loss / settings.accumulation
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss.item()} at step {step}; "
                                             "lower --learning-rate")
                (scaler.scale(loss) if scaler is not None else loss).backward()
                total += float(loss.detach())
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            steps_this_call += 1
            losses.append(total)
            elapsed = time.perf_counter() - started
            _append_log(log_path, {"step": step, "loss": round(total, 6),
                                   "lr": optimizer.param_groups[0]["lr"],
                                   "seconds": round(elapsed, 2)})
            if bar is not None:
                bar.set_postfix(loss=f"{total:.4f}", refresh=False)
                bar.update(1)

            if dev_indexes and (step % settings.eval_every == 0 or step == settings.steps):
                metrics = evaluate_reranking(scorer, collection, dev_indexes,
                                             settings.eval_candidates,
                                             fusion=settings.fuse_first_stage,
                                             select_metric=settings.select_metric,
                                             first_stage_scale=None if scale is None
                                             else float(scale.detach()),
                                             maxsim=settings.fuse_maxsim)
                record = {"step": step, "dev": metrics, "seconds": round(elapsed, 2)}
                evaluations.append(record)
                _append_log(log_path, {"eval": record})
                chosen = metrics.get("fusion", metrics)
                value = chosen[settings.select_metric]
                logger.info("step %d: dev %s", step, ", ".join(
                    f"{k} {v:.4f}" for k, v in metrics.items() if not isinstance(v, dict)))
                if "fusion" in metrics:
                    logger.info("step %d: dev blend (%s): %s", step, ", ".join(
                        f"{k} {v:.4f}" for k, v in chosen.items() if k in BLEND_KEYS),
                        ", ".join(f"{k} {v:.4f}" for k, v in chosen.items()
                                  if k not in BLEND_KEYS))
                if best is None or value > best["value"]:
                    best = {"step": step, "metric": settings.select_metric, "value": value,
                            "dev": metrics}
                    _save_model(model, settings, output / BEST_DIR, best, scale)
                    saved_best = True
            elif not dev_indexes and step == settings.steps:
                best = {"step": step, "metric": None, "value": None, "dev": None}
                _save_model(model, settings, output / BEST_DIR, best, scale)
                saved_best = True
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                consumed = triples.consumed if triples is not None else 0
                save_checkpoint(checkpoint_folder, step=step, model=model, optimizer=optimizer,
                                scaler=scaler, settings=settings, best=best, consumed=consumed,
                                scale=scale)
            if stop_after is not None and steps_this_call >= stop_after:
                break
    except BaseException:
        # KeyboardInterrupt included: a new run that stops before its first checkpoint cannot
        # be resumed, so it leaves nothing that looks like a started or finished run.
        if saved is None and not (checkpoint_folder / "trainer.pt").is_file():
            _remove_unfinished_run(output, remove_model=saved_best, remove_folder=created_output)
        raise
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(output, step, best, evaluations, time.perf_counter() - started, losses)


def _start_output(output: Path, settings: TrainSettings, *, fresh: bool) -> None:
    """Create the output folder and write the settings. A new run also deletes any log left
    by a run that was killed before its first checkpoint, and so starts a new one."""
    output.mkdir(parents=True, exist_ok=True)
    (output / SETTINGS_FILE).write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    if fresh:
        (output / LOG_FILE).unlink(missing_ok=True)


def _remove_unfinished_run(output: Path, *, remove_model: bool, remove_folder: bool) -> None:
    """Delete what a new run wrote before its first checkpoint: the settings, the log, the
    temporary files, the best model when this run saved it, and the output folder itself when
    the run created it and it is now empty."""
    for path in (output / SETTINGS_FILE, output / LOG_FILE,
                 output / CHECKPOINT_DIR / "trainer.pt.tmp"):
        path.unlink(missing_ok=True)
    shutil.rmtree(output / (BEST_DIR + ".tmp"), ignore_errors=True)
    if remove_model:
        shutil.rmtree(output / BEST_DIR, ignore_errors=True)
    folders = [output / CHECKPOINT_DIR]
    if remove_folder:
        folders.append(output)
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    logger.warning("training stopped before its first checkpoint; its files were removed from "
                   "%s, so the same command can start it again", output)


def _prepare_data(settings: TrainSettings, model: torch.nn.Module):
    """Return (labelled collection or None, state cache or None, document texts, triples)."""
    from .sources import _irds_id

    collection = None
    cache = None
    texts = None
    triples = None
    irds_id = _irds_id(settings.train)
    wants_triples = settings.loss == "margin-mse"
    if wants_triples:
        if settings.teacher_scores is not None:
            path = settings.teacher_scores
            if not Path(path).is_file():
                raise TrainingError(f"--teacher-scores {path}: file not found; pass the path of "
                                    "a teacher-score TSV")
            triples = TripleStream(lambda: read_teacher_triples(path))
        elif irds_id is not None and settings.teacher is not None:
            triples = _teacher_stream(settings, irds_id)
        else:
            # TrainSettings.check ensured a teacher: it scores triples drawn from the
            # collection's judgments.
            triples = None
        if settings.dev is None and triples is not None:
            return None, None, None, triples
    index = None
    bm25 = None
    doc_ids = None
    if settings.states_from is not None:
        from .search import Index

        index = Index(settings.states_from)
        index.load_model(model)  # raises unless the lower layers are identical
        bm25 = index.bm25
        doc_ids = index.store.doc_ids
        texts = [index.store.document(row).full_text() for row in range(len(index.store))]
    collection = LabelledCollection(settings.train, settings.split,
                                    negatives_depth=settings.negatives_depth,
                                    bm25=bm25, doc_ids=doc_ids, texts=texts)
    texts = collection.texts
    if settings.freeze_lower:
        cache = StateCache(model, index)
    if wants_triples and triples is None:
        triples = _collection_teacher_stream(settings, collection)
    return collection, cache, texts, triples


def _teacher_scorer(settings: TrainSettings) -> Callable[[str, list[str]], np.ndarray]:
    from .cross_encoder import load_reranker, score_texts

    teacher = load_reranker(settings.teacher)
    teacher.eval()
    return lambda query, documents: score_texts(teacher, query, documents)


def _teacher_stream(settings: TrainSettings, irds_id: str) -> TripleStream:
    score = _teacher_scorer(settings)

    def generate() -> Iterator[Triple]:
        for query, positive, negative in read_irds_triples(irds_id):
            values = score(query, [positive, negative])
            yield Triple(query, positive, negative, float(values[0]), float(values[1]))

    return TripleStream(generate)


def _collection_teacher_stream(settings: TrainSettings,
                               collection: LabelledCollection) -> TripleStream:
    score = _teacher_scorer(settings)

    def generate() -> Iterator[Triple]:
        rng = np.random.default_rng(settings.seed)
        while True:
            for index, rows in collection.draw_groups(range(len(collection.queries)), rng, 2):
                text = collection.queries[index][1]
                documents = [collection.texts[r] for r in rows]
                values = score(text, documents)
                yield Triple(text, documents[0], documents[1], float(values[0]), float(values[1]))

    return TripleStream(generate)


def _batch_loss(settings: TrainSettings, scorer: PairScorer, collection: LabelledCollection | None,
                train_indexes: Sequence[int], triples: TripleStream | None,
                rng: np.random.Generator, scale: torch.Tensor | None = None,
                distiller: BiEncoderTeacher | None = None) -> torch.Tensor:
    if settings.loss == "listwise":
        chosen = rng.choice(len(train_indexes), size=settings.batch_size,
                            replace=len(train_indexes) < settings.batch_size)
        groups = collection.draw_groups([train_indexes[int(i)] for i in chosen], rng,
                                        settings.group_size)
        queries = [collection.queries[i][1] for i, rows in groups for _ in rows]
        documents = [row for _, rows in groups for row in rows]
        scores = scorer(queries, documents).float().view(len(groups), settings.group_size)
        if scale is not None:
            first = torch.tensor(np.array([collection.first_stage_scores(i)[rows]
                                           for i, rows in groups]), dtype=torch.float32,
                                 device=scores.device)
            scores = scores + scale * first
        loss = listwise_softmax_loss(scores)
        if distiller is not None and settings.distill_weight > 0:
            teacher = torch.stack([distiller.scores(collection.queries[i][1], list(rows))
                                   for i, rows in groups]).to(scores.device)
            loss = loss + settings.distill_weight * listwise_distillation_loss(
                scores, teacher, settings.distill_temperature)
        return loss
    batch = triples.take(settings.batch_size)
    queries = [t.query for t in batch] * 2
    documents = [t.positive for t in batch] + [t.negative for t in batch]
    scores = scorer(queries, documents).float()
    positive, negative = scores[: len(batch)], scores[len(batch) :]
    device = scores.device
    teacher_positive = torch.tensor([t.teacher_positive for t in batch], device=device)
    teacher_negative = torch.tensor([t.teacher_negative for t in batch], device=device)
    return margin_mse_loss(positive, negative, teacher_positive, teacher_negative)


def _save_model(model: torch.nn.Module, settings: TrainSettings, folder: Path,
                best: dict[str, Any], scale: torch.Tensor | None = None) -> None:
    """Save the model with its training record, replacing the previous best atomically."""
    model.config.trained = True
    fused = (best.get("dev") or {}).get("fusion")
    if scale is not None:
        model.config.fusion = {"first_stage": "bm25", "mode": "sum",
                               "first_stage_scale": float(scale.detach())}
    elif fused and (fused["first_stage_weight"] > 0 or fused.get("maxsim_weight", 0) > 0):
        weights = ("first_stage_weight", "maxsim_weight")
        model.config.fusion = {"first_stage": "bm25", "mode": "standardised-blend",
                               **{k: fused[k] for k in weights if k in fused},
                               "dev": {k: v for k, v in fused.items() if k not in weights}}
    else:
        model.config.fusion = {}
    model.config.training = {
        "settings": settings.to_dict(),
        "step": best["step"],
        "selected_by": best["metric"],
        "dev": best["dev"],
    }
    temporary = folder.with_name(folder.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    model.save(temporary)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


__all__ = [
    "PRESETS",
    "ModelError",
    "TrainSettings",
    "TrainingError",
    "evaluate_reranking",
    "learning_rate_factor",
    "listwise_distillation_loss",
    "listwise_softmax_loss",
    "margin_mse_loss",
    "settings_with_preset",
    "train",
]
