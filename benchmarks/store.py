"""Storage benchmark: compressed states and the dense and hybrid first stages on one collection.

From a complete float16 index of the collection, it derives (with ``derive_index``, the code of
``mice compress``):

- a float16 copy with a dense index, for the first-stage comparison;
- one index per codec (``--codecs``), without a dense index.

Then it measures, in one run on one machine:

- per codec against float16: bytes per stored token, index size on disk, codec training and
  coding time, reconstruction error, nDCG@10, RR@10 and R@100 of BM25 followed by MICE, how
  much the MICE scores and top 10 move against float16, and the latency of each stage;
- per first stage (bm25, dense, hybrid): R@100 and R@1000 of the first-stage ranking, its
  latency, and nDCG@10, RR@10 and R@100 of MICE on its top 100;
- peak resident memory of a ``mice search`` process on the float16 index and on the smallest
  codec's index, against the size of their state stores.

The JSON record contains the hardware, library versions and git commit beside the numbers.

Usage:
    python benchmarks/store.py ../shared/data/cranfield --index indexes/cranfield --name cranfield
    python benchmarks/store.py ../shared/data/scifact --index indexes/scifact --name scifact \\
        --max-queries 50
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import REPO, git_commit, hardware

DEFAULT_CODECS = "int8,int4,ivfpq64,ivfpq32,ivfpq16"
MICE_METRICS = ("nDCG@10", "RR@10", "R@100")
FIRST_STAGE_METRICS = ("nDCG@10", "R@100", "R@1000")


def run_queries(searcher, queries, **options):
    """Search every query; returns the run, per-query timings and per-query score maps."""
    run, timings, scores = {}, [], {}
    for query in queries:
        result = searcher.search(query.text, **options)
        run[query.id] = [(hit.doc_id, hit.score) for hit in result.hits]
        scores[query.id] = {hit.doc_id: hit.score for hit in result.hits}
        timings.append(result.timings)
    return run, timings, scores


def agreement(reference: dict, other: dict, depth: int = 10) -> dict[str, float]:
    """How far a codec's MICE scores are from float16's on the same candidates."""
    differences, overlaps, correlations = [], [], []
    for query_id, expected in reference.items():
        found = other.get(query_id, {})
        shared = [doc for doc in expected if doc in found]
        if not shared:
            continue
        a = np.array([expected[doc] for doc in shared])
        b = np.array([found[doc] for doc in shared])
        differences.append(float(np.abs(a - b).max()))
        top_expected = sorted(expected, key=lambda doc: -expected[doc])[:depth]
        top_found = sorted(found, key=lambda doc: -found[doc])[:depth]
        overlaps.append(len(set(top_expected) & set(top_found)) / max(len(top_expected), 1))
        if len(shared) > 2 and a.std() > 0 and b.std() > 0:
            ranks_a = np.argsort(np.argsort(a))
            ranks_b = np.argsort(np.argsort(b))
            correlations.append(float(np.corrcoef(ranks_a, ranks_b)[0, 1]))
    return {"max_abs_score_difference": max(differences, default=0.0),
            "mean_max_abs_score_difference": float(np.mean(differences)) if differences else 0.0,
            f"top{depth}_overlap": float(np.mean(overlaps)) if overlaps else 0.0,
            "spearman": float(np.mean(correlations)) if correlations else None}


def search_process_memory(index: Path, queries_file: Path, first_stage: str,
                          candidates: int, model: str | None) -> dict:
    """Run `mice search` on a query file in its own process; returns its own memory report."""
    with tempfile.TemporaryDirectory() as folder:
        timings = Path(folder) / "timings.json"
        command = [sys.executable, "-m", "cli.main", "search", str(index), "--queries",
                   str(queries_file), "--output", str(Path(folder) / "run.trec"), "-k", "10",
                   "--candidates", str(candidates), "--first-stage", first_stage,
                   "--timings", str(timings), "--quiet"]
        if model:
            command += ["--model", model]
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                   env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"mice search failed: {completed.stderr}")
        payload = json.loads(timings.read_text())
        return {"first_stage": first_stage, "seconds": round(time.perf_counter() - started, 1),
                **payload["memory_mib"]}


def search_memory(codecs: dict, float16_folder: Path, work: Path, queries, args) -> list[dict]:
    """Peak resident memory of separate `mice search` processes over the query set: on the
    float16 index with the BM25 and the dense first stage, and on the smallest codec's index."""
    smallest = min((name for name in codecs if name != "float16"),
                   key=lambda name: codecs[name]["bytes_per_token"], default=None)
    memory = []
    with tempfile.TemporaryDirectory() as folder:
        queries_file = Path(folder) / "queries.jsonl"
        queries_file.write_text("".join(json.dumps({"_id": q.id, "text": q.text}) + "\n"
                                        for q in queries))
        targets = [("float16", float16_folder, "bm25"), ("float16", float16_folder, "dense")]
        if smallest:
            targets.append((smallest, work / smallest, "bm25"))
        for name, index, first_stage in targets:
            report = search_process_memory(index, queries_file, first_stage, args.candidates,
                                           args.model)
            report.update({"index": name, "states_bytes": codecs[name]["states_bytes"]})
            memory.append(report)
            print(f"mice search on {name} ({first_stage}): peak {report['peak_rss_mib']} MiB, "
                  f"states {report['states_bytes'] / 2**20:,.0f} MiB", file=sys.stderr)
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("collection", help="BEIR folder or irds:<id> with queries and qrels")
    parser.add_argument("--index", type=Path, required=True,
                        help="complete float16 index of the collection (read only)")
    parser.add_argument("--name", required=True,
                        help="name of the record (results/store-<name>.json)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--codecs", default=DEFAULT_CODECS,
                        help=f"comma-separated codecs [{DEFAULT_CODECS}]")
    parser.add_argument("--candidates", type=int, default=100,
                        help="first-stage candidates that MICE re-scores")
    parser.add_argument("--max-queries", type=int, default=None,
                        help="use only the first N judged queries (for a quick check)")
    parser.add_argument("--nprobe", type=int, default=None, help="dense nprobe [32]")
    parser.add_argument("--token-candidates", type=int, default=None,
                        help="dense neighbours per query token [256 or the candidates]")
    parser.add_argument("--dense-index", default="auto", help="auto, ivfpq or flat")
    parser.add_argument("--model", default=None,
                        help="score with this model (same lower layers as the index's)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder of the derived indexes [indexes/store-<name>]; indexes "
                             "already complete there are reused")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON record [benchmarks/results/store-<name>.json]")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure the `mice search` processes' memory again, on the indexes "
                             "of an existing record, and replace that part of the record")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    from mice_engine.dense import DEFAULT_NPROBE
    from mice_engine.evaluation import evaluate
    from mice_engine.indexing import MANIFEST_FILE, library_versions, read_manifest
    from mice_engine.search import Searcher, latency_summary
    from mice_engine.sources import read_qrels, read_queries
    from mice_engine.storage import StorageOptions, derive_index

    work = args.work or REPO / "indexes" / f"store-{args.name}"
    output = args.output or REPO / "benchmarks" / "results" / f"store-{args.name}.json"
    source = args.index.resolve()
    source_manifest = read_manifest(source)
    if source_manifest["states"].get("compression", "none") != "none":
        sys.exit(f"{source} is not a float16 index")

    queries = read_queries(args.collection, split=args.split)[: args.max_queries]
    qrels = read_qrels(args.collection, split=args.split)
    qrels = {query.id: qrels[query.id] for query in queries if query.id in qrels}

    def derived(name: str, options: StorageOptions) -> tuple[Path, dict, float | None]:
        folder = work / name
        if (folder / MANIFEST_FILE).is_file():
            print(f"reusing {folder}", file=sys.stderr)
            return folder, read_manifest(folder), None
        started = time.perf_counter()
        manifest = derive_index(source, folder, options, show_progress=False,
                                mode="overwrite" if folder.exists() else "create")
        return folder, manifest, round(time.perf_counter() - started, 1)

    def searcher_for(folder: Path) -> Searcher:
        return Searcher(folder, model=args.model)

    def mice_system(searcher, **options):
        started = time.perf_counter()
        run, timings, scores = run_queries(searcher, queries, k=args.candidates,
                                           candidates=args.candidates, **options)
        evaluation = evaluate(run, qrels, MICE_METRICS)
        return {"metrics": evaluation.metrics, "latency_ms": latency_summary(timings),
                "seconds": round(time.perf_counter() - started, 1)}, scores

    if args.memory_only:
        record = json.loads(output.read_text())
        record["search_memory"] = search_memory(record["codecs"], work / "float16", work, queries,
                                                args)
        record["search_memory_run"] = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git_commit": git_commit()}
        output.write_text(json.dumps(record, indent=2) + "\n")
        print(f"updated {output}", file=sys.stderr)
        return

    # Float16 with a dense index: the reference of every comparison.
    float16_folder, float16_manifest, float16_seconds = derived(
        "float16", StorageOptions(dense=True, dense_kind=args.dense_index))
    dense_record = float16_manifest["first_stage"]["dense"]
    if float16_seconds is not None:
        print(f"float16 + dense index derived in {float16_seconds} s", file=sys.stderr)

    searcher = searcher_for(float16_folder)
    codecs: dict[str, dict] = {}
    reference, reference_scores = mice_system(searcher, first_stage="bm25")
    codecs["float16"] = {
        "bytes_per_token": float16_manifest["states"]["bytes_per_token"],
        "states_bytes": float16_manifest["states"]["bytes"],
        "index_bytes_without_dense": float16_manifest["bytes"]
        - float16_manifest["files"]["dense.faiss"]["bytes"],
        **reference,
    }
    print(f"float16: {reference['metrics']}", file=sys.stderr)

    first_stages: dict[str, dict] = {}
    for first_stage in ("bm25", "dense", "hybrid"):
        options = {"first_stage": first_stage, "nprobe": args.nprobe,
                   "token_candidates": args.token_candidates}
        started = time.perf_counter()
        run, timings, _ = run_queries(searcher, queries, k=1000, candidates=1000,
                                      first_stage_only=True, **options)
        seconds = time.perf_counter() - started
        recall = evaluate(run, qrels, FIRST_STAGE_METRICS)
        mice = reference if first_stage == "bm25" else mice_system(searcher, **options)[0]
        first_stages[first_stage] = {
            "first_stage_metrics": recall.metrics,
            "first_stage_latency_ms": latency_summary(timings),
            "first_stage_seconds": round(seconds, 1),
            "mice": mice,
        }
        print(f"{first_stage}: {recall.metrics}; MICE {mice['metrics']}", file=sys.stderr)
    searcher.close()

    for name in [codec.strip() for codec in args.codecs.split(",") if codec.strip()]:
        folder, manifest, seconds = derived(name, StorageOptions(compression=name, dense=False))
        searcher = searcher_for(folder)
        system, scores = mice_system(searcher, first_stage="bm25")
        searcher.close()
        codec = manifest["states"]["codec"]
        codecs[name] = {
            "codec": codec["name"],
            "fallback_reason": codec.get("fallback_reason"),
            "bytes_per_token": manifest["states"]["bytes_per_token"],
            "states_bytes": manifest["states"]["bytes"],
            "index_bytes_without_dense": manifest["bytes"],
            "derive_seconds": seconds,
            "training_seconds": codec.get("training_seconds"),
            "encoding_seconds": codec.get("encoding_seconds"),
            "coarse_centroids": codec.get("coarse_centroids"),
            "training_vectors": codec.get("training_vectors"),
            "reconstruction": codec.get("reconstruction"),
            "against_float16": agreement(reference_scores, scores),
            "ndcg10_change_points": round(100 * (system["metrics"]["nDCG@10"]
                                                 - reference["metrics"]["nDCG@10"]), 2),
            **system,
        }
        print(f"{name}: {codecs[name]['bytes_per_token']} B/token {system['metrics']} "
              f"{codecs[name]['against_float16']}", file=sys.stderr)

    memory = search_memory(codecs, float16_folder, work, queries, args)

    record = {
        "benchmark": "store",
        "name": args.name,
        "collection": args.collection,
        "split": args.split,
        "queries": len(queries),
        "judged_queries": len(qrels),
        "candidates": args.candidates,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_commit": git_commit(),
        "hardware": hardware(),
        "versions": library_versions(),
        "model": {key: source_manifest["model"][key] for key in
                  ("name", "backbone", "trained", "doc_max_length", "query_max_length")},
        "model_override": args.model,
        "index": {"source": str(source), "documents": source_manifest["counts"]["documents"],
                  "tokens": source_manifest["counts"]["tokens"],
                  "states_sha256": source_manifest["states"]["sha256"]},
        "dense_index": {**dense_record,
                        "bytes": float16_manifest["files"]["dense.faiss"]["bytes"],
                        "bytes_per_token": round(float16_manifest["files"]["dense.faiss"]["bytes"]
                                                 / source_manifest["counts"]["tokens"], 2),
                        "nprobe": args.nprobe or DEFAULT_NPROBE,
                        "token_candidates": args.token_candidates
                        or "256 or the candidates requested, whichever is larger"},
        "codecs": codecs,
        "first_stages": first_stages,
        "search_memory": memory,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
