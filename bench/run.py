"""The benchmarks: `make bench` = `python -m bench.run --config configs/default.yaml`.

    python -m bench.run --config C [--sections retrieval,encoding,qa_latency,training,size] [--resume]
                        [bench.n_vectors=20000 ...]

Writes `bench.out_dir`/results.json (machine, retrieval, encoding, qa_latency, training, size) and
RESULTS.md (one section per benchmark: the command that reproduces it, its goal, met or not, tables).
Every size is a `bench.*` config key; the defaults fit 45 minutes on an idle 2-core machine. A run with
smaller sizes is labelled a development run in both files.

The sections read a store, embeddings and index of their own, `bench.work_dir/run`, built from the config's
data and `retriever.model` when missing or stale (`bench.run_dir=DIR` reads another run instead).

Each section runs in its own subprocess (its peak memory is its own, a crash loses one section) and its
result is kept in `bench.work_dir/partial/<config fingerprint>/`; `--resume` reuses the sections an
interrupted run finished with the same config. Running only some `--sections` keeps the other
sections of an existing results.json (each records its own command, date and machine; RESULTS.md marks a
section measured on another machine than the header's). After them RESULTS.md shows the benchmarks that run as
commands of their own (service load, faiss vs Milvus, Ray embedding: bench/separate.py) from the JSON files
they wrote into `bench.out_dir`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import CpuSnapshot, load_average, machine_label, machine_record, other_cpu_share
from common.atomic import atomic_write_json, atomic_write_text, fingerprint
from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from configs.loader import save_config, to_dict
from configs.schema import BenchConfig

log = logging.getLogger("bench.run")

SECTION_MODULES = {
    "retrieval": "bench.retrieval",
    "encoding": "bench.encoding",
    "qa_latency": "bench.qa_latency",
    "training": "bench.training",
    "size": "bench.size",
}
# bench.* sizes: below the default, a run is a development run (labelled so in RESULTS.md).
SIZE_KEYS = (
    "n_vectors",
    "n_queries",
    "fit_segments",
    "repeats",
    "encode_segments",
    "encode_tokens",
    "matmul_size",
    "qa_questions",
    "qa_warmup",
    "qa_answer_tokens",
    "train_steps",
    "train_warmup",
    "train_segment_tokens",
)


def reduced_sizes(bench: BenchConfig) -> dict[str, tuple]:
    """{key: (value, default)} for every size below its `make bench` default."""
    default = BenchConfig()
    return {
        k: (getattr(bench, k), getattr(default, k))
        for k in SIZE_KEYS
        if getattr(bench, k) < getattr(default, k)
    }


def prepare_run_dir(cfg, progress: bool = True) -> str:
    """The run_dir every section reads: `bench.run_dir`, or `bench.work_dir/run` (re)built here.

    A bench-owned run keeps `make bench` working on a fresh clone, and independent of what a comparison
    left in run_dir (an index of a fine-tuned encoder that retriever.model does not name, for one).
    The store is reused when its inputs are unchanged; the index is rebuilt when it is missing or was
    built with another encoder or store.
    """
    if cfg.bench.run_dir:
        return cfg.bench.run_dir
    from data_prep.build import build_store
    from data_prep.store import SegmentStore
    from retriever.encoder import Encoder
    from retriever.index import ensure_index

    run = Path(cfg.bench.work_dir) / "run"
    cfg.run_dir = str(run)
    build_store(cfg, progress=progress)
    ensure_index(
        cfg,
        encoder=Encoder.from_config(cfg),
        store=SegmentStore.open(run / "store"),
        run_dir=run,
        progress=progress,
    )
    return str(run)


def run_section(name: str, cfg) -> dict:
    """Run one section in this process and return its JSON-ready result."""
    import importlib

    return importlib.import_module(SECTION_MODULES[name]).run(cfg)


def _command(config: str | None, overrides: list[str], sections: list[str] | None) -> str:
    parts = ["python", "-m", "bench.run"]
    if config:
        parts += ["--config", config]
    if sections:
        parts += ["--sections", ",".join(sections)]
    return shlex.join(parts + overrides)


def _load_previous(path: Path) -> dict:
    """The results.json a partial run (`--sections`) adds to; every kept section names its machine.

    Sections written before sections recorded their own machine get the header's, which was the machine
    of the run that last wrote the file: the new run replaces the header with its own machine.
    """
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; starting a fresh results file", path)
        return {}
    if isinstance(previous.get("machine"), dict):
        label = machine_label(previous["machine"])
        for name in SECTION_MODULES:
            if isinstance(previous.get(name), dict):
                previous[name].setdefault("machine", label)
    return previous


def main(argv=None) -> int:
    parser = build_parser("python -m bench.run", __doc__)
    parser.add_argument(
        "--sections",
        default=None,
        help=f"comma list of {', '.join(SECTION_MODULES)} (default: bench.sections)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the sections an interrupted run finished with the same config",
    )
    parser.add_argument(
        "--inline",
        action="store_true",
        help="run the sections in this process instead of one subprocess each",
    )
    parser.add_argument("--worker", default=None, help="internal: run one section and write its JSON here")
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, ns = parse(parser, argv)
    sections = (
        [s.strip() for s in ns.sections.split(",") if s.strip()] if ns.sections else list(cfg.bench.sections)
    )
    unknown = [s for s in sections if s not in SECTION_MODULES]
    if unknown:
        raise UserError(f"unknown bench section(s) {unknown}; known: {', '.join(SECTION_MODULES)}")

    if ns.worker:  # one section, in this process, result to a file
        if len(sections) != 1:
            raise UserError("--worker runs exactly one section")
        atomic_write_json(Path(ns.worker), run_section(sections[0], cfg))
        return 0

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    cfg.run_dir = prepare_run_dir(cfg)
    out_dir = Path(cfg.bench.out_dir)
    fp = fingerprint(to_dict(cfg))
    partial = Path(cfg.bench.work_dir) / "partial" / fp
    partial.mkdir(parents=True, exist_ok=True)
    config_file = partial / "config.yaml"
    save_config(cfg, config_file)
    explicit = ns.sections is not None
    results = _load_previous(out_dir / "results.json") if explicit else {}
    started = time.perf_counter()
    cpu_at_start = CpuSnapshot.take()
    reduced = reduced_sizes(cfg.bench)
    results.update(
        {
            "machine": machine_record(),
            "command": _command(ns.config, overrides, sections if explicit else None),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "bench_config": to_dict(cfg.bench),
            "config_fingerprint": fp,
        }
    )
    for name in SECTION_MODULES:
        results.setdefault(name, None)

    def write() -> None:
        from bench.report import render
        from bench.separate import load_separate

        results["total_seconds"] = round(time.perf_counter() - started, 1)
        results["load_average_at_end"] = load_average()
        results["other_cpu_share"] = other_cpu_share(cpu_at_start, CpuSnapshot.take())
        flagged = {n: results[n] for n in SECTION_MODULES if isinstance(results.get(n), dict)}
        results["development_run"] = bool(reduced) or any(r.get("development_run") for r in flagged.values())
        results["reduced_sizes"] = {k: list(v) for k, v in reduced.items()}
        atomic_write_json(out_dir / "results.json", results)
        atomic_write_text(
            out_dir / "RESULTS.md", render(results | {"reduced_sizes": reduced}, load_separate(out_dir))
        )

    for name in sections:
        target = partial / f"{name}.json"
        command = _command(ns.config, overrides, [name])
        load_before = load_average()
        cpu_before = CpuSnapshot.take()
        t0 = time.perf_counter()
        if ns.resume and target.is_file():
            log.info("section %s: reusing %s (--resume)", name, target)
            result = json.loads(target.read_text())
        else:
            target.unlink(missing_ok=True)
            log.info("section %s: %s", name, command)
            if ns.inline:
                result = run_section(name, cfg)
                atomic_write_json(target, result)
            else:
                proc = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.run",
                        "--config",
                        str(config_file),
                        "--sections",
                        name,
                        "--worker",
                        str(target),
                    ],
                    check=False,
                )
                if proc.returncode != 0 or not target.is_file():
                    result = {
                        "error": f"the section's process exited with code {proc.returncode} (see its log above)"
                    }
                else:
                    result = json.loads(target.read_text())
        result.update(
            {
                "command": command,
                "load_average_before": load_before,
                "other_cpu_share": other_cpu_share(cpu_before, CpuSnapshot.take()),
                "seconds_total": round(time.perf_counter() - t0, 1),
                "development_run": bool(reduced),
                "date": results["started"],
                "machine": machine_label(results["machine"]),
            }
        )
        results[name] = result
        write()
        log.info("section %s done in %.0f s", name, result["seconds_total"])
    write()
    print(f"wrote {out_dir / 'RESULTS.md'} and {out_dir / 'results.json'}")
    failed = [n for n in sections if "error" in (results.get(n) or {})]
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
