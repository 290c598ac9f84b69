"""`bench/RESULTS.md` from the results dict: a header (machine, command, development-run banner), a summary
table of goals, then one section per benchmark with the command that produced it, its goal, whether the
goal was met, and its table(s). Pure formatting: no measurement happens here."""

from __future__ import annotations

from bench import encoding, qa_latency, retrieval, size, training
from bench.machine import machine_label
from bench.separate import render_separate

SECTIONS = {
    "retrieval": ("1. Retrieval at scale", retrieval.to_markdown),
    "encoding": ("2. Encoding throughput", encoding.to_markdown),
    "qa_latency": ("3. QA latency", qa_latency.to_markdown),
    "training": ("4. Training throughput", training.to_markdown),
    "size": ("5. Size", size.to_markdown),
}


def headline(name: str, r: dict) -> str:
    """One line of the section's key result for the summary table."""
    if name == "retrieval":
        ivf = (
            f"recall@10 {r['ivf_recall_at_10']:.3f} at nprobe {r['recommended_nprobe']}, "
            f"{r['ivf_speedup_vs_flat']}× the Flat queries/s ({r['scale']['n_vectors']:,} vectors)"
        )
        best = r.get("best")
        if not r.get("ann") or best is None:
            return ivf
        params = ", ".join(f"{key} {v:g}" for key, v in best["params"].items())
        return (
            f"best: {best['factory']} ({params}) recall@10 {best['recall@10']:.3f} at {best['speedup_vs_flat']}× "
            f"the Flat queries/s; IVFFlat: {ivf}"
        )
    if name == "encoding":
        parts = [
            f"{r[k]['dtype']} {r[k]['segments_per_s']} seg/s = {r[k]['fraction_of_peak']:.2f} of peak"
            for k in ("fp32", "bf16", "fp16")
            if k in r and "skipped" not in r[k]
        ]
        return f"{r['fraction_of_peak']:.2f} of peak ({r['better_dtype']}, the faster); " + "; ".join(parts)
    if name == "qa_latency":
        parts = []
        for k in r["k_values"]:
            e = r[f"k{k}"]
            if "dynamic_over_rag" in e:
                parts.append(
                    f"k={k}: {e['dynamic_over_rag']:.2f}× (online {e['dynamic_online_over_rag']:.2f}×)"
                )
        return "dynamic_prefix total / rag_text total: " + ", ".join(parts) if parts else "no dynamic system"
    if name == "training":
        return ", ".join(f"{s} {d['examples_per_s']} ex/s" for s, d in r["systems"].items())
    if name == "size":
        items = [f"{key} {r[key]['bytes_per_segment']:,} B" for key in ("embeddings", "index") if key in r]
        items += [
            f"prefix {name} {size_:,} B"
            for name, size_ in r["prefix_store_computed"]["bytes_per_segment"].items()
        ]
        return "per segment: " + ", ".join(items)
    return ""


def _met(r: dict) -> str:
    if "met" not in r:
        return "– (reported, no goal)"
    return "**met**" if r["met"] else "**not met**"


# Other processes using more than this share of the CPU over a run make its absolute times pessimistic.
SHARED_CPU_SHARE = 0.25


def _sharing(results: dict) -> str:
    """The report's verdict on whether other work ran beside the bench.

    Judged from the CPU time other processes used during the run (`other_cpu_share`); results written
    before that was measured fall back to the load average at start, which also counts a job that had
    just ended.
    """
    m = results["machine"]
    share = results.get("other_cpu_share")
    note = " (**the machine was shared**: absolute times are pessimistic, the side-by-side ratios less so)"
    if share is not None:
        return f"; other processes used {share:.0%} of the CPU during the run" + (
            note if share > SHARED_CPU_SHARE else ""
        )
    return note if (m["load_average_at_start"][0] or 0) > 0.5 * (m["logical_cores"] or 1) else ""


def render(results: dict, separate: dict[str, dict] | None = None) -> str:
    """RESULTS.md of `results`, then the separate benchmarks' files (`bench.separate.load_separate`)."""
    m = results["machine"]
    v = m["versions"]
    lines = ["# Benchmark results", ""]
    if results.get("development_run"):
        changed = ", ".join(f"`{k}={val}` (default {d})" for k, (val, d) in results["reduced_sizes"].items())
        lines += [
            "> **SMALL DEVELOPMENT RUN — not the benchmark.** Sizes below the `make bench` defaults: "
            f"{changed}. Numbers show that the code runs end to end; run `make bench` on an idle machine "
            "for the real figures.",
            "",
        ]
    lines += [
        f"Command: `{results['command']}` ({results['started']}, {results['total_seconds']:.0f} s). "
        f"Numbers: [results.json](results.json).",
        "",
        f"Machine (of this command; a section measured on another says so): {m['cpu_model']} ({', '.join(m['cpu_flags'])}), {m['logical_cores']} logical / "
        f"{m['physical_cores']} physical cores, {m['ram_gb']} GB RAM; torch {v.get('torch')}, faiss "
        f"{v.get('faiss-cpu')}, transformers {v.get('transformers')}; {m['torch_threads']} torch / "
        f"{m['faiss_threads']} faiss threads"
        + "".join(f", {k}={val}" for k, val in (m.get("thread_env") or {}).items())
        + (f", niceness {m['niceness']}" if m.get("niceness") else "")
        + f"; load average at start {m['load_average_at_start']}, at end "
        f"{results.get('load_average_at_end')}" + _sharing(results) + ".",
        "",
        "Figures within a section are measured side by side in one process (ratios), plus absolutes. These "
        "are not timed tests: goals are reported against, met or not.",
        "",
        "## Summary",
        "",
        "| section | goal | result | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, (title, _) in SECTIONS.items():
        r = results.get(name)
        if r is None:
            lines.append(f"| {title} | – | not run | – |")
        elif "error" in r:
            lines.append(f"| {title} | {r.get('goal', '–')} | failed: {r['error']} | – |")
        else:
            lines.append(f"| {title} | {r.get('goal', '–')} | {headline(name, r)} | {_met(r)} |")
    for name, (title, fmt) in SECTIONS.items():
        r = results.get(name)
        lines += ["", f"## {title}", ""]
        if r is None:
            lines.append("Not run.")
            continue
        lines.append(
            f"Command: `{r['command']}` ({r.get('seconds_total', r.get('seconds', 0)):.0f} s, load average "
            f"before {r.get('load_average_before')}"
            + (
                f", other processes used {r['other_cpu_share']:.0%} of the CPU"
                if r.get("other_cpu_share") is not None
                else ""
            )
            + ")."
        )
        if r.get("machine") and r["machine"] != machine_label(results["machine"]):
            lines += ["", f"**Another machine**: this section ran on {r['machine']} ({r.get('date')})."]
        if "error" in r:
            lines += ["", f"**Failed**: {r['error']}"]
            continue
        if "goal" in r:
            lines += ["", f"Goal: {r['goal']} — {_met(r)}."]
        lines += ["", fmt(r)]
    lines += render_separate(separate or {})
    return "\n".join(lines) + "\n"
