"""The ``mice`` command: a thin Typer layer over the :mod:`mice_engine` Python API.

Only typer and the standard library load at start-up. Torch, transformers, h5py and bm25s load
inside the commands that need them, so ``mice --help`` and argument errors return at once.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup


class _EmptyFlagMetavar:
    """Leave the type column of the rich help empty for flags.

    typer 0.29's rich help prints ``<bool>`` beside every flag, --help included, though a flag
    takes no value. Its plain help prints nothing there, and an empty metavar makes the rich
    help do the same.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _clear_flag_metavar(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _clear_flag_metavar(option)
        return option


def _clear_flag_metavar(param) -> None:
    if getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""


class FlagCommand(_EmptyFlagMetavar, TyperCommand):
    """A command whose help shows no type for flags."""


class FlagGroup(_EmptyFlagMetavar, TyperGroup):
    """The ``mice`` group, whose help shows no type for --help."""


app = typer.Typer(
    name="mice",
    cls=FlagGroup,
    help="Index, search and evaluate collections with MICE (Minimal Interaction Cross-Encoders).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

UNTRAINED_NOTE = (
    "note: this model's MICE head is untrained, so its ranking is close to random; compare "
    "with --first-stage-only (BM25) and use a trained model for real results"
)


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


class LongDocumentPolicy(str, Enum):
    truncate = "truncate"
    windows = "windows"


class DuplicatePolicy(str, Enum):
    error = "error"
    first = "first"


class FirstStage(str, Enum):
    bm25 = "bm25"
    dense = "dense"
    hybrid = "hybrid"


class DenseKind(str, Enum):
    auto = "auto"
    ivfpq = "ivfpq"
    flat = "flat"


COMPRESSION_HELP = ("How states are stored: float16 (768 bytes per token at hidden size 384), int8 "
                    "(384), int4 (192), ivfpqM: M-byte product-quantisation codes of the "
                    "residuals to coarse k-means centroids, plus 1 or 2 bytes for the centroid "
                    "(ivfpq64: 66 bytes per token; M must divide the hidden size), or "
                    "opq-ivfpqM: the same after a learned rotation (lower error, slower "
                    "training).")


def _setup_logging(quiet: bool) -> None:
    # force=True: a command owns the process's logging, and its handler must write to the
    # standard error of this invocation.
    logging.basicConfig(format="%(levelname)s: %(message)s", stream=sys.stderr,
                        level=logging.WARNING, force=True)
    logging.getLogger("mice_engine").setLevel(logging.WARNING if quiet else logging.INFO)


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(code=2)


def _expected_errors() -> tuple[type[Exception], ...]:
    from mice_engine.indexing import MiceIndexError
    from mice_engine.model import ModelError
    from mice_engine.sources import SourceError
    from mice_engine.store import StoreError

    return (MiceIndexError, ModelError, SourceError, StoreError, ValueError, FileNotFoundError)


def _storage_summary(manifest: dict) -> str:
    """Describe how an index stores its states, and its dense index if it has one."""
    states = manifest["states"]
    codec = states.get("codec") or {}
    line = (f"states: {codec.get('name', 'float16')}, {states['bytes_per_token']} bytes per "
            f"stored token ({states['file_bytes_per_token']} with ids and texts)")
    if codec.get("fallback_reason"):
        line += f"; {codec['requested']} fell back to {codec['name']}: {codec['fallback_reason']}"
    if states.get("float16_kept") and codec.get("name", "float16") != "float16":
        line += "; float16 states kept beside the codes"
    dense = manifest["first_stage"].get("dense")
    if dense is not None:
        size = manifest.get("files", {}).get(dense["path"], {}).get("bytes", 0)
        line += (f"\ndense index: {dense['kind']}, {dense['tokens']:,} token vectors, "
                 f"{_human_bytes(size)}")
        if dense.get("inverted_lists"):
            line += f", {dense['inverted_lists']:,} inverted lists, {dense['pq_bytes']}-byte codes"
    return line


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count} B"


def _default_index_name(source: str) -> str:
    """``irds:beir/scifact/test`` gives ``beir-scifact-test``; ``data/corpus.jsonl.gz`` gives
    ``corpus``; a folder gives its own name."""
    if source.startswith("irds:"):
        return source.removeprefix("irds:").strip("/").replace("/", "-") or "index"
    name = Path(source).resolve().name
    for suffix in (".gz", ".jsonl", ".tsv"):
        name = name.removesuffix(suffix)
    return name or "index"


@app.command(cls=FlagCommand)
def index(
    source: Annotated[str, typer.Argument(help="BEIR folder, .jsonl[.gz]/.tsv corpus file, or irds:<ir_datasets id>.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Index folder to create (default: indexes/<source name>).")] = None,
    model: Annotated[str | None, typer.Option(help="MICE model folder, `default`, or a BERT-family backbone folder or Hugging Face id (untrained head) (default: the shipped MICE-l3+3 trained on SciFact; with a layer or length option: all-MiniLM-L6-v2).")] = None,
    merge_layer: Annotated[int | None, typer.Option(help="X in MICE-lX+Y: number of lower layers (backbone models only) (default: 3).")] = None,
    interaction_layers: Annotated[int | None, typer.Option(help="Y in MICE-lX+Y: number of interaction layers (backbone models only) (default: 3).")] = None,
    doc_max_length: Annotated[int | None, typer.Option(help="Maximum document length in tokens, [CLS] and [SEP] included (backbone models only) (default: 512).")] = None,
    query_max_length: Annotated[int | None, typer.Option(help="Maximum query length in tokens (backbone models only) (default: 64).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Documents per forward pass.")] = 32,
    chunk_size: Annotated[int, typer.Option(min=1, help="Documents per committed shard (the unit that --resume restarts from).")] = 2048,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (the GPU when PyTorch sees one).")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted build of the same source with the same settings, or an interrupted --overwrite rebuild.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild an existing index in .NAME.building beside it; the old one is replaced only when the new one is complete.")] = False,
    on_duplicate: Annotated[DuplicatePolicy, typer.Option(help="What a repeated document id does: stop with an error, or keep the first document with that id.")] = DuplicatePolicy.error,
    long_documents: Annotated[LongDocumentPolicy, typer.Option(help="Documents longer than the maximum length: keep their beginning (truncate), or store overlapping windows and score each document by its best window.")] = LongDocumentPolicy.truncate,
    window_stride: Annotated[int | None, typer.Option(min=1, help="Tokens between the starts of two windows (default: half the maximum length).")] = None,
    compression: Annotated[str, typer.Option(help=COMPRESSION_HELP)] = "float16",
    keep_float16: Annotated[bool, typer.Option("--keep-float16", help="Keep the float16 states beside the codes (768 more bytes per token at hidden size 384), so that other codecs can be derived later.")] = False,
    dense: Annotated[bool, typer.Option("--dense/--no-dense", help="Build the dense first stage: a FAISS index of every stored token state.")] = False,
    dense_index: Annotated[DenseKind, typer.Option(help="Dense index kind: ivfpq (inverted lists, 1 byte per 8 dimensions), flat (exact, 4 bytes per dimension), or auto (flat below 9,984 token states, else ivfpq).")] = DenseKind.auto,
    max_train_vectors: Annotated[int, typer.Option(min=1, help="Maximum number of token states in the training sample of a codec or dense index.")] = 131_072,
    max_train_mib: Annotated[float, typer.Option(min=1, help="Maximum size of that training sample, in MiB of float32.")] = 256,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no informational logs.")] = False,
) -> None:
    """Encode every document through the lower MICE layers and store its per-token states."""
    _setup_logging(quiet)
    if resume and overwrite:
        raise _fail(ValueError("--resume and --overwrite exclude each other; pass one (--resume "
                               "alone continues an interrupted --overwrite)"))
    build_mode = "create"
    if resume:
        build_mode = "resume"
    elif overwrite:
        build_mode = "overwrite"
    if output is None:
        output = Path("indexes") / _default_index_name(source)
    options = {key: value for key, value in {
        "merge_layer": merge_layer, "interaction_layers": interaction_layers,
        "doc_max_length": doc_max_length, "query_max_length": query_max_length,
    }.items() if value is not None}
    import signal

    from mice_engine.indexing import build_index
    from mice_engine.model import load_model
    from mice_engine.sources import open_documents
    from mice_engine.storage import StorageOptions

    storage = StorageOptions(compression=compression, keep_float16=keep_float16, dense=dense,
                             dense_kind=dense_index.value, max_train_vectors=max_train_vectors,
                             max_train_mib=max_train_mib)

    # SIGTERM (from `kill` or a scheduler) ends the build like Ctrl-C, with a message that states
    # what the build left and how to continue it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        open_documents(source)  # a missing source fails before the model loads
        mice_model = load_model(model, **options)
        if not quiet:
            typer.echo(f"model: {mice_model.config.name} from {mice_model.source}", err=True)
        manifest = build_index(
            source, output, model=mice_model, batch_size=batch_size, chunk_size=chunk_size,
            device=device, mode=build_mode,
            on_duplicate=on_duplicate.value, long_documents=long_documents.value,
            window_stride=window_stride, storage=storage, show_progress=not quiet,
        )
    except _expected_errors() as error:
        raise _fail(error) from None
    except KeyboardInterrupt:
        from mice_engine.indexing import interrupted_build_message

        typer.echo(f"interrupted: {interrupted_build_message(output, build_mode)}", err=True)
        raise typer.Exit(code=130) from None
    counts, build = manifest["counts"], manifest["build"]
    typer.echo(f"index: {output}")
    typer.echo(f"documents: {counts['documents']:,}  tokens: {counts['tokens']:,}  "
               f"truncated: {counts['truncated_documents']:,}  split into windows: "
               f"{counts['split_documents']:,}  empty: {counts['empty_documents']:,}"
               f"  skipped duplicates: {counts['skipped_duplicates']:,}")
    typer.echo(f"time: {build['seconds']:.1f} s (encoding {build['encode_seconds']:.1f} s on "
               f"{build['device']}), {build['documents_per_second'] or 0:,.1f} documents/s, "
               f"{build['tokens_per_second'] or 0:,.0f} tokens/s")
    typer.echo(f"size: {_human_bytes(manifest['bytes'])} on disk")
    typer.echo(_storage_summary(manifest))
    if not manifest["model"]["trained"]:
        typer.echo(UNTRAINED_NOTE, err=True)


@app.command(cls=FlagCommand)
def compress(
    source: Annotated[Path, typer.Argument(metavar="SOURCE_INDEX", help="Complete index whose float16 states are coded.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Index folder to create.")],
    compression: Annotated[str, typer.Option(help=COMPRESSION_HELP)] = "ivfpq64",
    keep_float16: Annotated[bool, typer.Option("--keep-float16", help="Keep the float16 states beside the codes.")] = False,
    dense: Annotated[bool | None, typer.Option("--dense/--no-dense", help="Build a dense index from the source's float16 states, or leave it out (default: copy the source's dense index when it has one).")] = None,
    dense_index: Annotated[DenseKind, typer.Option(help="Dense index kind, with --dense: ivfpq, flat or auto.")] = DenseKind.auto,
    max_train_vectors: Annotated[int, typer.Option(min=1, help="Maximum number of token states in a training sample.")] = 131_072,
    max_train_mib: Annotated[float, typer.Option(min=1, help="Maximum size of a training sample, in MiB of float32.")] = 256,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing index at --output once the new one is complete.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no informational logs.")] = False,
) -> None:
    """Derive an index with compressed states (or a dense index) from an index, without encoding
    documents again. The source is not modified."""
    _setup_logging(quiet)
    from mice_engine.storage import StorageOptions, derive_index

    storage = StorageOptions(compression=compression, keep_float16=keep_float16, dense=dense,
                             dense_kind=dense_index.value, max_train_vectors=max_train_vectors,
                             max_train_mib=max_train_mib)
    try:
        manifest = derive_index(source, output, storage,
                                mode="overwrite" if overwrite else "create",
                                show_progress=not quiet)
    except _expected_errors() as error:
        raise _fail(error) from None
    typer.echo(f"index: {output} (from {source})")
    typer.echo(f"size: {_human_bytes(manifest['bytes'])} on disk")
    typer.echo(_storage_summary(manifest))


@app.command(cls=FlagCommand)
def search(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index folder built by `mice index`.")],
    query: Annotated[str | None, typer.Argument(help="Query text. For a query that starts with '-', put every option first, then `--`, then the query.")] = None,
    queries: Annotated[str | None, typer.Option(help="Run a query set instead: a BEIR folder, queries .jsonl/.tsv, or irds:<id>.")] = None,
    split: Annotated[str, typer.Option(help="Split whose judged queries a BEIR folder contributes (qrels/<split>.tsv).")] = "test",
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results per query.")] = 10,
    candidates: Annotated[int, typer.Option(min=1, help="First-stage candidates re-scored by MICE per query.")] = 100,
    first_stage_only: Annotated[bool, typer.Option("--first-stage-only", help="Return the first-stage ranking itself, without MICE.")] = False,
    first_stage: Annotated[FirstStage, typer.Option(help="bm25, dense (the index's FAISS index of token states), or hybrid (both, fused by reciprocal rank fusion with k = 60).")] = FirstStage.bm25,
    nprobe: Annotated[int | None, typer.Option(min=1, help="Inverted lists the dense index visits per query token (default: 32).")] = None,
    token_candidates: Annotated[int | None, typer.Option(min=1, help="Nearest stored tokens per query token in the dense first stage (default: 256 or --candidates, whichever is larger).")] = None,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="text (a readable table) or json.")] = OutputFormat.text,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="TREC run file to write for --queries ('-' for standard output).")] = None,
    tag: Annotated[str | None, typer.Option(help="Run tag in the TREC file (default: mice or bm25).")] = None,
    model: Annotated[str | None, typer.Option(help="Score with this model instead of the index's own (its lower layers must be identical).")] = None,
    fusion: Annotated[bool, typer.Option("--fusion/--no-fusion", help="Blend MICE with BM25 scores (and MaxSim scores of the stored states) when the model carries tuned blend weights (the shipped default does); --no-fusion ranks by MICE alone.")] = True,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Candidates scored per forward pass.")] = 128,
    timings: Annotated[Path | None, typer.Option(help="Write per-query stage timings and their p50/p95 as JSON to this file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no informational logs.")] = False,
) -> None:
    """Search an index with one query, or run a whole query set into a TREC run file."""
    _setup_logging(quiet)
    if (query is None) == (queries is None):
        raise _fail(ValueError("give either a QUERY text or --queries SOURCE, not both or neither"))
    if queries is not None and output is None:
        raise _fail(ValueError("--queries needs --output FILE for the TREC run ('-' for stdout)"))
    if candidates < k:
        raise _fail(ValueError(f"--candidates ({candidates}) must be at least -k ({k})"))
    from mice_engine.search import Searcher

    try:
        searcher = Searcher(index_dir, model=model, device=device, batch_size=batch_size,
                            fusion=fusion)
    except _expected_errors() as error:
        raise _fail(error) from None
    options = {"k": k, "candidates": candidates, "first_stage_only": first_stage_only,
               "first_stage": first_stage.value, "nprobe": nprobe,
               "token_candidates": token_candidates}
    if searcher.blend is not None and not first_stage_only and not quiet:
        typer.echo(_ranking_line(searcher.blend.describe()), err=True)
        tuned = searcher.blend.tuned_candidates
        if searcher.blend.weight is not None and tuned is not None and candidates != tuned:
            typer.echo(f"note: --candidates is {candidates}, but the blend weights were tuned on "
                       f"{tuned} candidates per query. {_CANDIDATE_COUNT_ADVICE}", err=True)
    try:
        if query is not None:
            _search_one(searcher, query, options, output_format, timings)
        else:
            default_tag = first_stage.value if first_stage_only else f"{first_stage.value}-mice"
            if first_stage is FirstStage.bm25 and not first_stage_only:
                default_tag = "mice"
            _search_set(searcher, queries, split, options, output, tag or default_tag, timings,
                        quiet)
    except _expected_errors() as error:
        raise _fail(error) from None
    finally:
        searcher.close()


# The reason behind both notes on candidate counts, in search and in rerank.
_CANDIDATE_COUNT_ADVICE = ("The blend standardises scores over each query's candidates, so the "
                           "weights may suit them less; compare with --no-fusion")


def _ranking_line(description: str) -> str:
    return f"ranking: {description}; --no-fusion ranks by MICE alone"


def _snippet(title: str | None, text: str | None, width: int = 100) -> str:
    value = " ".join(f"{title or ''} {text or ''}".split())
    return value if len(value) <= width else value[: width - 1] + "…"


def _search_one(searcher, query, options, output_format, timings_path):
    from mice_engine.search import resident_memory_mib

    result = searcher.search(query, with_text=True, **options)
    memory = resident_memory_mib()
    if timings_path is not None:
        _write_timings(timings_path, [result.timings], None, memory)
    first_stage_only = options["first_stage_only"]
    if output_format is OutputFormat.json:
        payload = {
            "query": query,
            "system": result.first_stage if first_stage_only else f"{result.first_stage}>mice",
            "model": searcher.model.config.name,
            "model_trained": searcher.model.config.trained,
            "candidates": result.candidates,
            "query_truncated": result.query_truncated,
            "timings_ms": {stage: round(value * 1000, 3) for stage, value in result.timings.items()},
            "memory_mib": memory,
            "hits": [hit.__dict__ for hit in result.hits],
        }
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        return
    if not result.hits:
        typer.echo(f"the {result.first_stage} first stage found no candidate for the query "
                   f"{query!r}")
        return
    if result.query_truncated:
        typer.echo(f"note: the query was cut to {searcher.model.config.query_max_length} tokens "
                   "for MICE (the first stage read it whole)", err=True)
    from rich.console import Console
    from rich.table import Table

    stage_name = {"bm25": "BM25", "dense": "dense", "hybrid": "hybrid"}[result.first_stage]
    system = stage_name if first_stage_only else f"{stage_name} > {searcher.model.config.name}"
    table = Table(title=f"{system}: {len(result.hits)} of {result.candidates} candidates",
                  title_justify="left")
    for column, justify in (("rank", "right"), ("doc id", "left"), ("score", "right"),
                            (f"{result.first_stage} rank", "right"), ("title / text", "left")):
        table.add_column(column, justify=justify, overflow="fold" if column == "doc id" else "ellipsis")
    for hit in result.hits:
        table.add_row(str(hit.rank), hit.doc_id, f"{hit.score:.4f}", str(hit.first_stage_rank),
                      _snippet(hit.title, hit.text))
    Console(width=max(120, Console().width)).print(table)


def _search_set(searcher, source, split, options, output, tag, timings_path, quiet):
    from tqdm.auto import tqdm

    from mice_engine.evaluation import write_trec_run
    from mice_engine.search import latency_summary, resident_memory_mib
    from mice_engine.sources import read_queries

    query_list = read_queries(source, split=split)
    for item in query_list:
        if any(character.isspace() for character in item.id):
            raise ValueError(f"query id {item.id!r} in {source} contains whitespace, which TREC "
                             "run files cannot hold; fix the id before searching")
    run: dict[str, list[tuple[str, float]]] = {}
    per_query = []
    empty = 0
    truncated = 0
    for item in tqdm(query_list, unit="query", desc="searching", disable=quiet,
                     dynamic_ncols=True):
        result = searcher.search(item.text, **options)
        run[item.id] = [(hit.doc_id, hit.score) for hit in result.hits]
        per_query.append(result.timings)
        empty += not result.hits
        truncated += bool(result.query_truncated)
    if str(output) == "-":
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            temporary = Path(folder) / "run.trec"
            write_trec_run(temporary, run, tag)
            sys.stdout.write(temporary.read_text(encoding="utf-8"))
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_trec_run(output, run, tag)
        typer.echo(f"wrote {sum(len(hits) for hits in run.values()):,} results for "
                   f"{len(run):,} queries to {output}", err=True)
    if empty:
        typer.echo(f"{empty} queries got no result (the {options['first_stage']} first stage "
                   "found no candidate)", err=True)
    if truncated:
        limit = searcher.model.config.query_max_length
        typer.echo(f"note: {truncated} queries were cut to {limit} tokens for MICE (the first "
                   "stage read them whole)", err=True)
    summary = latency_summary(per_query)
    lines = [f"  {stage:<15} p50 {values['p50_ms']:8.1f} ms   p95 {values['p95_ms']:8.1f} ms"
             for stage, values in summary.items()]
    typer.echo("latency per query:\n" + "\n".join(lines), err=True)
    memory = resident_memory_mib()
    states_bytes = searcher.index.manifest["states"]["bytes"]
    line = (f"resident memory: {memory['rss_mib']:,.0f} MiB now, {memory['peak_rss_mib']:,.0f} "
            f"MiB at peak")
    if "file_backed_mib" in memory:
        line += (f" (now: {memory['anonymous_mib']:,.0f} MiB anonymous, "
                 f"{memory['file_backed_mib']:,.0f} MiB of mapped files)")
    typer.echo(f"{line}; the state store takes {_human_bytes(states_bytes)} on disk", err=True)
    if timings_path is not None:
        _write_timings(timings_path, per_query, [item.id for item in query_list], memory)


def _write_timings(path: Path, per_query: list[dict], query_ids: list[str] | None,
                   memory: dict[str, float] | None = None) -> None:
    from mice_engine.search import latency_summary

    payload = {"summary_ms": latency_summary(per_query), "per_query_seconds": per_query}
    if memory is not None:
        payload["memory_mib"] = memory
    if query_ids is not None:
        payload["query_ids"] = query_ids
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


@app.command("eval", cls=FlagCommand)
def evaluate(
    run: Annotated[Path, typer.Argument(help="TREC run file (qid Q0 docid rank score tag). Each query's results are ranked by score, equal scores by descending document id, as trec_eval ranks them; the rank column is not used.")],
    qrels: Annotated[str, typer.Option(help="Judgments: a BEIR folder, a qrels file (BEIR TSV or TREC), or irds:<id>.")],
    split: Annotated[str, typer.Option(help="Split of a BEIR folder's qrels/<split>.tsv.")] = "test",
    metric: Annotated[list[str] | None, typer.Option("--metric", "-m", help="ir-measures name, repeatable (default: nDCG@10, RR@10, R@100).")] = None,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="text or json.")] = OutputFormat.text,
    per_query: Annotated[bool, typer.Option("--per-query", help="Also print every query's values.")] = False,
) -> None:
    """Evaluate a run over every judged query: a judged query missing from the run counts as 0."""
    _setup_logging(quiet=False)
    from mice_engine.evaluation import DEFAULT_METRICS, read_trec_run
    from mice_engine.evaluation import evaluate as evaluate_run
    from mice_engine.sources import read_qrels

    try:
        result = evaluate_run(read_trec_run(run), read_qrels(qrels, split=split),
                              metric or DEFAULT_METRICS)
    except _expected_errors() as error:
        raise _fail(error) from None
    if output_format is OutputFormat.json:
        payload = {"run": str(run), "qrels": qrels, "metrics": result.metrics,
                   "judged_queries": result.judged_queries,
                   "missing_queries": result.missing_queries,
                   "unjudged_queries": result.unjudged_queries}
        if per_query:
            payload["per_query"] = result.per_query
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    typer.echo(f"run: {run}")
    for name, value in result.metrics.items():
        typer.echo(f"{name:<12} {value:.4f}")
    typer.echo(f"judged queries: {result.judged_queries}; missing from the run (counted as 0): "
               f"{len(result.missing_queries)}; in the run but unjudged (ignored): "
               f"{result.unjudged_queries}")
    if per_query:
        for name, values in result.per_query.items():
            for qid, value in values.items():
                typer.echo(f"{name}\t{qid}\t{value:.4f}")


@app.command(cls=FlagCommand)
def info(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index folder.")],
) -> None:
    """Print an index's manifest: model, layer split, counts, sizes, versions."""
    from mice_engine.indexing import read_manifest

    try:
        manifest = read_manifest(index_dir)
    except _expected_errors() as error:
        raise _fail(error) from None
    typer.echo(json.dumps(manifest, indent=2, ensure_ascii=False))


@app.command(cls=FlagCommand)
def check(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index folder.")],
    checksum: Annotated[bool, typer.Option("--checksum/--no-checksum", help="Recompute the SHA-256 of every stored state and FAISS file (reads the whole store). The checksum of the ids, titles and texts is verified either way.")] = True,
) -> None:
    """Verify an index: manifest, counts, alignment of ids, states and texts, the checksums of
    the ids, titles, texts and states, BM25."""
    from mice_engine.check import check_index

    report = check_index(index_dir, verify_checksum=checksum)
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    for problem in report.problems:
        typer.echo(f"problem: {problem}", err=True)
    if not report.ok:
        typer.echo(f"{index_dir}: {len(report.problems)} problem(s) found", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"{index_dir}: OK ({', '.join(report.checked)})")

@app.command(cls=FlagCommand)
def train(
    source: Annotated[str, typer.Argument(help="Training data: a BEIR folder or irds:<id> with judgments, or irds:<id> with training triples (margin-mse).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run folder: checkpoints, log, and the best model in <output>/model.")],
    preset: Annotated[str | None, typer.Option(help="Named settings: paper (the authors' MS MARCO recipe) or scifact-cpu (the shipped model's recipe). Options given explicitly override it.")] = None,
    architecture: Annotated[str | None, typer.Option(help="mice, or cross-encoder (the full cross-encoder, or a masked one with --mask) (default: mice).")] = None,
    model: Annotated[str | None, typer.Option("--backbone", help="BERT-family backbone folder or Hugging Face id (default: all-MiniLM-L6-v2).")] = None,
    merge_layer: Annotated[int | None, typer.Option(help="X in MICE-lX+Y (default: 3).")] = None,
    interaction_layers: Annotated[int | None, typer.Option(help="Y in MICE-lX+Y (default: 3).")] = None,
    mask: Annotated[str | None, typer.Option(help="Cross-encoder attention mask: none, mask0, mask1, mask2 or mask3 (default: none).")] = None,
    mask3_layers: Annotated[int | None, typer.Option(help="k of Mask3-lk: layers 0..k-1 where the query may not read the document.")] = None,
    query_max_length: Annotated[int | None, typer.Option(help="Maximum query length in tokens (default: 64).")] = None,
    doc_max_length: Annotated[int | None, typer.Option(help="Maximum document length in tokens, [CLS] and [SEP] included (default: 512).")] = None,
    loss: Annotated[str | None, typer.Option(help="listwise (judgments and BM25 hard negatives) or margin-mse (teacher margins) (default: listwise).")] = None,
    teacher_scores: Annotated[Path | None, typer.Option(help="Teacher-score TSV in the MS MARCO layout: pos_score, neg_score, query, positive, negative.")] = None,
    teacher: Annotated[str | None, typer.Option(help="Model folder that scores triples on the fly for margin-mse.")] = None,
    split: Annotated[str | None, typer.Option(help="Split whose queries and judgments train (default: train).")] = None,
    dev_queries: Annotated[int | None, typer.Option(help="Training queries held out (seeded) for periodic evaluation. With 0, nothing is evaluated and the model of the last step is kept; a blend (--fuse-first-stage) needs them (default: 100).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: 1000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Queries (listwise) or triples (margin-mse) per step (default: 8).")] = None,
    group_size: Annotated[int | None, typer.Option(help="Listwise group: one positive and group-size - 1 negatives (default: 8).")] = None,
    accumulation: Annotated[int | None, typer.Option(help="Batches whose gradients add up before each step (default: 1).")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate of AdamW (default: 2e-5).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Steps of linear warm-up before the linear decay, fewer than --steps (default: 10% of --steps, rounded, at most 100, or the preset's value when that is below --steps).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (default: 0.01).")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Gradient clipping norm (default: 1.0).")] = None,
    negatives_depth: Annotated[int | None, typer.Option(help="Hard negatives come from this many top BM25 documents (default: 100).")] = None,
    freeze_lower: Annotated[bool | None, typer.Option("--freeze-lower/--train-lower", help="MICE: keep the backbone's lower layers, so document states stay valid and are computed once.")] = None,
    states_from: Annotated[Path | None, typer.Option(help="With --freeze-lower: read document states from this index (same lower layers) instead of computing them.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between evaluations on the held-out queries (default: 200).")] = None,
    eval_candidates: Annotated[int | None, typer.Option(help="BM25 candidates re-ranked per held-out query (default: 100).")] = None,
    select_metric: Annotated[str | None, typer.Option(help="Dev metric that picks the best checkpoint: nDCG@10, RR@10 or R@N with N the --eval-candidates (default: nDCG@10).")] = None,
    fuse_first_stage: Annotated[bool | None, typer.Option("--fuse-first-stage/--no-fuse-first-stage", help="Tune a BM25 blend weight on the held-out queries, select checkpoints by the blend, and save the weight with the model.")] = None,
    fuse_maxsim: Annotated[bool | None, typer.Option("--fuse-maxsim/--no-fuse-maxsim", help="With --fuse-first-stage, add the MaxSim score of the stored states (query tokens against document tokens, cosine) to the blend, its weight tuned with BM25's (scifact-cpu: on).")] = None,
    first_stage_feature: Annotated[bool | None, typer.Option("--first-stage-feature/--no-first-stage-feature", help="Train the sum of the MICE score and a learnt scale times the BM25 score, so that MICE learns what BM25 misses; search adds the same term.")] = None,
    distill_teacher: Annotated[str | None, typer.Option(help="Listwise: also distil the scores of a bi-encoder (cosine of mean-pooled embeddings) over each group; 'backbone' (the backbone's own sentence embeddings), a folder or a Hugging Face id.")] = None,
    distill_weight: Annotated[float | None, typer.Option(help="Weight of the distillation term beside the listwise loss (default: 1.0).")] = None,
    distill_temperature: Annotated[float | None, typer.Option(help="Temperature of the teacher's softmax over cosine similarities (default: 0.05).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between resumable checkpoints (default: 200).")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16/fp16 autocast on GPU, float32 on CPU), float32, bf16 or fp16.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the head, the data order and dropout (default: 0).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, or auto (default: auto).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUTPUT from its last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    """Train a MICE model (or a cross-encoder baseline) and keep the best checkpoint."""
    _setup_logging(quiet)
    from mice_engine.training import CHECKPOINT_DIR, TrainingError, settings_with_preset
    from mice_engine.training import train as run_training

    try:
        settings = settings_with_preset(
            preset, train=source, output=str(output), architecture=architecture, backbone=model,
            merge_layer=merge_layer, interaction_layers=interaction_layers, mask=mask,
            mask3_layers=mask3_layers, query_max_length=query_max_length,
            doc_max_length=doc_max_length, loss=loss,
            teacher_scores=str(teacher_scores) if teacher_scores else None, teacher=teacher,
            split=split, dev_queries=dev_queries, steps=steps, batch_size=batch_size,
            group_size=group_size, accumulation=accumulation, learning_rate=learning_rate,
            warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
            negatives_depth=negatives_depth, freeze_lower=freeze_lower,
            states_from=str(states_from) if states_from else None, eval_every=eval_every,
            eval_candidates=eval_candidates, select_metric=select_metric,
            fuse_first_stage=fuse_first_stage, fuse_maxsim=fuse_maxsim,
            first_stage_feature=first_stage_feature,
            distill_teacher=distill_teacher, distill_weight=distill_weight,
            distill_temperature=distill_temperature, checkpoint_every=checkpoint_every, precision=precision, seed=seed, device=device,
        )
        result = run_training(settings, resume=resume, progress=not quiet)
    except KeyboardInterrupt:
        if (output / CHECKPOINT_DIR / "trainer.pt").is_file():
            typer.echo(f"interrupted; continue with: mice train ... -o {output} --resume",
                       err=True)
        else:
            typer.echo("interrupted before the first checkpoint, so there is nothing to resume; "
                       "run the same command again to start over", err=True)
        raise typer.Exit(code=130) from None
    except (TrainingError, *_expected_errors()) as error:
        raise _fail(error) from None
    typer.echo(f"trained {result.steps} steps in {result.seconds:.1f} s; best model: "
               f"{result.output / 'model'}")
    if result.best and result.best.get("dev"):
        dev = result.best["dev"]
        pure = ", ".join(f"{k} {v:.4f}" for k, v in dev.items() if not isinstance(v, dict))
        typer.echo(f"selected step {result.best['step']} by {result.best['metric']}: {pure}")
        if dev.get("fusion"):
            from mice_engine.training import BLEND_KEYS

            fused = dev["fusion"]
            weights = ", ".join(f"{k} {v:.3f}" for k, v in fused.items() if k in BLEND_KEYS)
            blend = ", ".join(f"{k} {v:.4f}" for k, v in fused.items() if k not in BLEND_KEYS)
            typer.echo(f"blend ({weights}): {blend}")

@app.command("export", cls=FlagCommand)
def export_model(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="Saved MICE model folder (e.g. RUN/model from mice train).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.")],
    delta: Annotated[bool, typer.Option("--delta/--full", help="Store only what differs from the backbone, in float16 (small; needs the backbone where it loads), or the full model.")] = True,
) -> None:
    """Write a trained MICE model in a form to ship: its float16 difference from the backbone."""
    from mice_engine.model import MiceModel

    try:
        loaded = MiceModel.load(model)
        if output.exists() and any(output.iterdir()):
            raise ValueError(f"{output} exists and is not empty; choose a new folder")
        if delta:
            summary = loaded.save_delta(output)
            typer.echo(f"wrote {output}: {summary['tensors']} tensors, "
                       f"{summary['parameters']:,} parameters, {_human_bytes(summary['bytes'])}")
        else:
            loaded.save(output)
            typer.echo(f"wrote {output}")
    except _expected_errors() as error:
        raise _fail(error) from None


@app.command(cls=FlagCommand)
def rerank(
    run: Annotated[Path, typer.Option("--run", help="First-stage TREC run file (qid Q0 docid rank score tag) whose candidates are re-ranked.")],
    queries: Annotated[str, typer.Option(help="Query texts: a BEIR folder, queries .jsonl/.tsv, or irds:<id>.")],
    collection: Annotated[str, typer.Option(help="Documents, looked up by id: a BEIR folder, a .jsonl[.gz]/.tsv corpus, or irds:<id>.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="TREC run file to write ('-' for standard output).")],
    model: Annotated[str | None, typer.Option(help="Cross-encoder folder, MICE model folder, or a backbone folder or Hugging Face id (as an untrained MICE model) (default: the shipped MICE-l3+3 trained on SciFact, which ranks by its BM25 blend as mice search does).")] = None,
    fusion: Annotated[bool, typer.Option("--fusion/--no-fusion", help="Blend MICE with the run's scores when the model carries a tuned BM25 blend (the shipped default does; cross-encoders never do). The blend takes the run's scores as the BM25 scores it was tuned with, so for a run from another first stage compare with --no-fusion, which ranks by MICE alone.")] = True,
    depth: Annotated[int, typer.Option(min=1, help="Candidates re-ranked per query: the first DEPTH results of the run; the output contains only these.")] = 100,
    split: Annotated[str, typer.Option(help="Split whose judged queries a BEIR folder contributes (qrels/<split>.tsv).")] = "test",
    batch_size: Annotated[int, typer.Option(min=1, help="Documents per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (the GPU when PyTorch sees one).")] = "auto",
    tag: Annotated[str, typer.Option(help="Run tag in the TREC file.")] = "rerank",
    timings: Annotated[Path | None, typer.Option(help="Write per-query re-ranking seconds and their p50/p95 as JSON to this file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no informational logs.")] = False,
) -> None:
    """Re-rank the top candidates of a TREC run with a MICE model or a cross-encoder."""
    _setup_logging(quiet)
    from tqdm.auto import tqdm

    from mice_engine.cross_encoder import load_reranker
    from mice_engine.evaluation import write_trec_run
    from mice_engine.indexing import resolve_device
    from mice_engine.rerank import load_documents, match_queries, read_candidates
    from mice_engine.rerank import rerank as rerank_run
    from mice_engine.search import FirstStageBlend
    from mice_engine.sources import read_queries

    try:
        candidates = read_candidates(run, depth)
        query_texts = match_queries(candidates, read_queries(queries, split=split), queries)
        needed = {doc_id for results in candidates.values() for doc_id, _ in results}
        documents = load_documents(collection, needed, show_progress=not quiet)
        reranker = load_reranker(model).to(resolve_device(device))
        if not quiet:
            typer.echo(f"model: {reranker.config.name} from {reranker.source}", err=True)
            blend = FirstStageBlend.for_model(reranker, enabled=fusion)
            if blend is not None:
                typer.echo(_ranking_line(f"{blend.describe()}, with the run's scores as the "
                                         "BM25 scores"), err=True)
                _note_candidate_counts(blend, candidates)
        with tqdm(total=len(candidates), unit="query", desc="re-ranking", disable=quiet,
                  dynamic_ncols=True) as progress:
            result = rerank_run(reranker, candidates, query_texts, documents,
                                batch_size=batch_size, on_query=lambda _: progress.update(),
                                fusion=fusion)
        if str(output) == "-":
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                temporary = Path(folder) / "run.trec"
                write_trec_run(temporary, result.run, tag)
                sys.stdout.write(temporary.read_text(encoding="utf-8"))
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            write_trec_run(output, result.run, tag)
    except _expected_errors() as error:
        raise _fail(error) from None
    results = sum(len(ranked) for ranked in result.run.values())
    if str(output) != "-":
        typer.echo(f"wrote {results:,} re-ranked results for {len(result.run):,} queries to "
                   f"{output}", err=True)
    latency = result.latency_ms()
    if latency:
        typer.echo(f"re-ranking time per query: p50 {latency['p50_ms']:.1f} ms   "
                   f"p95 {latency['p95_ms']:.1f} ms   mean {latency['mean_ms']:.1f} ms", err=True)
    if timings is not None:
        timings.parent.mkdir(parents=True, exist_ok=True)
        timings.write_text(json.dumps({"summary_ms": latency, "per_query_seconds": result.seconds},
                                      indent=2) + "\n")
    if not reranker.config.trained:
        typer.echo("note: this model's scoring head is untrained, so its ranking is close to "
                   "random; use a trained model for real results", err=True)


def _note_candidate_counts(blend, candidates: dict[str, list]) -> None:
    """Print how many queries have another candidate count than the blend weights were tuned
    on, since the blend standardises scores over each query's candidates."""
    tuned = blend.tuned_candidates
    if blend.weight is None or tuned is None:
        return
    other = sum(len(results) != tuned for results in candidates.values())
    if other:
        typer.echo(f"note: {other} of {len(candidates)} queries have a candidate count other "
                   f"than {tuned}, the count the blend weights were tuned on. "
                   f"{_CANDIDATE_COUNT_ADVICE}", err=True)


@app.command(cls=FlagCommand)
def bench(
    suite_file: Annotated[Path, typer.Argument(metavar="SUITE", help="Suite file (.toml), for example benchmarks/suites/smoke.toml.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Results folder to create (default: benchmarks/results/<suite name>).")] = None,
    index_dir: Annotated[Path, typer.Option(help="Folder for the indexes that the suite builds (a subfolder per suite).")] = Path("indexes/bench"),
    max_queries: Annotated[int | None, typer.Option(min=1, help="Run every system, and the interaction micro-benchmark, on at most this many queries (the first of the suite's query order); for quick checks.")] = None,
    model: Annotated[list[str] | None, typer.Option(help="Replace a model of the suite's models table, as KEY=SPEC (SPEC: default, a model folder, a backbone); repeatable.")] = None,
    collection: Annotated[list[str] | None, typer.Option(help="Replace a collection's source, as NAME=SOURCE; repeatable.")] = None,
    system: Annotated[list[str] | None, typer.Option(help="Run only this system of the suite (the others are left out of the record); repeatable.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto.")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="PyTorch CPU threads for the whole run (default: PyTorch's choice, one per core).")] = None,
    reuse_indexes: Annotated[bool, typer.Option("--reuse-indexes", help="Reuse complete indexes of the same source and lower layers from an earlier run; their indexing figures are then not measured in this run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results of an earlier run in the output folder.")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Draw the PNG plots (needs matplotlib).")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no informational logs.")] = False,
) -> None:
    """Run a benchmark suite: every system on every collection, quality and efficiency, with a
    JSON record, a Markdown report and plots."""
    _setup_logging(quiet)
    from mice_engine.bench import BenchError, BenchOptions, load_suite, run_suite

    try:
        suite = load_suite(suite_file, models=_assignments(model, "--model"),
                           sources=_assignments(collection, "--collection"),
                           max_queries=max_queries, systems=system)
        options = BenchOptions(
            output=output or Path("benchmarks") / "results" / suite.name, index_dir=index_dir,
            device=device, reuse_indexes=reuse_indexes, overwrite=overwrite,
            show_progress=not quiet, plots=plots, threads=threads,
            command=" ".join(["mice", *sys.argv[1:]]),
        )
        record = run_suite(suite, options)
    except (BenchError, *_expected_errors()) as error:
        raise _fail(error) from None
    typer.echo(f"wrote {options.output}/record.json and {options.output}/report.md")
    for name, values in record["collections"].items():
        for system, result in values["systems"].items():
            metrics = "  ".join(f"{metric} {value:.4f}" for metric, value in
                                result["metrics"].items())
            typer.echo(f"{name} {system} ({result['query_count']} queries): {metrics}")
        interaction = values.get("interaction")
        if interaction and interaction.get("ratio"):
            typer.echo(f"{name} interaction: cross-encoder / MICE = {interaction['ratio']:.1f}x "
                       f"over {interaction['query_count']} queries")


def _assignments(values: list[str] | None, option: str) -> dict[str, str]:
    assignments = {}
    for value in values or []:
        key, separator, spec = value.partition("=")
        if not separator or not key or not spec:
            raise _fail(ValueError(f"{option} {value!r} is invalid; write it as NAME=VALUE"))
        assignments[key] = spec
    return assignments


def main() -> None:
    app()


if __name__ == "__main__":
    main()
