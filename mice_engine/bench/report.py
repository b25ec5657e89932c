"""The human side of a benchmark record: a Markdown report and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LATENCY_PLOT = "quality_vs_latency.png"
SIZE_PLOT = "quality_vs_size.png"

_ORDER_NAMES = {"first": "in file order", "random": "of a seeded random order"}
_STAGE_NAMES = {"first_stage": "first stage", "query_encoding": "query encoding",
                "load_states": "state loading", "load_texts": "text loading",
                "interaction": "interaction", "other": "other", "end_to_end": "end to end"}


def write_plots(record: dict[str, Any], folder: Path) -> list[str]:
    """Draw quality against end-to-end latency and against index size, one panel per
    collection; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = record["suite"]["settings"]["metrics"][0]
    collections = record["collections"]
    written = []
    for name, x_label, value in (
        (LATENCY_PLOT, "end-to-end latency per query, p50 (ms)",
         lambda system: system["latency_ms"]["end_to_end"]["p50"]),
        (SIZE_PLOT, "index size (MiB)", lambda system: system["index_bytes"] / 2**20),
    ):
        figure, axes = plt.subplots(1, len(collections), figsize=(5.5 * len(collections), 4.2),
                                    squeeze=False)
        for axis, (collection, values) in zip(axes[0], collections.items()):
            for system_name, system in values["systems"].items():
                x, y = value(system), system["metrics"][metric]
                axis.scatter([x], [y], s=40)
                label = system_name
                if system["query_count"] < values["judged_queries"]:
                    label += f" ({system['query_count']} queries)"
                axis.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4),
                              fontsize=8)
            axis.set_xscale("log")
            axis.set_xlabel(x_label)
            axis.set_ylabel(metric)
            axis.set_title(collection)
            axis.grid(True, which="both", alpha=0.3)
        figure.suptitle(f"{record['suite']['name']}: {metric} against "
                        f"{'latency' if name == LATENCY_PLOT else 'index size'}")
        figure.tight_layout()
        figure.savefig(folder / name, dpi=110)
        plt.close(figure)
        written.append(name)
    return written


def write_report(record: dict[str, Any], path: Path, plots: list[str]) -> None:
    """Write the Markdown report of ``record`` to ``path``."""
    path.write_text(render_report(record, plots), encoding="utf-8")


def render_report(record: dict[str, Any], plots: list[str]) -> str:
    settings = record["suite"]["settings"]
    metrics = settings["metrics"]
    lines = [f"# Benchmark `{record['suite']['name']}`", ""]
    if settings.get("description"):
        lines += [settings["description"], ""]
    lines += _header(record)
    for collection, values in record["collections"].items():
        lines += [f"## {collection}", "",
                  (f"Source `{values['source']}`, split `{values['split']}`: "
                  f"{values['judged_queries']} judged queries. A system limited to N queries "
                  f"runs the first N {_ORDER_NAMES[values['query_order']]}."), ""]
        lines += _quality(values, metrics)
        lines += _subsets(values, metrics)
        lines += _latency(values)
        lines += _indexing(values)
        if values.get("interaction"):
            lines += _interaction(values["interaction"])
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def _header(record: dict[str, Any]) -> list[str]:
    hardware = record["hardware"]
    versions = record["versions"]
    git = record["git"]
    load = record["load_average"]
    matmul = record["matmul"]
    lines = [
        f"- date: {record['date']}; {record['seconds']:.0f} s in all",
        f"- command: `{record['command']}`",
        f"- git commit: {git['commit'] or 'unknown'}"
        + (" (with local changes)" if git.get("dirty") else ""),
        f"- seed: {record['seed']}",
        f"- hardware: {hardware['processor']}, {hardware['logical_cores']} logical cores, "
        f"{hardware['memory_gib']} GiB, torch threads {hardware['torch_threads']}, device "
        f"{hardware['device']}" + (f", GPU {hardware['gpu']}" if hardware.get("gpu") else ""),
        "- versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        (f"- load average (1, 5, 15 min): {load.get('start')} at the start, {load.get('end')} at "
        "the end; other work on the machine slows every timing"),
        (f"- float32 matmul ({matmul['start']['size']}^2): {matmul['start']['best_gflops']} "
        f"GFLOP/s best at the start, {matmul['end']['best_gflops']} at the end"),
        "",
        "| model | class | name | trained | source | SHA-256 |",
        "|---|---|---|---|---|---|",
    ]
    for key, model in record["models"].items():
        lines.append(f"| {key} | {model['class']} | {model['name']} | {model['trained']} "
                     f"| {model['source']} | {model['sha256'][:12]}… |")
    return lines + [""]


def _quality(values: dict[str, Any], metrics: list[str]) -> list[str]:
    systems = values["systems"]
    first = next(iter(systems))
    lines = ["### Quality", "",
             (f"Means over each system's queries. p: two-sided paired test against `{first}` on "
             "the queries both ran."), "",
             "| system | queries | " + " | ".join(metrics) + " | "
             + " | ".join(f"p ({metric})" for metric in metrics) + " |",
             "|---|---|" + "---|" * (2 * len(metrics))]
    for name, system in systems.items():
        cells = [f"{system['metrics'][metric]:.4f}" for metric in metrics]
        tests = system.get("significance", {}).get("metrics", {})
        p_cells = [_p_value(tests.get(metric)) for metric in metrics]
        lines.append(f"| {name} | {system['query_count']} | " + " | ".join(cells) + " | "
                     + " | ".join(p_cells) + " |")
    test = next((system["significance"] for system in systems.values()
                 if "significance" in system), None)
    if test:
        lines += ["", f"Test: {test['test']}, alpha {test['alpha']}; * marks p < alpha."]
    return lines + [""]


def _p_value(test: dict[str, Any] | None) -> str:
    if not test or test.get("p_value") is None:
        return "–"
    mark = " *" if test.get("significant") else ""
    return f"{test['p_value']:.3g}{mark}"


def _subsets(values: dict[str, Any], metrics: list[str]) -> list[str]:
    lines = []
    for subset in values["subsets"]:
        lines += [f"### Quality on the first {subset['query_count']} queries",
                  "", (f"The query set of {', '.join(subset['ran_by'])}; every system that ran "
                  "it is scored on it alone."), "",
                  "| system | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for name, row in subset["systems"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[metric]:.4f}" for metric in metrics)
                         + " |")
        lines.append("")
    return lines


def _latency(values: dict[str, Any]) -> list[str]:
    lines = ["### Latency per query", "",
             ("p50 / p95 / p99 in milliseconds; other = end to end less the timed stages "
             "(ranking, bookkeeping)."), "",
             "| system | stage | p50 | p95 | p99 | mean |", "|---|---|---|---|---|---|"]
    for name, system in values["systems"].items():
        for stage, row in system["latency_ms"].items():
            lines.append(f"| {name} | {_STAGE_NAMES.get(stage, stage)} | {row['p50']:.1f} "
                         f"| {row['p95']:.1f} | {row['p99']:.1f} | {row['mean']:.1f} |")
    lines += ["", ("| system | queries/s | peak resident memory | peak GPU memory "
              "| end to end / interaction (mean, p50) |"), "|---|---|---|---|---|"]
    for name, system in values["systems"].items():
        multiple = system.get("end_to_end_over_interaction")
        multiple_text = (f"{multiple['mean']:.3f}, {multiple['p50']:.3f}"
                         if multiple and multiple["mean"] else "–")
        gpu = system.get("peak_gpu_mib")
        lines.append(f"| {name} | {system['queries_per_second']:.2f} "
                     f"| {system['peak_rss_mib']} MiB | {f'{gpu} MiB' if gpu else '–'} "
                     f"| {multiple_text} |")
    return lines + [""]


def _indexing(values: dict[str, Any]) -> list[str]:
    lines = ["### Indexes", "",
             ("Encoded: every document through the lower layers. Derived: made from another "
             "index's float16 states without encoding (a dense index, or coded states)."), "",
             ("| index | made | documents | tokens | seconds | documents/s | tokens/s | bytes "
              "| bytes/token (index) | bytes/token (states) | peak resident memory |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, index in values["indexes"].items():
        reused = " (reused: not measured in this run)" if index["reused"] else ""
        memory = index.get("memory", {}).get("peak_rss_mib")
        if index["kind"] == "encoded":
            made = "encoded"
            timing = (f"{index['build_seconds']:.1f} | {index['documents_per_second']:.1f} "
                      f"| {index['tokens_per_second']:,.0f}")
        else:
            made = f"derived from {index['derived_from']}"
            if index.get("compression") not in (None, "none"):
                made += f", {index['compression']} codes"
            if index.get("dense"):
                made += ", dense index"
            seconds = index["derive_seconds"]
            timing = f"{seconds:.1f} | – | –" if seconds is not None else "– | – | –"
        lines.append(f"| {name}{reused} | {made} | {index['documents']:,} "
                     f"| {index['tokens']:,} | {timing} | {index['bytes']:,} "
                     f"| {index['bytes_per_token']} | {index['state_bytes_per_token']} "
                     f"| {f'{memory} MiB' if memory else '–'} |")
    base = values["indexes"][values["base_index"]]
    bare = base.get("bare_forward", {})
    if "before" in bare:
        lines += ["", (f"Bare lower-layer forward pass on {bare['before']['documents']} sampled "
                  f"documents (batch {bare['before']['batch_size']}): "
                  f"{bare['before']['tokens_per_second']:,.0f} tokens/s before indexing, "
                  f"{bare['after']['tokens_per_second']:,.0f} after.")]
    if "indexing_fraction" in bare:
        lines.append(f"Indexing throughput (whole build) is {bare['indexing_fraction']:.3f} "
                     f"of that bare forward pass; encoding alone is "
                     f"{bare['encoding_fraction']:.3f}.")
    if "indexing_fraction_in_build" in bare:
        lines.append(f"Timed inside the build, the forward passes took "
                     f"{base['forward_seconds']:.1f} s of {base['build_seconds']:.1f} s: indexing "
                     f"throughput is {bare['indexing_fraction_in_build']:.3f} of the forward "
                     "pass's, with the same load on the machine on both sides.")
    return lines + [""]


def _interaction(values: dict[str, Any]) -> list[str]:
    if not values.get("query_count"):
        return ["### Interaction micro-benchmark", "", "No query had candidates.", ""]
    matmul = values["matmul"]
    lines = [
        "### Interaction micro-benchmark", "",
        (f"{values['query_count']} queries, {values['candidates']} first-stage candidates each, "
        f"scored by MICE (`{values['mice_model']}`, from stored states) and by the full "
        f"cross-encoder (`{values['cross_encoder_model']}`, forward pass on tokenised pairs), "
        f"forward passes of at most {values['mice_batch_size']} and "
        f"{values['cross_encoder_batch_size']} candidates. Float32 matmul rate in the same run: "
        f"{matmul['best_gflops']} GFLOP/s best, {matmul['median_gflops']} median."), "",
        "| | MICE | cross-encoder |", "|---|---|---|",
        (f"| seconds, all queries | {values['mice_seconds']:.3f} "
        f"| {values['cross_encoder_seconds']:.3f} |"),
        (f"| GFLOP per candidate | {values['mice_gflop_per_candidate']:.4f} "
        f"| {values['cross_encoder_gflop_per_candidate']:.4f} |"),
        f"| achieved GFLOP/s | {values['mice_gflops']:.1f} | {values['cross_encoder_gflops']:.1f} |",
        (f"| time / time of its arithmetic at the best matmul rate "
        f"| {values['mice_time_over_arithmetic']:.2f} "
        f"| {values['cross_encoder_time_over_arithmetic']:.2f} |"), "",
        (f"**Speed ratio cross-encoder : MICE = {values['ratio']:.1f}** (total time over total "
        f"time); per query median {values['median_query_ratio']:.1f}, minimum "
        f"{values['min_query_ratio']:.1f}. The arithmetic alone allows "
        f"{values['arithmetic_ratio']:.1f}."), "",
        "| query | query tokens | stored tokens | MICE ms | cross-encoder ms | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in values["queries"]:
        lines.append(f"| {row['query_id']} | {row['query_tokens']} | {row['stored_tokens']:,} "
                     f"| {row['mice_seconds'] * 1000:.1f} "
                     f"| {row['cross_encoder_seconds'] * 1000:.1f} | {row['ratio']:.1f} |")
    profile = values.get("profile")
    if profile:
        lines += ["", (f"Profile of one query's MICE search ({profile['profiled_ms']:.1f} ms of "
                  "operator self time; interaction stage "
                  f"{profile['interaction_seconds'] * 1000:.1f} ms):"), "",
                  "| operator | calls | self ms | share |", "|---|---|---|---|"]
        for operator in profile["operators"]:
            lines.append(f"| `{operator['name']}` | {operator['calls']} "
                         f"| {operator['self_ms']:.2f} | {operator['share']:.1%} |")
    return lines + [""]


def render_summary(records: list[dict[str, Any]]) -> str:
    """Summarise several records as two Markdown tables: quality and latency of every system,
    then the efficiency figures of every collection."""
    lines = [("| suite | collection | system | queries | nDCG@10 | RR@10 | R@100 "
             "| p50 end to end | queries/s | index bytes/token |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        for collection, values in record["collections"].items():
            tokens = values["indexes"][values["base_index"]]["tokens"]
            for name, system in values["systems"].items():
                metrics = system["metrics"]
                cells = [f"{metrics[metric]:.4f}" if metric in metrics else "–"
                         for metric in ("nDCG@10", "RR@10", "R@100")]
                lines.append(
                    f"| {record['suite']['name']} | {collection} | {name} "
                    f"| {system['query_count']} | " + " | ".join(cells)
                    + f" | {system['latency_ms']['end_to_end']['p50']:.1f} ms "
                    f"| {system['queries_per_second']:.2f} "
                    f"| {system['index_bytes'] / tokens:.1f} |")
    lines += ["", ("| suite | collection | cross-encoder : MICE, interaction | arithmetic ratio "
              "| MICE time / its arithmetic | indexing / bare forward "
              "| MICE end to end / interaction (p50) |"), "|---|---|---|---|---|---|---|"]
    for record in records:
        for collection, values in record["collections"].items():
            interaction = values.get("interaction") or {}
            bare = values["indexes"][values["base_index"]].get("bare_forward", {})
            fraction = bare.get("indexing_fraction")
            in_build = bare.get("indexing_fraction_in_build")
            multiples = [system["end_to_end_over_interaction"]["p50"]
                         for system in values["systems"].values()
                         if system["reranker"] == "mice" and system.get(
                             "end_to_end_over_interaction")]
            ratio = (f"{interaction['ratio']:.1f} ({interaction['query_count']} queries)"
                     if interaction.get("ratio") else "–")
            lines.append(
                f"| {record['suite']['name']} | {collection} | {ratio} "
                f"| {_number(interaction.get('arithmetic_ratio'), '.1f')} "
                f"| {_number(interaction.get('mice_time_over_arithmetic'), '.2f')} "
                f"| {_number(fraction, '.3f')} (probe), {_number(in_build, '.3f')} (in build) "
                f"| {', '.join(f'{value:.3f}' for value in multiples) or '–'} |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)
