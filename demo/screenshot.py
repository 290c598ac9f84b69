"""A screenshot of the running demo (the README's docs/demo.png).

    python -m demo.screenshot --config configs/default.yaml [--question Q] [--mode M] [--top-k K]
                              [--out docs/demo.png] [key=value ...]

Starts the app on a free local port, opens it in Debian's headless Chromium (demo.browser), asks a
question through the page and saves a PNG of the whole page. Without --question it goes through the
first --tries questions of the store's `data.split` (the held-out test split) and keeps the first one
the mode answers exactly right, and says how many it tried: the picture shows the demo at work, the
accuracy is measured by `python -m eval.run`.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from pathlib import Path  # noqa: E402

from common.errors import UserError  # noqa: E402
from configs.cli import build_parser, parse, run_main  # noqa: E402


def pick_question(service, mode: str, top_k: int, tries: int) -> tuple[str, str]:
    """(question, note): the first of `tries` split questions answered exactly right, else the first."""
    from common.answers import exact_match
    from data_prep.store import load_qa

    examples = load_qa(Path(service.cfg.run_dir) / "store", service.cfg.data.split)[:tries]
    if not examples:
        raise UserError(
            f"no {service.cfg.data.split} questions in {service.cfg.run_dir}/store; pass --question"
        )
    for n, ex in enumerate(examples, 1):
        answer = service.answer(ex.question, mode, top_k).text
        if any(exact_match(answer, gold) for gold in ex.answers):
            return ex.question, f"the first exactly right of {n} {service.cfg.data.split} question(s) tried"
    return examples[
        0
    ].question, f"none of the first {len(examples)} answered exactly right; showing the first"


def main(argv=None) -> int:
    parser = build_parser("python -m demo.screenshot", __doc__)
    parser.add_argument("--question", help="question to ask (default: picked from the test split)")
    parser.add_argument("--mode", help="mode to show (default: qa.mode when served)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k (default: retriever.top_k)")
    parser.add_argument("--out", default="docs/demo.png", help="PNG file to write")
    parser.add_argument("--tries", type=int, default=20, help="questions tried when picking one")
    parser.add_argument("--width", type=int, default=1400, help="browser window width in pixels")
    cfg, ns = parse(parser, argv)
    from common.atomic import atomic_write_bytes
    from demo.browser import ask, chromium_path, open_page
    from demo.service import DemoService
    from demo.ui import build_ui, free_port, launch

    if chromium_path() is None:
        raise UserError("Chromium not found: `apt-get install chromium` (or set CHROMIUM=/path/to/chromium)")
    service = DemoService.from_config(cfg)
    mode = ns.mode or service.default_mode
    question, mode, top_k = service.check_request(ns.question or "?", mode, ns.top_k)
    note = "given on the command line"
    if not ns.question:
        question, note = pick_question(service, mode, top_k, ns.tries)
    blocks = build_ui(service)
    url = launch(blocks, service, port=free_port(), block=False, quiet=True)
    try:
        with open_page(ns.width, 1000) as page:
            page.goto(url, wait_until="networkidle")
            result = ask(page, question, mode=mode, top_k=top_k)
            png = page.screenshot(full_page=True)
    finally:
        blocks.close()
    atomic_write_bytes(Path(ns.out), png)
    print(f"{ns.out}: {mode}, top-{top_k}: {question!r} -> {result.answer!r} ({note})")
    print(f"sources: {result.source_titles}; latency: {' '.join(result.latency.split())}")
    if result.outside_requests:
        print(f"warning: the page requested {len(result.outside_requests)} URL(s) outside this machine")
    return 0


if __name__ == "__main__":
    run_main(main)
