"""Print benchmark records as Markdown tables.

Records of `mice bench` (``record.json`` of a results folder) print as a summary of quality,
latency and efficiency; the records of ``pipeline.py`` print as their own tables.

Usage: python benchmarks/report.py [RECORD.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _file_bytes(index: dict) -> float:
    # Records written before the manifest split the two figures hold only the file's.
    return index.get("file_bytes_per_token") or index["bytes_per_token"]


def _state_bytes(index: dict) -> str:
    return str(index["bytes_per_token"]) if "file_bytes_per_token" in index else "not recorded"


def main() -> None:
    paths = [Path(arg) for arg in sys.argv[1:]] or sorted(RESULTS.glob("*.json"))
    records = [json.loads(path.read_text()) for path in paths]
    bench_records = [record for record in records if record.get("format") == "mice-bench-record"]
    if bench_records:
        from mice_engine.bench.report import render_summary

        print(render_summary(bench_records))
    records = [record for record in records if record.get("benchmark") == "pipeline"]
    if not records:
        return

    print("| collection | documents | tokens | index time | documents/s | tokens/s "
          "| index on disk | bytes/token (states) | bytes/token (states.h5 file) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for record in records:
        index = record["index"]
        print(f"| {record['name']} | {index['documents']:,} | {index['tokens']:,} "
              f"| {index['build_seconds']:.0f} s | {index['documents_per_second']:.1f} "
              f"| {index['tokens_per_second']:,.0f} | {index['bytes_on_disk'] / 2**20:,.0f} MiB "
              f"| {_state_bytes(index)} | {_file_bytes(index)} |")
    print()
    print("| collection | system | nDCG@10 | RR@10 | R@100 | p50 / p95 first stage "
          "| p50 / p95 query encoding | p50 / p95 state loading | p50 / p95 interaction "
          "| p50 / p95 total |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for record in records:
        for system, values in record["systems"].items():
            metrics = values["metrics"]
            latency = values["latency_ms"]
            cells = [f"{latency[stage]['p50_ms']:.1f} / {latency[stage]['p95_ms']:.1f} ms"
                     for stage in ("first_stage", "query_encoding", "load_states",
                                   "interaction", "total")]
            print(f"| {record['name']} | {system} | {metrics['nDCG@10']:.4f} "
                  f"| {metrics['RR@10']:.4f} | {metrics['R@100']:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
