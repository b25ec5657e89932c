"""End-to-end pipeline benchmark: index a collection, search its queries, evaluate, record.

It measures, in one run on one machine:

- indexing time, documents/s, tokens/s, index size and bytes per stored token;
- nDCG@10, RR@10 and R@100 of the BM25 ranking and of BM25 followed by MICE;
- per-query latency (p50, p95) of each stage.

The JSON record it writes contains the hardware, library versions and git commit beside the numbers.

Usage:
    python benchmarks/pipeline.py ../shared/data/scifact --name scifact
    IR_DATASETS_HOME=/tmp/irds python benchmarks/pipeline.py irds:beir/scifact/test --name scifact-irds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def hardware() -> dict:
    processor = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "processor": processor or platform.machine(),
        "logical_cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
    }
    import torch

    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_queries(searcher, queries, k, candidates, first_stage_only):
    run, timings = {}, []
    for query in queries:
        result = searcher.search(query.text, k=k, candidates=candidates,
                                 first_stage_only=first_stage_only)
        run[query.id] = [(hit.doc_id, hit.score) for hit in result.hits]
        timings.append(result.timings)
    return run, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("collection", help="BEIR folder or irds:<id> with documents, queries and qrels")
    parser.add_argument("--name", required=True, help="name of the record (results/<name>.json)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--k", type=int, default=100, help="results kept per query (R@100 needs 100)")
    parser.add_argument("--model", default=None, help="model folder or backbone [default model]")
    parser.add_argument("--index", type=Path, default=None,
                        help="index folder [indexes/bench-<name>]; reused when complete")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON record [benchmarks/results/<name>.json]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    from mice_engine.evaluation import DEFAULT_METRICS, evaluate, write_trec_run
    from mice_engine.indexing import MANIFEST_FILE, build_index, library_versions, read_manifest
    from mice_engine.search import Searcher, latency_summary
    from mice_engine.sources import read_qrels, read_queries

    index = args.index or REPO / "indexes" / f"bench-{args.name}"
    output = args.output or REPO / "benchmarks" / "results" / f"{args.name}.json"
    if (index / MANIFEST_FILE).is_file():
        print(f"reusing complete index {index}", file=sys.stderr)
        manifest = read_manifest(index)
    else:
        manifest = build_index(args.collection, index, model=args.model,
                               batch_size=args.batch_size, chunk_size=args.chunk_size,
                               mode="overwrite" if index.exists() else "create")

    queries = read_queries(args.collection, split=args.split)
    qrels = read_qrels(args.collection, split=args.split)
    searcher = Searcher(index)
    systems = {}
    for system, first_stage_only in (("bm25", True), (f"bm25>mice@{args.candidates}", False)):
        started = time.perf_counter()
        run, timings = run_queries(searcher, queries, args.k, args.candidates, first_stage_only)
        seconds = time.perf_counter() - started
        runs_folder = output.parent / "runs"
        runs_folder.mkdir(parents=True, exist_ok=True)
        write_trec_run(runs_folder / f"{args.name}.{system.replace('>', '-').replace('@', '')}.trec",
                       run, system.replace(">", "-").replace("@", ""))
        evaluation = evaluate(run, qrels, DEFAULT_METRICS)
        systems[system] = {
            "metrics": evaluation.metrics,
            "judged_queries": evaluation.judged_queries,
            "missing_queries": len(evaluation.missing_queries),
            "latency_ms": latency_summary(timings),
            "queries_per_second": round(len(queries) / seconds, 2),
        }
        print(f"{system}: " + "  ".join(f"{name} {value:.4f}" for name, value in
                                          evaluation.metrics.items()), file=sys.stderr)

    record = {
        "benchmark": "pipeline",
        "name": args.name,
        "collection": args.collection,
        "split": args.split,
        "candidates": args.candidates,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_commit": git_commit(),
        "hardware": hardware(),
        "versions": library_versions(),
        "model": {key: manifest["model"][key] for key in
                  ("name", "backbone", "trained", "doc_max_length", "query_max_length")},
        "index": {
            "documents": manifest["counts"]["documents"],
            "tokens": manifest["counts"]["tokens"],
            "truncated_documents": manifest["counts"]["truncated_documents"],
            "build_seconds": manifest["build"]["seconds"],
            "encode_seconds": manifest["build"]["encode_seconds"],
            "documents_per_second": manifest["build"]["documents_per_second"],
            "tokens_per_second": manifest["build"]["tokens_per_second"],
            "bytes_on_disk": manifest["bytes"],
            "state_bytes": manifest["states"]["bytes"],
            "bytes_per_token": manifest["states"]["bytes_per_token"],
            "file_bytes_per_token": manifest["states"].get("file_bytes_per_token"),
            "states_sha256": manifest["states"]["sha256"],
        },
        "systems": systems,
        # Peak resident memory of this whole process: indexing (when it ran here) and search.
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "environment": {key: os.environ[key] for key in ("IR_DATASETS_HOME",) if key in os.environ},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
