"""Load check of the retrieval service: queries/s and latency percentiles with 1, 8 and 50 concurrent clients.

    python -m bench.service_load --url http://127.0.0.1:8765 [--clients 1,8,50] [--requests 400]
    python -m bench.service_load --config C [key=value ...]      # starts the service in this process first

Each client is a thread with its own keep-alive HTTP connection sending `POST /search` requests
(`--top-k`, questions of run_dir/store cycled, or `--questions FILE`, one a line) back to back until the
level's `--requests` are done; `--warmup` requests per level are not timed. Reported per level: requests,
errors (non-200 answers and failed connections, counted, never retried), queries/s over the level's wall
time, p50/p95/p99 latency in ms. `--json FILE` writes the same numbers with the command and machine
(bench/service_load.json is shown in bench/RESULTS.md).

The clients share the machine with the service when both run here (and the Python clients cost CPU of
their own): on a busy or small machine the numbers are a floor, not the service's capacity. Not part of
`make bench`.
"""

from __future__ import annotations

import http.client
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.load import Call, add_load_arguments, load_plan, run_level, table
from bench.separate import provenance


def search_call(questions: Sequence[str], top_k: int) -> Call:
    """One `POST /search` of question i (cycled) with `top_k`: ok on a 200."""

    def call(conn: http.client.HTTPConnection, i: int) -> str | None:
        body = json.dumps({"question": questions[i % len(questions)], "top_k": top_k})
        conn.request("POST", "/search", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return None if resp.status == 200 else f"http {resp.status}"

    return call


def run_load(
    url: str,
    questions: Sequence[str],
    clients: Sequence[int],
    requests: int,
    top_k: int,
    warmup: int = 0,
    timeout: float = 60.0,
) -> list[dict]:
    call = search_call(questions, top_k)
    return [run_level(url, call, c, requests, warmup, timeout) for c in clients]


def main(argv=None) -> int:
    from configs.cli import build_parser, parse

    parser = build_parser("python -m bench.service_load", __doc__)
    add_load_arguments(parser, "service", requests=400, warmup=20, top_k=5)
    cfg, ns = parse(parser, argv)
    started = provenance("bench.service_load", sys.argv[1:] if argv is None else argv)
    clients, questions = load_plan(parser, ns, cfg.run_dir)
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
        report = {**started, "rows": rows}
        Path(ns.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from configs.cli import run_main

    run_main(main)
