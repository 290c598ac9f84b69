"""Load check of the demo's `/answer` endpoint: answers/s and latency percentiles with 1, 8 and 50 clients.

    python -m bench.demo_load --url http://127.0.0.1:7860 [--clients 1,8,50] [--requests 40] [--mode rag_text]
    python -m bench.demo_load --config C [key=value ...]   # serves the demo in this process first (127.0.0.1)

A call is what `gradio_client`'s `predict(question, mode, top_k, api_name="/answer")` does over HTTP:
`POST /gradio_api/call/answer`, then the event stream of its result, read to its end; it succeeded when the
stream ends with `event: complete` (an `event: error`, e.g. the demo refusing a request or its queue
`app.queue_size` being full, is an error of kind "gradio error"). Questions of run_dir/store cycled (or
`--questions FILE`). The clients and their machinery are bench/load.py's, shared with bench.service_load;
the report is the same table (answers/s instead of queries/s). `--json FILE` writes the numbers.

The demo answers one question at a time (one generation at a time, demo/service.py), so with more clients
the latency grows by the queue and answers/s stays that of one; the numbers show how it degrades (p95, errors),
not a capacity. With the clients in the same process and on the same CPU, they are a floor. Not part of
`make bench`.
"""

from __future__ import annotations

import http.client
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.load import Call, add_load_arguments, load_plan, run_level, table

ENDPOINT = "/gradio_api/call/answer"


def answer_call(questions: Sequence[str], mode: str, top_k: int) -> Call:
    """One /answer call of question i (cycled): the POST that queues it, then its event stream to the end."""

    def call(conn: http.client.HTTPConnection, i: int) -> str | None:
        body = json.dumps({"data": [questions[i % len(questions)], mode, top_k]})
        conn.request("POST", ENDPOINT, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            return f"http {resp.status}"
        event_id = json.loads(raw)["event_id"]
        conn.request("GET", f"{ENDPOINT}/{event_id}")
        resp = conn.getresponse()
        stream = resp.read().decode("utf-8", "replace")
        if resp.status != 200:
            return f"http {resp.status}"
        if "event: complete" in stream:
            return None
        return "gradio error" if "event: error" in stream else "no result"

    return call


def run_load(url: str, questions: Sequence[str], clients: Sequence[int], requests: int, mode: str,
             top_k: int, warmup: int = 0, timeout: float = 300.0) -> list[dict]:
    call = answer_call(questions, mode, top_k)
    return [run_level(url, call, c, requests, warmup, timeout) for c in clients]


def main(argv=None) -> int:
    from configs.cli import build_parser, parse

    parser = build_parser("python -m bench.demo_load", __doc__)
    add_load_arguments(parser, "demo", requests=40, warmup=2, top_k=1)
    parser.add_argument("--mode", default="rag_text", help="the mode of every request (a system the demo serves)")
    cfg, ns = parse(parser, argv)
    clients, questions = load_plan(parser, ns, cfg.run_dir)
    if ns.url:
        rows = run_load(ns.url, questions, clients, ns.requests, ns.mode, ns.top_k, ns.warmup)
    else:
        from demo.service import DemoService
        from demo.ui import build_ui, free_port, launch

        service = DemoService.from_config(cfg)
        blocks = build_ui(service)
        url = launch(blocks, service, port=free_port(), block=False, quiet=True)
        print(f"demo served in this process at {url}", file=sys.stderr)
        try:
            rows = run_load(url, questions, clients, ns.requests, ns.mode, ns.top_k, ns.warmup)
        finally:
            blocks.close()
    print(table(rows, per="answers/s"))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from configs.cli import run_main

    run_main(main)
