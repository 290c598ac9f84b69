"""The demo's add-document path in a process of its own, for tests/test_fault_suite.py to kill.

    python -m tests.fault_demo_add KEY=VALUE ... --doc "TITLE::TEXT" [--doc ...]

Opens `DemoService` as `app.py` does (replaying run_dir/live), then adds each document with
`DemoService.add_text`, the path of the app's "Add documents" and of its /add_text endpoint, skipping one
that is live already (a client retrying after the server died finds it there), and prints the live
document ids as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from configs.loader import load_config
from demo.documents import pasted_document
from demo.service import DemoService


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_demo_add")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--doc", action="append", default=[], help="TITLE::TEXT")
    ns = parser.parse_args(argv)
    service = DemoService.from_config(load_config(None, ns.overrides))
    for spec in ns.doc:
        title, text = spec.split("::", 1)
        if pasted_document(text, title, service.limits).id not in service.retriever.live_documents:
            service.add_text(text, title)
    print(json.dumps(service.retriever.live_documents))
    return 0


if __name__ == "__main__":
    sys.exit(main())
