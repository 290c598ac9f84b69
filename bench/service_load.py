"""Load check of the retrieval service: queries/s and latency percentiles with 1, 8 and 50 concurrent clients.

    python -m bench.service_load --url http://127.0.0.1:8765 [--clients 1,8,50] [--requests 400]
    python -m bench.service_load --config C [key=value ...]      # starts the service in this process first

Each client is a thread with its own keep-alive HTTP connection sending `POST /search` requests
(`--top-k`, questions of run_dir/store cycled, or `--questions FILE`, one a line) back to back until the
level's `--requests` are done; `--warmup` requests per level are not timed. Reported per level: requests,
errors (non-200 answers and failed connections, counted, never retried), queries/s over the level's wall
time, p50/p95/p99 latency in ms. `--json FILE` writes the same numbers.

The clients share the machine with the service when both run here (and the Python clients cost CPU of
their own): on a busy or small machine the numbers are a floor, not the service's capacity. Not part of
`make bench`.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _drive(
    url: str,
    questions: Sequence[str],
    clients: int,
    requests: int,
    top_k: int,
    timeout: float,
    offset: int = 0,
) -> tuple[list[float], dict[str, int], float]:
    """`requests` /search calls over `clients` threads → (latencies in s of the 200s, errors by kind, wall s)."""
    parts = urllib.parse.urlsplit(url)
    lock = threading.Lock()
    counter = iter(range(requests))
    latencies: list[float] = []
    errors: dict[str, int] = {}

    def error(kind: str) -> None:
        with lock:
            errors[kind] = errors.get(kind, 0) + 1

    def client() -> None:
        conn = None
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body = json.dumps({"question": questions[(offset + i) % len(questions)], "top_k": top_k})
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
                    conn.connect()
                    # http.client writes the headers and the body separately: TCP_NODELAY keeps the body from
                    # waiting for the server's (delayed) ACK of the headers on a kept-alive connection.
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.request("POST", "/search", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as e:
                if conn is not None:
                    conn.close()
                conn = None
                error(type(e).__name__)
                continue
            elapsed = time.perf_counter() - t0
            if resp.status == 200:
                with lock:
                    latencies.append(elapsed)
            else:
                error(f"http {resp.status}")
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def run_level(
    url: str,
    questions: Sequence[str],
    clients: int,
    requests: int,
    top_k: int,
    warmup: int = 0,
    timeout: float = 60.0,
) -> dict:
    """`warmup` untimed, then `requests` timed /search calls spread over `clients` threads."""
    if warmup:
        _drive(url, questions, clients, warmup, top_k, timeout)
    latencies, errors, wall = _drive(url, questions, clients, requests, top_k, timeout, offset=warmup)
    ms = [x * 1e3 for x in latencies]
    return {
        "clients": clients,
        "requests": requests,
        "ok": len(ms),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "qps": len(ms) / wall if wall > 0 else float("nan"),
        "p50_ms": _percentile(ms, 50),
        "p95_ms": _percentile(ms, 95),
        "p99_ms": _percentile(ms, 99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "wall_s": wall,
    }


def run_load(
    url: str,
    questions: Sequence[str],
    clients: Sequence[int],
    requests: int,
    top_k: int,
    warmup: int = 0,
    timeout: float = 60.0,
) -> list[dict]:
    return [run_level(url, questions, c, requests, top_k, warmup, timeout) for c in clients]


def table(rows: Sequence[dict]) -> str:
    lines = [
        "| clients | requests | errors | queries/s | p50 ms | p95 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['qps']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    return "\n".join(lines)


def _questions(args, cfg) -> list[str]:
    if args.questions:
        rows = [ln.strip() for ln in Path(args.questions).read_text(encoding="utf-8").splitlines()]
        return [q for q in rows if q]
    if cfg is not None:
        from data_prep.store import load_qa

        rows = load_qa(Path(cfg.run_dir) / "store", "all")
        if rows:
            return list(dict.fromkeys(r.question for r in rows))
    return [f"Which country has the capital number {i}?" for i in range(100)]


def main(argv=None) -> int:
    from configs.cli import build_parser, parse

    parser = build_parser("python -m bench.service_load", __doc__)
    parser.add_argument("--url", help="a running service (default: start one in this process from --config)")
    parser.add_argument("--clients", default="1,8,50", help="concurrent clients per level (comma list)")
    parser.add_argument("--requests", type=int, default=400, help="timed requests per level")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests before each level")
    parser.add_argument("--top-k", type=int, default=5, help="top_k of every request")
    parser.add_argument("--questions", help="a text file of questions, one a line (default: run_dir/store's)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    cfg, ns = parse(parser, argv)
    clients = [int(c) for c in ns.clients.split(",") if c.strip()]
    if not clients or min(clients) < 1 or ns.requests < 1:
        parser.error("--clients needs whole numbers >= 1 and --requests >= 1")
    questions = _questions(ns, None if ns.url else cfg)
    if ns.url:
        rows = run_load(ns.url, questions, clients, ns.requests, ns.top_k, ns.warmup)
    else:
        from retriever.search import Retriever
        from retriever.serve import create_app, serve_in_thread

        app = create_app(Retriever.from_config(cfg), cfg.serve)
        with serve_in_thread(app) as url:
            print(f"service started in this process at {url}", file=sys.stderr)
            rows = run_load(url, questions, clients, ns.requests, ns.top_k, ns.warmup)
    print(table(rows))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from configs.cli import run_main

    run_main(main)
