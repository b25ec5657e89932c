"""Re-ranking quality of trained models on the same BM25 candidates, side by side.

For every query of a collection it takes the BM25 top ``--candidates`` from an index, scores
them once with a MICE model (from the index's stored states), and evaluates in the same run:

- BM25 alone;
- BM25 followed by MICE alone (the MICE score ranks);
- BM25 followed by MICE blended with BM25 (``bm25>mice blended``), when the model carries a
  tuned blend, with the MaxSim score of the stored states too when the blend has a MaxSim
  weight;
- optionally other re-rankers (the full cross-encoder, masked cross-encoders) that score the
  same candidates from their text, on all queries or on the first ``--rerank-queries`` of them,
  with the other systems evaluated on that same subset too.

It records nDCG@10, RR@10 and R@100, a paired t-test of each MICE system's per-query nDCG@10
against BM25's, per-query re-ranking time (p50/p95) and the hardware, versions and commit, in
benchmarks/results/<name>.json.

Usage:
    python benchmarks/rerank_quality.py ../shared/data/scifact --index indexes/scifact \\
        --name quality-scifact
    python benchmarks/rerank_quality.py ../shared/data/scifact --index indexes/scifact \\
        --name ce-scifact --model runs/mice/model --reranker ce=runs/ce/model --rerank-queries 50
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import git_commit, hardware

REPO = Path(__file__).resolve().parents[1]
# The system that ranks by the model's blend: MICE with BM25, and MaxSim when the blend has it.
BLEND = "bm25>mice blended"


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values) * 1000
    return {"p50": round(float(np.percentile(array, 50)), 2),
            "p95": round(float(np.percentile(array, 95)), 2),
            "mean": round(float(array.mean()), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("collection", help="BEIR folder or irds:<id> with queries and qrels")
    parser.add_argument("--index", type=Path, required=True,
                        help="index of the collection, built with the same lower layers")
    parser.add_argument("--name", required=True, help="record name (results/<name>.json)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", default=None, help="MICE model [the shipped default]")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--reranker", action="append", default=[],
                        help="NAME=MODEL_FOLDER of a text re-ranker (cross-encoder); repeatable")
    parser.add_argument("--rerank-queries", type=int, default=None,
                        help="text re-rankers score only the first N queries (all systems are "
                             "also evaluated on that subset)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    import torch

    from mice_engine.bench.stats import paired_t_test
    from mice_engine.evaluation import DEFAULT_METRICS, evaluate
    from mice_engine.indexing import library_versions
    from mice_engine.search import STAGES, FirstStageBlend, Searcher, rank_order
    from mice_engine.sources import read_qrels, read_queries

    queries = read_queries(args.collection, split=args.split)
    qrels = read_qrels(args.collection, split=args.split)
    searcher = Searcher(args.index, model=args.model or "default", fusion=False)
    blend = FirstStageBlend.for_model(searcher.model)
    weight = blend is not None
    store = searcher.index.store
    rerankers = {}
    for spec in args.reranker:
        name, _, folder = spec.partition("=")
        from mice_engine.cross_encoder import load_reranker

        rerankers[name] = load_reranker(folder).eval()

    runs: dict[str, dict[str, list[tuple[str, float]]]] = {"bm25": {}, "bm25>mice": {}}
    if weight:
        runs[BLEND] = {}
    for name in rerankers:
        runs[f"bm25>{name}"] = {}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    subset = [q.id for q in queries[: args.rerank_queries]] if rerankers else []
    started = time.perf_counter()
    for number, query in enumerate(queries):
        # The scoring path of Searcher.search, kept apart so that one pass gives the MICE
        # scores alone and the blend's inputs.
        timings = dict.fromkeys(STAGES, 0.0)
        tick = time.perf_counter()
        rows, bm25 = searcher.index.bm25.retrieve(query.text, args.candidates)
        timings["first_stage"] = time.perf_counter() - tick
        ids = [store.doc_ids[int(row)] for row in rows]
        with_maxsim = blend is not None and blend.needs_maxsim
        mice, _, maxsim = searcher._score(query.text, rows, timings, with_maxsim=with_maxsim)
        order = rank_order(ids, bm25)
        runs["bm25"][query.id] = [(ids[i], float(bm25[i])) for i in order]
        seconds["bm25"].append(timings["first_stage"])
        runs["bm25>mice"][query.id] = [(ids[i], float(mice[i])) for i in rank_order(ids, mice)]
        seconds["bm25>mice"].append(sum(timings.values()))
        if blend is not None:
            blended = blend.apply(mice, bm25, maxsim)
            runs[BLEND][query.id] = [(ids[i], float(blended[i]))
                                     for i in rank_order(ids, blended)]
            seconds[BLEND].append(sum(timings.values()))
        if rerankers and (args.rerank_queries is None or number < args.rerank_queries):
            from mice_engine.cross_encoder import score_texts

            rows = [store.position(doc_id) for doc_id in ids]
            texts = [store.document(row).full_text() for row in rows]
            for name, model in rerankers.items():
                tick = time.perf_counter()
                with torch.inference_mode():
                    values = np.asarray(score_texts(model, query.text, texts,
                                                    batch_size=args.batch_size))
                seconds[f"bm25>{name}"].append(timings["first_stage"]
                                               + time.perf_counter() - tick)
                runs[f"bm25>{name}"][query.id] = [(ids[i], float(values[i]))
                                                  for i in rank_order(ids, values)]
        if (number + 1) % 25 == 0:
            print(f"{number + 1}/{len(queries)} queries, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)

    systems = {}
    per_query: dict[str, dict[str, float]] = {}
    for name, run in runs.items():
        entry = {"ms_per_query": percentiles(seconds[name])}
        if not name.startswith("bm25>") or name in ("bm25>mice", BLEND):
            evaluation = evaluate(run, qrels, DEFAULT_METRICS)
            entry["all_queries"] = evaluation.metrics
            per_query[name] = evaluation.per_query["nDCG@10"]
            if name != "bm25":
                # Paired over the same judged queries, against BM25 alone.
                common = sorted(per_query["bm25"])
                entry["nDCG@10_vs_bm25"] = paired_t_test(
                    [per_query[name][q] for q in common], [per_query["bm25"][q] for q in common])
        if subset:
            entry["subset"] = evaluate({q: run[q] for q in subset if q in run},
                                       {q: qrels[q] for q in subset if q in qrels},
                                       DEFAULT_METRICS).metrics
        systems[name] = entry
        shown = entry.get("all_queries") or entry.get("subset")
        print(f"{name}: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()), file=sys.stderr)
    base = systems["bm25"]["all_queries"]["nDCG@10"]
    record = {
        "benchmark": "rerank_quality",
        "name": args.name,
        "collection": args.collection,
        "split": args.split,
        "queries": len(queries),
        "subset_queries": len(subset) or None,
        "candidates": args.candidates,
        "model": {"source": searcher.model.source, "sha256": searcher.model.weights_sha256(),
                  "fusion": searcher.model.config.fusion or None},
        "rerankers": {name: getattr(model, "source", None) for name, model in rerankers.items()},
        "systems": systems,
        "ndcg10_gain_over_bm25_points": {
            name: round(100 * (entry["all_queries"]["nDCG@10"] - base), 2)
            for name, entry in systems.items() if "all_queries" in entry},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_commit": git_commit(),
        "hardware": hardware(),
        "versions": library_versions(),
    }
    output = REPO / "benchmarks" / "results" / f"{args.name}.json"
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
