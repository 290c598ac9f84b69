"""Client side of the load checks (bench.service_load, bench.demo_load): N concurrent clients, latency
percentiles, requests/s and errors per level of concurrency.

Each client is a thread with its own keep-alive HTTP connection making calls back to back until the level's
`requests` are done; a call is whatever `call(conn, i)` does on that connection for request number i (one
POST for the retrieval service, a POST and its event stream for a Gradio endpoint) and returns None when it
succeeded or the kind of error (counted, never retried). `warmup` calls per level are not timed.
"""

from __future__ import annotations

import http.client
import socket
import statistics
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

# One call on a kept-alive connection: None when it succeeded, else the kind of error (e.g. "http 422").
Call = Callable[[http.client.HTTPConnection, int], str | None]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def connect(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    conn.connect()
    # http.client writes the headers and the body separately: TCP_NODELAY keeps the body from waiting for
    # the server's (delayed) ACK of the headers on a kept-alive connection.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def drive(
    url: str, call: Call, clients: int, requests: int, timeout: float, offset: int = 0
) -> tuple[list[float], dict[str, int], float]:
    """`requests` calls over `clients` threads → (latencies in s of the calls that succeeded, errors by kind,
    wall s)."""
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
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = connect(url, timeout)
                failed = call(conn, offset + i)
            except (OSError, http.client.HTTPException) as e:
                if conn is not None:
                    conn.close()
                conn = None
                error(type(e).__name__)
                continue
            elapsed = time.perf_counter() - t0
            if failed is None:
                with lock:
                    latencies.append(elapsed)
            else:
                error(failed)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def run_level(url: str, call: Call, clients: int, requests: int, warmup: int = 0, timeout: float = 60.0) -> dict:
    """`warmup` untimed, then `requests` timed calls spread over `clients` threads."""
    if warmup:
        drive(url, call, clients, warmup, timeout)
    latencies, errors, wall = drive(url, call, clients, requests, timeout, offset=warmup)
    ms = [x * 1e3 for x in latencies]
    return {
        "clients": clients,
        "requests": requests,
        "ok": len(ms),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "qps": len(ms) / wall if wall > 0 else float("nan"),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "wall_s": wall,
    }


def table(rows: Sequence[dict], per: str = "queries/s") -> str:
    lines = [
        f"| clients | requests | errors | {per} | p50 ms | p95 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['qps']:.2f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    return "\n".join(lines)


def questions_of(path: str | None, run_dir: str | Path | None) -> list[str]:
    """Questions of a text file (one a line), else of run_dir/store (every split), else made-up ones."""
    if path:
        rows = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
        return [q for q in rows if q]
    if run_dir is not None:
        from data_prep.store import load_qa

        rows = load_qa(Path(run_dir) / "store", "all")
        if rows:
            return list(dict.fromkeys(r.question for r in rows))
    return [f"Which country has the capital number {i}?" for i in range(100)]


def parse_levels(spec: str, requests: int) -> list[int]:
    """`--clients 1,8,50` → [1, 8, 50]; ValueError for anything but whole numbers >= 1 (and requests >= 1)."""
    clients = [int(c) for c in spec.split(",") if c.strip()]
    if not clients or min(clients) < 1 or requests < 1:
        raise ValueError("--clients needs whole numbers >= 1 and --requests >= 1")
    return clients


def add_load_arguments(parser, target: str, requests: int, warmup: int, top_k: int) -> None:
    """The command-line options every load check shares (`target`: what --url points at)."""
    parser.add_argument("--url", help=f"a running {target} (default: start one in this process from --config)")
    parser.add_argument("--clients", default="1,8,50", help="concurrent clients per level (comma list)")
    parser.add_argument("--requests", type=int, default=requests, help="timed requests per level")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed requests before each level")
    parser.add_argument("--top-k", type=int, default=top_k, help="top_k of every request")
    parser.add_argument("--questions", help="a text file of questions, one a line (default: run_dir/store's)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")


def load_plan(parser, ns, run_dir) -> tuple[list[int], list[str]]:
    """(client levels, questions) from the shared options; a bad level list is a usage error."""
    try:
        clients = parse_levels(ns.clients, ns.requests)
    except ValueError as e:
        parser.error(str(e))
    return clients, questions_of(ns.questions, None if ns.url else run_dir)
