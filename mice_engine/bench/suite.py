"""Benchmark suites: TOML files that name collections, systems, metrics and efficiency probes.

A suite file looks like this (every key but ``name``, ``collections`` and ``systems`` is
optional; the values shown are the defaults)::

    name = "scifact"
    description = ""
    seed = 0                 # query subsets, bare-forward sample, randomisation test
    query_order = "first"    # "first": subsets are the first N judged queries in file order;
                             # "random": the first N of a seeded permutation
    depth = 100              # results kept per query (R@100 needs 100)
    metrics = ["nDCG@10", "RR@10", "R@100"]
    significance = "paired-t"   # or "randomization"
    alpha = 0.05
    batch_size = 32          # documents per forward pass when indexing

    [models]                 # name -> "default", a model folder, a backbone folder or id
    mice = "default"
    cross-encoder = "default"

    [[collections]]
    name = "scifact"
    source = "../../../shared/data/scifact"   # BEIR folder or irds:<id>
    split = "test"

    [[systems]]
    name = "bm25>mice"
    first_stage = "bm25"     # bm25, dense or hybrid
    reranker = "mice"        # none, mice or cross-encoder
    model = "mice"           # a key of [models]
    candidates = 100
    max_queries = 0          # 0: every judged query
    batch_size = 0           # candidates per forward pass (0: 128 for MICE, 32 for the
                             # cross-encoder)
    compression = ""         # state compression of the system's index (MICE only)
    index_options = {}       # extra keyword arguments of build_index
    search_options = {}      # extra keyword arguments of Searcher.search

    [efficiency]
    bare_forward_documents = 512   # documents timed through the bare lower layers
    interaction_queries = 10       # queries of the MICE : cross-encoder micro-benchmark
    interaction_candidates = 100
    matmul_size = 1024             # square float32 matrices timed for the matmul rate
    profile = true                 # profile the interaction stage of one query

Relative paths (collection sources, model folders) are resolved against the suite file's folder.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FIRST_STAGES = ("bm25", "dense", "hybrid")
# Candidates per forward pass when a system sets no batch_size: the Searcher's default for MICE,
# and for the cross-encoder a size that keeps its attention masks (batch x 512 x 512) small.
MICE_BATCH_SIZE = 128
CROSS_ENCODER_BATCH_SIZE = 32
RERANKERS = ("none", "mice", "cross-encoder")
QUERY_ORDERS = ("first", "random")
# Keys of a system's index_options: arguments of build_index, then settings of the storage
# stages (see mice_engine.storage.StorageOptions).
BUILD_OPTIONS = ("long_documents", "window_stride", "chunk_size")
STORAGE_OPTIONS = ("keep_float16", "dense_kind", "max_train_vectors", "max_train_mib", "seed")
SIGNIFICANCE_TESTS = ("paired-t", "randomization")
DEFAULT_MODEL = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._>+@-]*")


class BenchError(ValueError):
    """A suite that cannot be run as written, or a benchmark that cannot go on."""


@dataclass
class CollectionSpec:
    name: str
    source: str
    split: str = "test"


@dataclass
class SystemSpec:
    name: str
    first_stage: str = "bm25"
    reranker: str = "none"
    model: str | None = None
    candidates: int = 100
    max_queries: int = 0
    # Candidates per forward pass of the reranker; 0 picks the reranker's default.
    batch_size: int = 0
    compression: str | None = None
    index_options: dict[str, Any] = field(default_factory=dict)
    search_options: dict[str, Any] = field(default_factory=dict)

    @property
    def reranker_batch_size(self) -> int:
        if self.batch_size:
            return self.batch_size
        return CROSS_ENCODER_BATCH_SIZE if self.reranker == "cross-encoder" else MICE_BATCH_SIZE

    @property
    def uses_index_states(self) -> bool:
        """Whether the system reads stored MICE states, so that its index settings matter."""
        return self.reranker == "mice"


@dataclass
class EfficiencySpec:
    bare_forward_documents: int = 512
    interaction_queries: int = 10
    interaction_candidates: int = 100
    matmul_size: int = 1024
    profile: bool = True


@dataclass
class Suite:
    name: str
    path: Path | None
    collections: list[CollectionSpec]
    systems: list[SystemSpec]
    models: dict[str, str]
    description: str = ""
    seed: int = 0
    query_order: str = "first"
    depth: int = 100
    metrics: list[str] = field(default_factory=lambda: ["nDCG@10", "RR@10", "R@100"])
    significance: str = "paired-t"
    alpha: float = 0.05
    batch_size: int = 32
    efficiency: EfficiencySpec = field(default_factory=EfficiencySpec)
    text: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def index_model(self) -> str:
        """Model key that indexes every collection: the first MICE system's, else ``mice``."""
        for system in self.systems:
            if system.reranker == "mice":
                return system.model or "mice"
        return "mice"

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["path"] = str(self.path) if self.path else None
        values.pop("text")
        return values


_TOP_KEYS = {"name", "description", "seed", "query_order", "depth", "metrics", "significance",
             "alpha", "batch_size", "models", "collections", "systems", "efficiency"}


def load_suite(path: str | Path, *, models: dict[str, str] | None = None,
               sources: dict[str, str] | None = None, max_queries: int | None = None,
               systems: list[str] | None = None) -> Suite:
    """Read and check a suite file.

    Args:
        path: the TOML file.
        models: ``{model key: spec}`` that replace entries of ``[models]`` (or add them).
        sources: ``{collection name: source}`` that replace collection sources.
        max_queries: a cap on every system's number of queries and on the queries of the
            interaction micro-benchmark (0 or None: no cap).
        systems: names of the systems to run, in the suite's order (None: all of them).

    Raises:
        BenchError: the file is missing or invalid; the message names the key and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"suite file {path} not found; pass the path of a .toml suite, for "
                         "example benchmarks/suites/smoke.toml")
    text = path.read_text(encoding="utf-8")
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise BenchError(f"suite file {path} is not valid TOML: {error}") from None
    return parse_suite(values, path=path, text=text, models=models, sources=sources,
                       max_queries=max_queries, systems=systems)


def parse_suite(values: dict[str, Any], *, path: Path | None = None, text: str = "",
                models: dict[str, str] | None = None, sources: dict[str, str] | None = None,
                max_queries: int | None = None, systems: list[str] | None = None) -> Suite:
    """Build a :class:`Suite` from parsed TOML ``values``; see :func:`load_suite`."""
    where = f"suite {path}" if path else "suite"
    _reject_unknown(values, _TOP_KEYS, where)
    base = path.parent if path else Path.cwd()

    name = _get(values, "name", str, where, required=True)
    if not _NAME.fullmatch(name):
        raise BenchError(f"{where}: name {name!r} is invalid; use letters, digits, '.', '_' "
                         "and '-' (it names the results folder)")
    suite = Suite(name=name, path=path, collections=[], systems=[], models={}, text=text)
    suite.description = _get(values, "description", str, where, default="")
    suite.seed = _get(values, "seed", int, where, default=0)
    suite.query_order = _choice(values, "query_order", QUERY_ORDERS, where, "first")
    suite.depth = _positive(values, "depth", where, 100)
    suite.metrics = _get(values, "metrics", list, where, default=list(suite.metrics))
    if not suite.metrics or not all(isinstance(metric, str) for metric in suite.metrics):
        raise BenchError(f"{where}: metrics must be a non-empty list of ir-measures names such "
                         "as \"nDCG@10\"")
    suite.significance = _choice(values, "significance", SIGNIFICANCE_TESTS, where, "paired-t")
    suite.alpha = float(_get(values, "alpha", (int, float), where, default=0.05))
    if not 0 < suite.alpha < 1:
        raise BenchError(f"{where}: alpha {suite.alpha} must be between 0 and 1")
    suite.batch_size = _positive(values, "batch_size", where, 32)

    model_table = _get(values, "models", dict, where, default={})
    for key, spec in {**model_table, **(models or {})}.items():
        if not isinstance(spec, str) or not spec:
            raise BenchError(f"{where}: models.{key} must be \"default\" or a model path or id, "
                             f"got {spec!r}")
        suite.models[key] = _resolve_path(spec, base)

    suite.collections = _parse_collections(values, where, base, sources or {})
    suite.systems = _parse_systems(values, where, suite)
    if systems:
        unknown = sorted(set(systems) - {system.name for system in suite.systems})
        if unknown:
            raise BenchError(f"{where}: no system named {unknown}; the suite has "
                             f"{[system.name for system in suite.systems]}")
        suite.systems = [system for system in suite.systems if system.name in systems]
    if max_queries:
        if max_queries < 0:
            raise BenchError(f"max_queries={max_queries} is invalid: it must be 0 (every query) "
                             "or more")
        for system in suite.systems:
            system.max_queries = min(system.max_queries or max_queries, max_queries)
    suite.efficiency = _parse_efficiency(values, where)
    if max_queries:
        suite.efficiency.interaction_queries = min(suite.efficiency.interaction_queries,
                                                   max_queries)
    if suite.index_model not in suite.models:
        suite.models[suite.index_model] = DEFAULT_MODEL
    return suite


def _parse_collections(values: dict[str, Any], where: str, base: Path,
                       overrides: dict[str, str]) -> list[CollectionSpec]:
    entries = _get(values, "collections", list, where, required=True)
    if not entries:
        raise BenchError(f"{where}: collections is empty; add at least one [[collections]] table")
    collections = []
    for number, entry in enumerate(entries):
        label = f"{where}: collections[{number}]"
        if not isinstance(entry, dict):
            raise BenchError(f"{label} must be a table with name and source")
        _reject_unknown(entry, {"name", "source", "split"}, label)
        name = _get(entry, "name", str, label, required=True)
        if not _NAME.fullmatch(name):
            raise BenchError(f"{label}: name {name!r} is invalid; use letters, digits, '.', '_' "
                             "and '-'")
        source = overrides.get(name) or _get(entry, "source", str, label, required=True)
        collections.append(CollectionSpec(name, _resolve_path(source, base),
                                          _get(entry, "split", str, label, default="test")))
    _reject_repeats([collection.name for collection in collections], where, "collection")
    unknown = set(overrides) - {collection.name for collection in collections}
    if unknown:
        raise BenchError(f"{where}: no collection named {sorted(unknown)}; the suite has "
                         f"{[collection.name for collection in collections]}")
    return collections


_SYSTEM_KEYS = {"name", "first_stage", "reranker", "model", "candidates", "max_queries",
                "batch_size", "compression", "index_options", "search_options"}


def _parse_systems(values: dict[str, Any], where: str, suite: Suite) -> list[SystemSpec]:
    entries = _get(values, "systems", list, where, required=True)
    if not entries:
        raise BenchError(f"{where}: systems is empty; add at least one [[systems]] table")
    systems = []
    for number, entry in enumerate(entries):
        label = f"{where}: systems[{number}]"
        if not isinstance(entry, dict):
            raise BenchError(f"{label} must be a table")
        _reject_unknown(entry, _SYSTEM_KEYS, label)
        name = _get(entry, "name", str, label, required=True)
        label = f"{where}: system {name!r}"
        if not _NAME.fullmatch(name):
            raise BenchError(f"{label}: the name is invalid; use letters, digits and . _ - > + @")
        system = SystemSpec(name=name)
        system.first_stage = _choice(entry, "first_stage", FIRST_STAGES, label, "bm25")
        system.reranker = _choice(entry, "reranker", RERANKERS, label, "none")
        system.candidates = _positive(entry, "candidates", label, max(100, suite.depth))
        system.max_queries = _get(entry, "max_queries", int, label, default=0)
        if system.max_queries < 0:
            raise BenchError(f"{label}: max_queries must be 0 (every query) or positive")
        system.batch_size = _get(entry, "batch_size", int, label, default=0)
        if system.batch_size < 0:
            raise BenchError(f"{label}: batch_size must be 0 (the reranker's default) or "
                             "positive")
        system.compression = _get(entry, "compression", str, label, default="") or None
        system.index_options = _get(entry, "index_options", dict, label, default={})
        unknown = sorted(set(system.index_options) - set(BUILD_OPTIONS + STORAGE_OPTIONS))
        if unknown:
            raise BenchError(f"{label}: index_options {unknown} are unknown; use "
                             f"{', '.join(BUILD_OPTIONS + STORAGE_OPTIONS)}")
        system.search_options = _get(entry, "search_options", dict, label, default={})
        model = _get(entry, "model", str, label, default="")
        if system.reranker == "none":
            if model:
                raise BenchError(f"{label}: a system without a reranker takes no model; "
                                 "remove model or set reranker")
        else:
            system.model = model or ("mice" if system.reranker == "mice" else "cross-encoder")
            if system.model not in suite.models:
                if model:
                    raise BenchError(f"{label}: model {model!r} is not in [models] "
                                     f"({sorted(suite.models)}); add it there")
                suite.models[system.model] = DEFAULT_MODEL
        if system.reranker != "mice" and (system.compression or system.index_options):
            raise BenchError(f"{label}: compression and index_options apply to the stored "
                             "states, which only a MICE reranker reads; remove them or set "
                             "reranker = \"mice\"")
        if system.reranker != "none" and system.candidates < suite.depth:
            raise BenchError(f"{label}: candidates ({system.candidates}) must be at least the "
                             f"suite's depth ({suite.depth})")
        systems.append(system)
    _reject_repeats([system.name for system in systems], where, "system")
    return systems


def _parse_efficiency(values: dict[str, Any], where: str) -> EfficiencySpec:
    table = _get(values, "efficiency", dict, where, default={})
    label = f"{where}: efficiency"
    _reject_unknown(table, set(EfficiencySpec.__dataclass_fields__), label)
    spec = EfficiencySpec()
    for key in ("bare_forward_documents", "interaction_queries", "interaction_candidates",
                "matmul_size"):
        value = _get(table, key, int, label, default=getattr(spec, key))
        # With 0 documents or queries the probe is off, but a matrix or a candidate list cannot
        # be empty.
        minimum = 1 if key in ("interaction_candidates", "matmul_size") else 0
        if value < minimum:
            rule = "at least 1" if minimum else "0 (no probe) or more"
            raise BenchError(f"{label}: {key} must be {rule}, got {value}")
        setattr(spec, key, value)
    spec.profile = _get(table, "profile", bool, label, default=True)
    return spec


def _resolve_path(value: str, base: Path) -> str:
    """Resolve a relative path against the suite's folder when it names an existing path.

    ``default``, ``irds:`` ids and Hugging Face ids stay as written.
    """
    if value == DEFAULT_MODEL or value.startswith("irds:"):
        return value
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    if candidate.exists() or value.startswith((".", "/", "~")):
        return str(candidate.resolve())
    return value


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, *,
         default: Any = None, required: bool = False) -> Any:
    if key not in table:
        if required:
            raise BenchError(f"{where}: {key} is missing")
        return default
    value = table[key]
    # bool is an int in Python; a flag written where a number belongs is a mistake.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BenchError(f"{where}: {key} must be {_KIND_NAMES.get(expected, expected)}, got "
                         f"{value!r}")
    return value


_KIND_NAMES = {"str": "a string", "int": "an integer", "list": "a list", "dict": "a table",
               "bool": "true or false", "int or float": "a number"}


def _positive(table: dict[str, Any], key: str, where: str, default: int) -> int:
    value = _get(table, key, int, where, default=default)
    if value < 1:
        raise BenchError(f"{where}: {key} must be at least 1, got {value}")
    return value


def _choice(table: dict[str, Any], key: str, choices: tuple[str, ...], where: str,
            default: str) -> str:
    value = _get(table, key, str, where, default=default)
    if value not in choices:
        raise BenchError(f"{where}: {key} {value!r} is invalid; use one of {', '.join(choices)}")
    return value


def _reject_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r}; known keys are "
                         f"{', '.join(sorted(known))}")


def _reject_repeats(names: list[str], where: str, kind: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise BenchError(f"{where}: two {kind}s are named {name!r}; give each a unique name")
        seen.add(name)
