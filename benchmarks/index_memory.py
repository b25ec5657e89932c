"""Peak memory of `mice index` on SciFact and on a synthetic corpus 10 times its size.

The synthetic corpus repeats each SciFact document 10 times under new ids, with its words
shuffled (seeded), so document lengths keep SciFact's distribution. Both runs use the same
small random model, so that 51,830 documents index in minutes on a CPU. It is BERT-shaped with
hidden size 384, so stored states take the default model's 768 bytes per token. It has 2
layers, split as MICE-l1+1, and reads 64-token documents. Indexing memory depends on that model's weights, the batch and the
chunk, which both runs share, so the ratio of the two peaks shows how memory grows with corpus
size.

Usage: python benchmarks/index_memory.py ../shared/data/scifact
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = """
import resource, subprocess, sys
started = __import__("time").perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
seconds = __import__("time").perf_counter() - started
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, seconds)
"""


def small_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mice_engine.model import default_backbone_path

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                        intermediate_size=1536, vocab_size=30522)
    BertModel(config).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(default_backbone_path())).save_pretrained(str(folder))
    return folder


def synthetic_corpus(source: str, path: Path, copies: int, seed: int) -> int:
    from mice_engine.sources import open_documents

    rng = random.Random(seed)
    count = 0
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for copy in range(copies):
            for document in open_documents(source):
                words = document.text.split()
                rng.shuffle(words)
                record = {"_id": f"{document.id}-{copy}", "title": document.title,
                          "text": " ".join(words)}
                handle.write(json.dumps(record) + "\n")
                count += 1
    return count


def measure(source: str, output: Path, model: Path) -> dict:
    command = [sys.executable, "-m", "cli.main", "index", source, "--output", str(output),
               "--model", str(model), "--merge-layer", "1", "--interaction-layers", "1",
               "--doc-max-length", "64", "--quiet"]
    completed = subprocess.run([sys.executable, "-c", MEASURE, *command], cwd=REPO,
                               capture_output=True, text=True, check=True)
    code, max_rss_kib, seconds = completed.stdout.split()[-3:]
    if code != "0":
        raise RuntimeError(f"mice index failed on {source}: {completed.stderr}")
    manifest = json.loads((output / "manifest.json").read_text())
    return {"source": source, "documents": manifest["counts"]["documents"],
            "tokens": manifest["counts"]["tokens"], "peak_rss_mib": round(int(max_rss_kib) / 1024, 1),
            "seconds": round(float(seconds), 1), "index_bytes": manifest["bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("collection", help="BEIR folder of SciFact (or another collection)")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path,
                        default=REPO / "benchmarks" / "results" / "index_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / "indexes") as scratch:
        scratch = Path(scratch)
        model = small_model(scratch / "model")
        corpus = scratch / "synthetic.jsonl.gz"
        synthetic_corpus(args.collection, corpus, args.copies, args.seed)
        runs = [measure(args.collection, scratch / "base", model),
                measure(str(corpus), scratch / "large", model)]
    record = {
        "benchmark": "index_memory",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": "random BERT, hidden 384, 2 layers, MICE-l1+1, 64-token documents",
        "runs": runs,
        "peak_memory_ratio": round(runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 2),
        "corpus_ratio": round(runs[1]["documents"] / runs[0]["documents"], 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "this_process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
