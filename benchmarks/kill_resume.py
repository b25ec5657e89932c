"""Kill test: SIGKILL `mice index` at random moments, resume each time, compare with a clean build.

The resumed index must equal a clean build of the same source with the same settings: same
document ids, same states (SHA-256 of their bytes), and the same top-10 for the test queries.

Usage:
    python benchmarks/kill_resume.py ../shared/data/scifact --clean indexes/bench-scifact \\
        --chunk-size 512 --kills 5
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def committed_shards(index: Path) -> int:
    return len(list((index / "shards").glob("part-*.h5")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("collection")
    parser.add_argument("--clean", type=Path, required=True,
                        help="complete index of the same collection built with the same settings")
    parser.add_argument("--index", type=Path, default=REPO / "indexes" / "kill-test")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=20.0,
                        help="earliest kill after a start (the model takes seconds to load)")
    parser.add_argument("--max-seconds", type=float, default=240.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries-limit", type=int, default=None,
                        help="compare the top-10 of the first N queries only [all]")
    parser.add_argument("--clean-run", type=Path, default=None,
                        help="TREC run of BM25 > MICE on the clean index (from pipeline.py); "
                             "saves searching the clean index again")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "kill_resume.json")
    args = parser.parse_args()

    from mice_engine.evaluation import read_trec_run
    from mice_engine.indexing import MANIFEST_FILE, read_manifest
    from mice_engine.search import Searcher
    from mice_engine.sources import read_queries
    from mice_engine.store import STATES_FILE, StateStore

    clean = read_manifest(args.clean)
    if clean["build"]["chunk_size"] != args.chunk_size:
        sys.exit(f"the clean index was built with --chunk-size {clean['build']['chunk_size']}; "
                 f"pass the same value")
    if args.index.exists():
        shutil.rmtree(args.index)
    rng = random.Random(args.seed)
    command = [sys.executable, "-m", "cli.main", "index", args.collection, "--output",
               str(args.index), "--chunk-size", str(args.chunk_size), "--batch-size",
               str(clean["build"]["batch_size"]), "--quiet"]
    kills = []
    for attempt in range(args.kills):
        resume = ["--resume"] if (args.index / "build.json").exists() else []
        delay = rng.uniform(args.min_seconds, args.max_seconds)
        process = subprocess.Popen(command + resume, cwd=REPO)
        try:
            process.wait(timeout=delay)
            print(f"attempt {attempt + 1}: the build finished before its kill at {delay:.0f} s",
                  file=sys.stderr)
            break
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        kills.append({"after_seconds": round(delay, 1), "committed_shards": committed_shards(args.index),
                      "manifest_written": (args.index / MANIFEST_FILE).is_file()})
        print(f"kill {attempt + 1} after {delay:.0f} s: {kills[-1]}", file=sys.stderr)
    if not (args.index / MANIFEST_FILE).is_file():
        resume = ["--resume"] if (args.index / "build.json").exists() else []
        subprocess.run(command + resume, cwd=REPO, check=True)

    resumed = read_manifest(args.index)
    with StateStore(args.index / STATES_FILE) as a, StateStore(args.clean / STATES_FILE) as b:
        same_ids = a.doc_ids == b.doc_ids
        same_offsets = bool((a.offsets == b.offsets).all())
    queries = read_queries(args.collection)[: args.queries_limit]
    tops = []
    for folder in (args.index, args.clean):
        if folder == args.clean and args.clean_run is not None:
            run = read_trec_run(args.clean_run)
            tops.append({q.id: [doc for doc, _ in run.get(q.id, [])[:10]] for q in queries})
            continue
        searcher = Searcher(folder)
        tops.append({q.id: [hit.doc_id for hit in searcher.search(q.text, k=10).hits]
                     for q in queries})
        searcher.close()
    differing = [qid for qid in tops[0] if tops[0][qid] != tops[1][qid]]
    record = {
        "benchmark": "kill_resume",
        "collection": args.collection,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "kills": kills,
        "same_states_sha256": resumed["states"]["sha256"] == clean["states"]["sha256"],
        "same_doc_ids": same_ids,
        "same_offsets": same_offsets,
        "same_counts": resumed["counts"] == clean["counts"],
        "queries": len(queries),
        "queries_with_different_top10": len(differing),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
