"""The Gradio demo: `python app.py --config C [key=value ...]`.

Ask a question and watch the answer stream in, with the retrieved segments (scores, titles, the answer
highlighted) and a latency breakdown (retrieve / encode / generate); switch the mode (closed_book,
rag_text, dynamic_prefix, combine, and every other system of the checkpoint) and top-k to compare.
"Add documents" pastes text or uploads .txt/.md/.jsonl files into the live index (kept in
run_dir/live/ across restarts, answerable at once); "Reset" returns to the built index.

Needs `run_dir/store` and `run_dir/index` (python -m data_prep.build, python -m retriever.index) and,
for the trained modes, a checkpoint (qa.checkpoint, default run_dir/checkpoints/final); with
retriever.service_url=http://HOST:PORT it searches, and adds documents, through a running
`python -m retriever.serve` instead of opening the index itself. Binds to
app.host:app.port (127.0.0.1:7860; app.host=0.0.0.0 exposes it to the network, without
authentication). Scripts call it with gradio_client:

    from gradio_client import Client
    answer, sources = Client("http://127.0.0.1:7860/").predict(
        "Who founded Velmora Works?", "dynamic_prefix", 3, api_name="/answer")
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before anything imports gradio
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from configs.cli import build_parser, parse, run_main  # noqa: E402


def main(argv=None) -> int:
    parser = build_parser("python app.py", __doc__)
    cfg, ns = parse(parser, argv)
    from demo.service import DemoService
    from demo.ui import build_ui, launch

    service = DemoService.from_config(cfg)
    launch(build_ui(service), service)
    return 0


if __name__ == "__main__":
    run_main(main)
