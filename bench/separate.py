"""Benchmarks run as commands of their own, and their part of RESULTS.md.

The retrieval service under load (`bench.service_load --json`), faiss against Milvus on the same vectors
(`bench.vector_backends --out`) and Ray against single-process embedding (`bench.ray_embedding --out`) start
servers, Milvus or Ray, so `make bench` does not run them. Each writes its numbers with `provenance()` (the
command line, the date and the machine). `bench.run` renders the files it finds in `bench.out_dir` under the
names of SEPARATE_FILES after its own sections, so RESULTS.md keeps them across reruns of `make bench`.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.load import table
from bench.machine import machine_label, machine_record

log = logging.getLogger(__name__)


def provenance(module: str, argv: Sequence[str]) -> dict:
    """What a reader of a separate benchmark's file needs to rerun and judge it; take it before the run
    (the date and load average are those at the start)."""
    m = machine_record()
    return {
        "command": shlex.join(["python", "-m", module, *argv]),
        "date": m["date"],
        "machine": m,
        "machine_label": machine_label(m),
        "load_average_at_start": m["load_average_at_start"],
    }


def _service(r: dict) -> str:
    return table(r["rows"])


def _vector_backends(r: dict) -> str:
    lines = [
        f"{r['questions']} {r['split']} questions over {r['segments']} segments ({r['dim']}-d), top-{r['k']} "
        "ids compared with faiss Flat (exact):",
        "",
        "| backend | build s | search s | ms/question | same ids in order | same ids as a set |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in r["backends"].items():
        lines.append(
            f"| {name} | {row['build_s']:.2f} | {row['search_s']:.2f} | {row['ms_per_question']:.2f} | "
            f"{row['same_order']:.4f} | {row['same_set']:.4f} |"
        )
    return "\n".join(lines)


def _ray(r: dict) -> str:
    lines = [
        f"{r['segments']} segments, {r['encoder']}, batch {r['batch_size']}, "
        f"{r['ray_cpus_per_worker']} CPU per Ray worker:",
        "",
        "| engine | end to end s | segments/s end to end | first vectors after s | segments/s after them "
        "| shard files = local |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in r["rows"]:
        name = (
            f"local, {row['torch_threads']} torch thread(s)"
            if row["engine"] == "local"
            else f"Ray, {row['workers']} worker(s)"
        )
        lines.append(
            f"| {name} | {row['seconds']:.1f} | {row['segments_per_s']:.1f} | {row['startup_s']:.1f} | "
            f"{row['steady_segments_per_s']} | {'yes' if row['same_files_as_local'] else 'no'} |"
        )
    return "\n".join(lines)


# file in bench.out_dir -> (title, renderer of its table)
SEPARATE_FILES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "service_load.json": ("Retrieval service under 1, 8 and 50 concurrent clients", _service),
    "vector_backends.json": ("faiss and Milvus on the same vectors", _vector_backends),
    "ray_embedding.json": ("Corpus embedding: one process against Ray", _ray),
}


def load_separate(out_dir: Path) -> dict[str, dict]:
    """{file name: its numbers} for the SEPARATE_FILES present in `out_dir` (an unreadable one is skipped
    with a warning: it is a report input, not something to stop `make bench` for)."""
    found = {}
    for name in SEPARATE_FILES:
        path = Path(out_dir) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("%s is not readable JSON (%s); RESULTS.md leaves it out", path, e)
            continue
        if not isinstance(data, dict) or "command" not in data:
            log.warning("%s has no command it came from; RESULTS.md leaves it out", path)
            continue
        found[name] = data
    return found


def render_separate(found: dict[str, dict]) -> list[str]:
    """RESULTS.md lines of the separate benchmarks in `found` (nothing when there are none)."""
    if not found:
        return []
    lines = [
        "",
        "## Measured by their own commands",
        "",
        "These start a server, Milvus or Ray, so `make bench` does not run them; rerun one with its command "
        "(the file it writes in this folder is shown here).",
    ]
    for name, (title, fmt) in SEPARATE_FILES.items():
        r = found.get(name)
        if r is None:
            continue
        when = (
            f"{r['date']}; load average at start {r.get('load_average_at_start')}"
            if "date" in r
            else f"finished {r.get('date_at_end')}; load average at the end {r.get('load_average_at_end')}"
        )
        lines += [
            "",
            f"### {title} ([{name}]({name}))",
            "",
            f"Command: `{r['command']}` ({r.get('machine_label')}; {when}).",
            "",
            fmt(r),
        ]
    return lines
