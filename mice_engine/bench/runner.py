"""Running a benchmark suite: indexes, systems, quality, efficiency, and the record they make."""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from .suite import DEFAULT_MODEL, BenchError, CollectionSpec, Suite, SystemSpec

logger = logging.getLogger(__name__)

RECORD_FILE = "record.json"
REPORT_FILE = "report.md"
RECORD_FORMAT = "mice-bench-record"
RECORD_FORMAT_VERSION = 1
REPOSITORY = Path(__file__).resolve().parents[2]


@dataclass
class BenchOptions:
    """Output locations of a suite run, and the policy for what already exists there."""

    output: Path
    index_dir: Path
    device: str | None = None
    # Reuse a complete index of the same source and lower layers instead of building it. Its
    # indexing figures then come from its manifest, so they were not measured in this run.
    reuse_indexes: bool = False
    overwrite: bool = False
    show_progress: bool = True
    plots: bool = True
    command: str | None = None
    # PyTorch's CPU threads for the whole run; None keeps PyTorch's default.
    threads: int | None = None


def run_suite(suite: Suite, options: BenchOptions) -> dict[str, Any]:
    """Run every collection and system of ``suite`` and write the results folder.

    The folder receives ``record.json`` (every number, with hardware, versions, git commit
    and seed), ``report.md``, the PNG plots and the TREC runs under ``runs/``.

    Returns:
        The record, as written to ``record.json``.

    Raises:
        BenchError: the suite requests a feature this engine lacks, or the output folder
            cannot be written.
    """
    from ..indexing import library_versions, resolve_device
    from .probes import git_state, hardware, load_average, matmul_rate

    check_suite(suite, plots=options.plots)
    _check_output(Path(options.output), options.overwrite)
    device = resolve_device(options.device)
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    models = _Models(suite, device)
    _check_codecs(suite, models)
    output = _prepare_output(Path(options.output), options.overwrite)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "suite": {"name": suite.name, "file": str(suite.path) if suite.path else None,
                  "sha256": suite.sha256, "settings": suite.to_dict(), "text": suite.text},
        "command": options.command or " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seed": suite.seed,
        "git": git_state(REPOSITORY),
        "hardware": hardware(device),
        "versions": {**library_versions(), "mice-engine": __version__},
        "load_average": {"start": load_average()},
        "environment": {key: os.environ[key] for key in ("IR_DATASETS_HOME", "OMP_NUM_THREADS")
                        if key in os.environ},
        "matmul": {"start": matmul_rate(suite.efficiency.matmul_size, device)},
        "models": {},
        "collections": {},
    }
    for collection in suite.collections:
        logger.info("collection %s: %s", collection.name, collection.source)
        runner = _CollectionRun(suite, collection, models, options, device, output)
        try:
            record["collections"][collection.name] = runner.run()
        finally:
            runner.close()
    record["models"] = models.describe()
    record["matmul"]["end"] = matmul_rate(suite.efficiency.matmul_size, device)
    record["load_average"]["end"] = load_average()
    record["seconds"] = round(time.perf_counter() - started, 1)

    (output / RECORD_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    from .report import write_plots, write_report

    if options.plots:
        record_plots = write_plots(record, output)
    else:
        record_plots = []
    write_report(record, output / REPORT_FILE, plots=record_plots)
    return record


# Arguments of Searcher.search that the systems' own settings fill in.
_RESERVED_SEARCH_OPTIONS = {"self", "query", "k", "candidates", "first_stage_only", "with_text",
                            "first_stage"}


def check_suite(suite: Suite, *, plots: bool = True) -> None:
    """Raise a :class:`BenchError` for settings that would fail only once the suite runs:
    search options that Searcher.search does not take, and plots without matplotlib."""
    from ..search import Searcher

    allowed = set(inspect.signature(Searcher.search).parameters) - _RESERVED_SEARCH_OPTIONS
    for system in suite.systems:
        unknown = set(system.search_options) - allowed
        if unknown:
            raise BenchError(f"system {system.name!r}: search_options {sorted(unknown)} are "
                             f"invalid; use {', '.join(sorted(allowed))} (first_stage, k and "
                             "candidates are the system's own keys)")
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("the PNG plots need matplotlib; install it with "
                             "`pip install mice-engine[bench]`, or pass --no-plots") from None


def _check_codecs(suite: Suite, models: _Models) -> None:
    """Raise a :class:`BenchError` for a compression that the system's model cannot use."""
    from ..compression import parse_codec_name

    for system in suite.systems:
        if system.compression:
            hidden_size = models.mice(system.model).hidden_size
            try:
                parse_codec_name(system.compression, hidden_size)
            except ValueError as error:
                raise BenchError(f"system {system.name!r}: {error}") from None


def _check_output(output: Path, overwrite: bool) -> None:
    """Raise unless ``output`` may receive the results; writes nothing."""
    if output.exists() and not output.is_dir():
        raise BenchError(f"{output} exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()):
        if not (output / RECORD_FILE).is_file():
            raise BenchError(f"{output} exists, is not empty and contains no {RECORD_FILE}; choose "
                             "another --output folder")
        if not overwrite:
            raise BenchError(f"{output} already contains benchmark results; pass --overwrite to "
                             "replace them or choose another --output")


def _prepare_output(output: Path, overwrite: bool) -> Path:
    _check_output(output, overwrite)
    if output.is_dir() and any(output.iterdir()):
        shutil.rmtree(output)
    (output / "runs").mkdir(parents=True, exist_ok=True)
    return output


class _Models:
    """Models of the suite, loaded once each on first use."""

    def __init__(self, suite: Suite, device: str) -> None:
        self.suite = suite
        self.device = device
        self._mice: dict[str, Any] = {}
        self._cross_encoders: dict[str, Any] = {}

    def mice(self, key: str):
        if key not in self._mice:
            from ..model import load_model

            spec = self.suite.models[key]
            model = load_model(None if spec == DEFAULT_MODEL else spec)
            self._mice[key] = model.to(self.device).eval()
        return self._mice[key]

    def cross_encoder(self, key: str | None, mice: Any):
        """Return the cross-encoder of ``key``, loaded once.

        ``None`` or the spec "default" builds an untrained one on the backbone of the MICE model
        ``mice``, with its query and document lengths, so that both models read the same tokens.
        """
        spec = self.suite.models.get(key, DEFAULT_MODEL) if key else DEFAULT_MODEL
        cache_key = key or "cross-encoder (default)"
        if cache_key not in self._cross_encoders:
            from ..cross_encoder import CrossEncoderModel, load_reranker

            if spec == DEFAULT_MODEL:
                model = CrossEncoderModel.from_backbone(
                    mice.config.backbone, query_max_length=mice.config.query_max_length,
                    doc_max_length=mice.config.doc_max_length)
            else:
                model = load_reranker(spec)
                if not isinstance(model, CrossEncoderModel):
                    raise BenchError(f"model {key!r} ({spec}) is a {type(model).__name__}, not a "
                                     "cross-encoder; point it to a cross-encoder folder")
            self._cross_encoders[cache_key] = model.to(self.device).eval()
        return self._cross_encoders[cache_key]

    def describe(self) -> dict[str, Any]:
        described = {}
        for key, model in [*self._mice.items(), *self._cross_encoders.items()]:
            config = model.config
            described[key] = {
                "spec": self.suite.models.get(key, DEFAULT_MODEL),
                "class": type(model).__name__,
                "name": getattr(config, "name", None) or type(model).__name__,
                "source": model.source,
                "backbone": config.backbone,
                "trained": bool(config.trained),
                "sha256": model.weights_sha256(),
                "settings": {name: value for name, value in vars(config).items()
                             if isinstance(value, (int, float, str, bool, type(None)))},
            }
        return described


class _CollectionRun:
    """One collection of a suite: its indexes, its systems and its probes."""

    def __init__(self, suite: Suite, collection: CollectionSpec, models: _Models,
                 options: BenchOptions, device: str, output: Path) -> None:
        self.suite = suite
        self.collection = collection
        self.models = models
        self.options = options
        self.device = device
        self.output = output
        from .indexes import IndexSet

        self.indexes = IndexSet(suite_name=suite.name, collection=collection, models=models,
                                index_dir=options.index_dir, device=device,
                                batch_size=suite.batch_size, reuse=options.reuse_indexes,
                                show_progress=options.show_progress)

    def close(self) -> None:
        self.indexes.close()

    def _chain(self, system: SystemSpec | None) -> list[dict[str, Any]]:
        """Index keys of a system: its MICE model's indexes, or the suite's index model's."""
        from .indexes import index_chain

        if system is not None and system.reranker == "mice":
            return index_chain(system.model, system)
        return index_chain(self.suite.index_model, system)

    def _searcher(self, index_name: str, batch_size: int):
        """Return a searcher over an open index, with the model that built it.

        Searchers share the open index, so closing one would close it for all. The index set
        closes them instead."""
        from ..search import Searcher

        key = self.indexes.records[index_name]["key"]
        return Searcher(self.indexes.opened[index_name], model=self.models.mice(key["model"]),
                        device=self.device, batch_size=batch_size)

    def run(self) -> dict[str, Any]:
        from ..sources import open_documents

        suite, collection = self.suite, self.collection
        queries, qrels, query_record = self._queries()
        documents = open_documents(collection.source)
        result: dict[str, Any] = {"source": collection.source, "split": collection.split,
                                  "documents_source": documents.description, **query_record}

        base_model = self.models.mice(suite.index_model)
        bare_before = self._bare_forward(base_model, "before indexing")
        base_name = self.indexes.ensure(self._chain(None))
        bare_after = self._bare_forward(base_model, "after indexing")
        for system in suite.systems:
            self.indexes.ensure(self._chain(system))
        base = self.indexes.records[base_name]
        base["bare_forward"] = _bare_summary(bare_before, bare_after, base)
        result["indexes"] = self.indexes.records
        result["base_index"] = base_name

        from .evaluation import compare_subsets, significance

        systems: dict[str, dict[str, Any]] = {}
        for system in suite.systems:
            subset = queries[: system.max_queries] if system.max_queries else queries
            systems[system.name] = self._run_system(system, subset, qrels)
        reference = suite.systems[0].name
        for system in suite.systems[1:]:
            systems[system.name]["significance"] = significance(
                systems[system.name], systems[reference], reference, suite.metrics,
                suite.significance, suite.alpha, suite.seed)
        result["systems"] = systems
        result["subsets"] = compare_subsets(systems, [query.id for query in queries],
                                            suite.metrics)

        if suite.efficiency.interaction_queries:
            result["interaction"] = self._interaction(queries, base_name)
        return result

    # ----------------------------------------------------------------------------------------
    def _queries(self):
        from ..sources import read_qrels, read_queries

        collection = self.collection
        queries = read_queries(collection.source, split=collection.split)
        qrels = read_qrels(collection.source, split=collection.split)
        texts = {query.id for query in queries}
        judged = [query for query in queries if query.id in qrels]
        without_text = sorted(set(qrels) - texts)
        if without_text:
            logger.warning("%s: %d judged queries have no text and are left out, for example %s",
                           collection.name, len(without_text), without_text[:5])
        if not judged:
            raise BenchError(f"collection {collection.name!r}: no query of {collection.source} "
                             f"is judged in its {collection.split!r} qrels")
        if self.suite.query_order == "random":
            random.Random(self.suite.seed).shuffle(judged)
        qrels = {query.id: qrels[query.id] for query in judged}
        return judged, qrels, {
            "queries": len(queries), "judged_queries": len(judged),
            "judged_without_text": len(without_text), "query_order": self.suite.query_order,
        }

    def _bare_forward(self, model: Any, label: str) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from .probes import bare_forward_throughput

        count = self.suite.efficiency.bare_forward_documents
        if not count:
            return {}
        texts = _sample_documents(self.collection.source, count, self.suite.seed)
        with tqdm(total=len(texts), unit="doc", desc=f"bare forward {label}",
                  disable=not self.options.show_progress, dynamic_ncols=True) as bar:
            result = bare_forward_throughput(model, texts, self.suite.batch_size,
                                             on_batch=bar.update)
        result["when"] = label
        return result

    def _run_system(self, system: SystemSpec, queries: list, qrels: dict) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from ..evaluation import write_trec_run
        from .evaluation import evaluate_system
        from .indexes import system_index_bytes
        from .systems import run_system

        index_name = self.indexes.ensure(self._chain(system))
        batch_size = system.reranker_batch_size
        searcher = self._searcher(index_name, batch_size)
        cross_encoder = None
        if system.reranker == "cross-encoder":
            cross_encoder = self.models.cross_encoder(system.model, searcher.model)
        logger.info("%s: running %s on %d queries", self.collection.name, system.name,
                    len(queries))
        with tqdm(total=len(queries), unit="query", desc=f"{self.collection.name} {system.name}",
                  disable=not self.options.show_progress, dynamic_ncols=True) as bar:
            outcome = run_system(system, searcher, queries, self.suite.depth, device=self.device,
                                 cross_encoder=cross_encoder, batch_size=batch_size,
                                 on_query=bar.update)
        slug = "".join(c if c.isalnum() or c in "._-" else "-" for c in system.name)
        run_file = self.output / "runs" / f"{self.collection.name}.{slug}.trec"
        write_trec_run(run_file, outcome.run, slug)
        index_bytes, holds = system_index_bytes(system, self.indexes.records[index_name])
        return {
            "first_stage": system.first_stage, "reranker": system.reranker,
            "model": system.model, "candidates": system.candidates if system.reranker != "none"
            else self.suite.depth,
            "depth": self.suite.depth, "compression": system.compression,
            "index_options": system.index_options, "search_options": system.search_options,
            "index": index_name, "index_bytes": index_bytes, "index_holds": holds,
            "run_file": str(run_file.relative_to(self.output)),
            "max_queries": system.max_queries, "batch_size": batch_size,
            **evaluate_system(outcome, queries, qrels, self.suite.metrics),
        }

    def _interaction(self, queries: list, base_name: str) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from .interaction import interaction_benchmark

        efficiency = self.suite.efficiency
        mice_system = next((system for system in self.suite.systems
                            if system.reranker == "mice"), SystemSpec("mice", reranker="mice"))
        searcher = self._searcher(base_name, mice_system.reranker_batch_size)
        ce_system = next((system for system in self.suite.systems
                          if system.reranker == "cross-encoder"),
                         SystemSpec("cross-encoder", reranker="cross-encoder"))
        key = ce_system.model or ("cross-encoder" if "cross-encoder" in self.suite.models
                                  else None)
        cross_encoder = self.models.cross_encoder(key, searcher.model)
        chosen = queries[: efficiency.interaction_queries]
        logger.info("%s: interaction micro-benchmark on %d queries", self.collection.name,
                    len(chosen))
        with tqdm(total=len(chosen), unit="query", desc=f"{self.collection.name} interaction",
                  disable=not self.options.show_progress, dynamic_ncols=True) as bar:
            result = interaction_benchmark(
                searcher, cross_encoder, chosen, candidates=efficiency.interaction_candidates,
                cross_encoder_batch_size=ce_system.reranker_batch_size,
                device=self.device, matmul_size=efficiency.matmul_size,
                profile=efficiency.profile, on_query=bar.update)
        result["index"] = base_name
        result["mice_model"] = self.suite.index_model
        result["cross_encoder_model"] = key or "default"
        return result


def _bare_summary(before: dict[str, Any], after: dict[str, Any],
                  index: dict[str, Any]) -> dict[str, Any]:
    """Indexing throughput as a fraction of the bare forward pass, measured two ways.

    ``indexing_fraction`` divides by the bare forward pass of the probe, timed before and
    after the build on a sample of the documents. ``indexing_fraction_in_build`` divides by the
    forward passes timed inside the build itself, so that load from other work on the machine
    slows both sides alike.
    """
    summary: dict[str, Any] = {}
    if index["forward_seconds"]:
        summary["indexing_fraction_in_build"] = round(
            index["forward_seconds"] / index["build_seconds"], 4)
    if before:
        bare = (before["tokens_per_second"] + after["tokens_per_second"]) / 2
        summary.update({"before": before, "after": after, "tokens_per_second": round(bare, 1)})
        summary["indexing_fraction"] = round(index["tokens_per_second"] / bare, 4)
        summary["encoding_fraction"] = round(index["encode_tokens_per_second"] / bare, 4)
    if not index["measured_in_this_run"]:
        summary = {key: value for key, value in summary.items()
                   if key in ("before", "after", "tokens_per_second")}
    return summary


def _sample_documents(source: str, count: int, seed: int) -> list[str]:
    """Full texts of ``count`` documents of ``source`` drawn with ``seed`` (all when fewer)."""
    from ..sources import open_documents

    documents = open_documents(source)
    total = documents.count()
    if total is None:
        texts = [document.full_text() for document in documents]
        from .probes import sample_texts

        return sample_texts(texts, count, seed)
    chosen = set(random.Random(seed).sample(range(total), min(count, total)))
    return [document.full_text() for position, document in enumerate(documents)
            if position in chosen]
