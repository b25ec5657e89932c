"""Running a benchmark suite: indexes, systems, quality, efficiency, and the record they make."""

from __future__ import annotations

import hashlib
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

import numpy as np

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
    # Reuse a complete index of the same source and model instead of building it. Its indexing
    # figures then come from its manifest, so they were not measured in this run.
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
    check_capabilities(suite, plots=options.plots)
    output = _prepare_output(Path(options.output), options.overwrite)
    from ..indexing import library_versions, resolve_device
    from .probes import git_state, hardware, load_average, matmul_rate

    device = resolve_device(options.device)
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
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
    models = _Models(suite, device)
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


def check_capabilities(suite: Suite, *, plots: bool = True) -> None:
    """Raise a :class:`BenchError` when the suite needs a feature this build of mice-engine
    lacks, before anything runs."""
    from ..indexing import build_index
    from ..search import Searcher

    index_parameters = set(inspect.signature(build_index).parameters)
    search_parameters = set(inspect.signature(Searcher.search).parameters)
    for system in suite.systems:
        label = f"system {system.name!r}"
        if system.compression and "compression" not in index_parameters:
            raise BenchError(f"{label} asks for compression {system.compression!r}, but this "
                             "version of mice-engine stores float16 states only; remove "
                             "compression from the suite or update mice-engine")
        if system.first_stage != "bm25" and "first_stage" not in search_parameters:
            raise BenchError(f"{label} asks for the {system.first_stage} first stage, but this "
                             "version of mice-engine has only BM25; set first_stage = \"bm25\" "
                             "or update mice-engine")
        unknown = set(system.index_options) - index_parameters
        if unknown:
            raise BenchError(f"{label}: index_options {sorted(unknown)} are not parameters of "
                             f"build_index ({', '.join(sorted(index_parameters))})")
        unknown = set(system.search_options) - search_parameters
        if unknown or {"k", "candidates", "query"} & set(system.search_options):
            raise BenchError(f"{label}: search_options {sorted(system.search_options)} must be "
                             "parameters of Searcher.search other than query, k and candidates "
                             f"({', '.join(sorted(search_parameters - {'self', 'query'}))})")
    needs_cross_encoder = any(system.reranker == "cross-encoder" for system in suite.systems)
    if needs_cross_encoder or suite.efficiency.interaction_queries:
        try:
            from .. import cross_encoder  # noqa: F401
        except ImportError:
            raise BenchError(
                "this suite needs the full cross-encoder (a cross-encoder system or the "
                "interaction micro-benchmark), but mice_engine.cross_encoder is not available; "
                "remove those systems and set efficiency.interaction_queries = 0"
            ) from None
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("the PNG plots need matplotlib; install it with "
                             "`pip install mice-engine[bench]`, or pass --no-plots") from None


def _prepare_output(output: Path, overwrite: bool) -> Path:
    if output.exists() and not output.is_dir():
        raise BenchError(f"{output} exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()):
        if not (output / RECORD_FILE).is_file():
            raise BenchError(f"{output} exists, is not empty and contains no {RECORD_FILE}; choose "
                             "another --output folder")
        if not overwrite:
            raise BenchError(f"{output} already contains benchmark results; pass --overwrite to "
                             "replace them or choose another --output")
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


def _index_key(model_key: str, system: SystemSpec | None) -> dict[str, Any]:
    options = dict(system.index_options) if system else {}
    if system and system.compression:
        options["compression"] = system.compression
    return {"model": model_key, "options": options}


def _index_name(collection: str, key: dict[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True)
    slug = "".join(character if character.isalnum() or character in "._-" else "-"
                   for character in key["model"])
    return f"{collection}-{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


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
        self.indexes: dict[str, dict[str, Any]] = {}
        # Open indexes, shared by the searchers of every system that reads them.
        self.opened: dict[str, Any] = {}

    def close(self) -> None:
        for index in self.opened.values():
            index.close()
        self.opened.clear()

    def _searcher(self, index_name: str, batch_size: int):
        """A searcher over an open index, with the model that built it."""
        from ..search import Searcher

        key = self.indexes[index_name]["key"]
        return Searcher(self.opened[index_name], model=self.models.mice(key["model"]),
                        device=self.device, batch_size=batch_size)

    def run(self) -> dict[str, Any]:
        from ..sources import open_documents

        suite, collection = self.suite, self.collection
        queries, qrels, query_record = self._queries()
        documents = open_documents(collection.source)
        result: dict[str, Any] = {"source": collection.source, "split": collection.split,
                                  "documents_source": documents.description, **query_record}

        base_key = _index_key(suite.index_model, None)
        base_model = self.models.mice(suite.index_model)
        bare_before = self._bare_forward(base_model, "before indexing")
        for key in [base_key, *[_index_key(system.model, system) for system in suite.systems
                                if system.uses_index_states]]:
            self._index(key)
        bare_after = self._bare_forward(base_model, "after indexing")
        base_name = _index_name(collection.name, base_key)
        self.indexes[base_name]["bare_forward"] = _bare_summary(
            bare_before, bare_after, self.indexes[base_name])
        result["indexes"] = self.indexes
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

    def _index(self, key: dict[str, Any]) -> None:
        from ..indexing import MANIFEST_FILE, build_index, read_manifest
        from ..search import Index
        from .probes import PeakMemory, folder_bytes

        name = _index_name(self.collection.name, key)
        if name in self.indexes:
            return
        path = Path(self.options.index_dir) / self.suite.name / name
        model = self.models.mice(key["model"])
        reused = False
        memory = PeakMemory(self.device)
        if self.options.reuse_indexes and (path / MANIFEST_FILE).is_file():
            manifest = read_manifest(path)
            reused = (manifest["model"]["sha256"] == model.weights_sha256()
                      and manifest["source"] == _source_description(self.collection.source)
                      and manifest["build"]["batch_size"] == self.suite.batch_size)
            if not reused:
                logger.warning("index %s was built with another model, source or batch size; "
                               "rebuilding it", path)
        if not reused:
            logger.info("indexing %s into %s", self.collection.name, path)
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = "overwrite" if path.exists() and any(path.iterdir()) else "create"
            with memory:
                manifest = build_index(self.collection.source, path, model=model,
                                       batch_size=self.suite.batch_size, device=self.device,
                                       mode=mode, show_progress=self.options.show_progress,
                                       **key["options"])
        tokens = manifest["counts"]["tokens"]
        build = manifest["build"]
        index_bytes = folder_bytes(path)
        self.indexes[name] = {
            "path": str(path), "key": key, "reused": reused,
            "measured_in_this_run": not reused,
            "documents": manifest["counts"]["documents"], "tokens": tokens,
            "truncated_documents": manifest["counts"]["truncated_documents"],
            "build_seconds": build["seconds"], "encode_seconds": build["encode_seconds"],
            "documents_per_second": round(manifest["counts"]["documents"] / build["seconds"], 2),
            "tokens_per_second": round(tokens / build["seconds"], 1),
            "encode_documents_per_second": build["documents_per_second"],
            "encode_tokens_per_second": build["tokens_per_second"],
            # Forward passes alone, timed inside the build (absent from older manifests).
            "forward_seconds": build.get("forward_seconds"),
            "forward_tokens_per_second": build.get("forward_tokens_per_second"),
            "batch_size": build["batch_size"],
            "bytes": index_bytes,
            "bytes_per_token": round(index_bytes / tokens, 2),
            "state_bytes_per_token": manifest["states"]["bytes_per_token"],
            "states_file_bytes": manifest["states"]["bytes"],
            "compression": manifest["states"].get("compression"),
            "bm25_bytes": folder_bytes(path / "bm25"),
            "text_bytes": _text_bytes(path / manifest["states"]["file"]),
            "model_sha256": manifest["model"]["sha256"],
            "states_sha256": manifest["states"]["sha256"],
            **({} if reused else {"memory": memory.record()}),
        }
        self.opened[name] = Index(path)

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
        from .systems import run_system

        if system.uses_index_states:
            index_name = _index_name(self.collection.name, _index_key(system.model, system))
        else:
            index_name = _index_name(self.collection.name, _index_key(self.suite.index_model,
                                                                     None))
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
        index = self.indexes[index_name]
        if system.reranker == "mice":
            index_bytes, holds = index["bytes"], "whole MICE index (states, texts, BM25)"
        elif system.reranker == "cross-encoder":
            index_bytes = index["bm25_bytes"] + index["text_bytes"]
            holds = "BM25 index and document texts"
        else:
            index_bytes, holds = index["bm25_bytes"], "BM25 index"
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


def _source_description(source: str) -> str:
    from ..sources import open_documents

    return open_documents(source).description


def _text_bytes(states_file: Path) -> int:
    """Bytes of the ids, titles and texts inside a state store."""
    import h5py

    total = 0
    with h5py.File(states_file, "r") as handle:
        for name in ("doc_ids", "titles", "texts"):
            for part in ("data", "offsets"):
                dataset = handle[name][part]
                total += int(np.prod(dataset.shape)) * dataset.dtype.itemsize
    return total
