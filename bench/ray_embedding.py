"""Corpus-embedding throughput, single process against Ray: `python -m bench.ray_embedding --config C [k=v ...]`.

Reads `run_dir/store` (made by `python -m data_prep.build`; nothing in run_dir is written) and embeds all of it
with `retriever.model` into temporary folders, once per engine: `local` (this process, on each of
`--local-threads` torch threads, default torch's own count and 1), then
`compute.engine=ray` with each of `--workers` (default 1,2) actors of `compute.ray_cpus_per_worker` CPUs on a
local Ray started for the run. For each it reports segments/s end to end (Ray's start and the actors' model
loading included, as a command pays them) and in steady state (from the first batch's vectors to the last),
and whether the shard files are byte-identical to the first local run's. `--out FILE` writes the numbers as JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.separate import provenance
from configs.cli import build_parser, parse, run_main
from data_prep.store import SegmentStore
from retriever.embed import embed_store, encode_segments
from retriever.embed_ray import ray_batch_encoder
from retriever.encoder import Encoder


class _Clock:
    """Wraps a batch encoder: the time its first and last batches of vectors arrived, and the rows."""

    def __init__(self, encode_batches):
        self.encode_batches, self.first, self.last, self.first_rows, self.rows = encode_batches, None, None, 0, 0

    def __call__(self, batches: list[np.ndarray]) -> Iterator[np.ndarray]:
        inner = self.encode_batches(batches)
        try:
            for vecs in inner:
                now = time.perf_counter()
                if self.first is None:
                    self.first, self.first_rows = now, len(vecs)
                self.last = now
                self.rows += len(vecs)
                yield vecs
        finally:
            if hasattr(inner, "close"):
                inner.close()


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.glob("*.npy")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def measure(cfg, store: SegmentStore, encoder, engine: str, workers: int, out_dir: Path,
            threads: int | None = None) -> dict:
    """Embed `store` into `out_dir` with one engine (local: on `threads` torch threads, None = torch's default);
    the timings, throughputs and a digest of the shard files."""
    import torch

    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    if engine == "ray":
        run_cfg = dataclasses.replace(cfg, compute=dataclasses.replace(cfg.compute, engine="ray", ray_workers=workers))
        clock = _Clock(ray_batch_encoder(encoder, store, run_cfg))
    else:
        clock = _Clock(lambda batches: (encode_segments(store, encoder, ids) for ids in batches))
    t0 = time.perf_counter()
    embed_store(store, encoder, out_dir, shard_size=cfg.index.shard_size, dtype=cfg.index.embed_dtype,
                batch_size=cfg.retriever.batch_size, progress=False, encode_batches=clock)
    total = time.perf_counter() - t0
    torch.set_num_threads(default_threads)
    steady = clock.last - clock.first if clock.last and clock.first else 0.0
    return {
        "engine": engine,
        "workers": workers if engine == "ray" else None,
        "torch_threads": threads or default_threads if engine == "local" else cfg.compute.ray_cpus_per_worker,
        "segments": clock.rows,
        "seconds": round(total, 2),
        "segments_per_s": round(clock.rows / total, 2),
        "startup_s": round(clock.first - t0, 2),
        "steady_segments_per_s": round((clock.rows - clock.first_rows) / steady, 2) if steady > 0 else None,
        "shards_sha256": _digest(out_dir),
    }


def run(cfg, workers: list[int], local_threads: list[int]) -> dict:
    store = SegmentStore.open(Path(cfg.run_dir) / "store")
    encoder = Encoder.from_config(cfg)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ray-embed-bench-") as tmp:
        for t in local_threads:
            rows.append(measure(cfg, store, encoder, "local", 0, Path(tmp) / f"local{t}", threads=t or None))
        for w in workers:
            rows.append(measure(cfg, store, encoder, "ray", w, Path(tmp) / f"ray{w}"))
    for row in rows:
        row["same_files_as_local"] = row["shards_sha256"] == rows[0]["shards_sha256"]
    return {
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "segments": len(store),
        "encoder": encoder.info.name,
        "batch_size": cfg.retriever.batch_size,
        "ray_cpus_per_worker": cfg.compute.ray_cpus_per_worker,
        "rows": rows,
    }


def main(argv=None) -> int:
    parser = build_parser("python -m bench.ray_embedding", __doc__)
    parser.add_argument("--workers", default="1,2", help="Ray actor counts measured (comma list, default 1,2)")
    parser.add_argument("--local-threads", default="0,1",
                        help="torch threads of the local runs (comma list; 0 = torch's default, this machine's cores)")
    parser.add_argument("--out", default=None, help="also write the report as JSON to this file")
    cfg, ns = parse(parser, argv)
    started = provenance("bench.ray_embedding", sys.argv[1:] if argv is None else argv)
    report = started | run(cfg, [int(w) for w in ns.workers.split(",") if w.strip()],
                           [int(t) for t in ns.local_threads.split(",") if t.strip()])
    print(f"{report['segments']} segments, {report['encoder']}, batch {report['batch_size']}; "
          f"{report['machine_label']}; load average {report['load_average_at_start']} at start, "
          f"{report['load_average_at_end']} at end")
    for row in report["rows"]:
        name = (f"local, {row['torch_threads']} thread(s)" if row["engine"] == "local"
                else f"ray, {row['workers']} worker(s)")
        print(f"  {name:22s} {row['seconds']:7.1f} s  {row['segments_per_s']:7.1f} seg/s end to end  "
              f"(first vectors after {row['startup_s']:.1f} s, then {row['steady_segments_per_s']} seg/s)  "
              f"same files as local: {row['same_files_as_local']}")
    if ns.out:
        Path(ns.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    run_main(main)
