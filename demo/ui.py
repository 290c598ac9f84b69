"""The Gradio page and API of the demo (see app.py for the command line).

Page: a question box, a mode selector and a top-k slider; the answer streams in while the retrieved
segments (scores, titles, the answer span highlighted) and a latency breakdown are shown; "Add
documents" pastes text or uploads .txt/.md/.jsonl files into the live index; "Reset" returns to the
built index.

API (gradio_client), all on the queue:
    /answer(question: str, mode: str, top_k: int) -> (answer: str, sources: list[dict])
        sources: [{"segment_id", "doc_id", "title", "score", "text"}], best first
    /add_text(text: str, title: str) -> str       (a message naming what was added)
    /reset() -> str
    /info() -> dict                               (LM, checkpoint, modes, index size, live documents)
Bad input raises `gr.Error` with the same message the page shows. The page's own events are private.
"""

# No `from __future__ import annotations` here: gr.api reads the endpoint functions' type hints with
# inspect.signature, which would see strings and mistake a tuple return for a single output.
import os

# Before gradio is imported: it reads the setting at import time. Analytics are off, whatever the caller set.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import functools  # noqa: E402
import html  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import gradio as gr  # noqa: E402

from common.errors import UserError  # noqa: E402
from demo.render import CSS, latency_markdown, md_code, sources_html  # noqa: E402
from demo.service import DemoService, source_dicts  # noqa: E402

log = logging.getLogger(__name__)
TITLE = "Retrieval-augmented dynamic-prefix QA"


def user_errors(fn: Callable) -> Callable:
    """Show a UserError as the page's error message (and the API's error), without a server traceback."""

    @functools.wraps(fn)  # keeps the signature and type hints that gr.api turns into the API schema
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(str(e), title="Cannot do that", print_exception=False) from e

    return call


def status_markdown(service: DemoService) -> str:
    s = service.status()
    live, titles = s["live_documents"], s["live_titles"]
    if live:
        names = [f"{html.escape(titles[d])} ({md_code(d)})" if d in titles else md_code(d) for d in live[:8]]
        live_text = f"{len(live)} added live: " + ", ".join(names) + (" …" if len(live) > 8 else "")
    else:
        live_text = "none added live"
    return (
        f"LM {md_code(s['lm'])} · retriever {md_code(s['retriever'])} · {html.escape(s['checkpoint'])}  \n"
        f"Index: **{s['segments']:,} segments** ({live_text}) · run_dir {md_code(s['run_dir'])}"
    )


def build_ui(service: DemoService) -> gr.Blocks:
    app = service.cfg.app

    def ask(question, mode, top_k) -> Iterator[tuple[str, str, str]]:
        try:
            for u in service.stream(question, mode, top_k):
                if not u.done:
                    note = "" if u.sources else f"{u.mode} reads no retrieved segments"
                    yield u.text, sources_html(u.sources, None, note), "*generating…*"
                else:
                    note = f"{u.mode} reads no retrieved segments"
                    shown = u.text if u.text else "(the model produced an empty answer)"
                    yield (
                        shown,
                        sources_html(u.sources, u.text, note),
                        latency_markdown(u.timings, u.prompt_tokens, u.prefix_slots),
                    )
        except UserError as e:
            raise gr.Error(str(e), title="Cannot answer", print_exception=False) from e

    def add(title, text, files):
        message, _ = service.add(text, title, [str(f) for f in files or []])
        # Clear the inputs once added, so that a second click does not add them twice.
        return message, status_markdown(service), "", "", None

    def reset():
        return service.reset(), status_markdown(service)

    def answer(question: str, mode: str, top_k: int) -> tuple[str, list[dict]]:
        """Answer a question in one mode with top_k retrieved segments; returns (answer, sources)."""
        final = service.answer(question, mode, top_k)
        return final.text, source_dicts(final.sources)

    def add_text(text: str, title: str = "") -> str:
        """Add a pasted document (title optional) to the live index; returns what was added."""
        return service.add_text(text, title)[0]

    def reset_index() -> str:
        """Forget every added document: back to the built index."""
        return service.reset()

    def info() -> dict:
        """The loaded LM, checkpoint, modes and index size."""
        return service.status()

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as blocks:
        gr.Markdown(
            f"## {TITLE}\nA frozen LM answers from retrieved segments: as text in its prompt "
            "(`rag_text`) or as per-layer key/value prefixes from the knowledge encoder "
            "(`dynamic_prefix`). Add a document and ask about it: it is searchable at once."
        )
        status = gr.Markdown(status_markdown(service), elem_id="status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                question = gr.Textbox(
                    label="Question",
                    lines=2,
                    max_length=service.cfg.lm.max_question_chars,
                    placeholder="Ask about the knowledge base…",
                    elem_id="question",
                )
                with gr.Row():
                    mode = gr.Radio(
                        service.modes, value=service.default_mode, label="Mode", elem_id="mode", scale=3
                    )
                    top_k = gr.Slider(
                        1,
                        app.max_top_k,
                        value=service.default_top_k,
                        step=1,
                        label="top-k",
                        elem_id="top-k",
                        scale=1,
                    )
                ask_btn = gr.Button("Ask", variant="primary", elem_id="ask")
                answer_box = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                latency = gr.Markdown(elem_id="latency")
                examples = service.example_questions()
                if examples:
                    gr.Examples(
                        [[q] for q in examples], inputs=[question], label="Questions from the test split"
                    )
            with gr.Column(scale=6):
                gr.Markdown("**Retrieved segments** (the answer is highlighted where it occurs)")
                sources = gr.HTML(
                    sources_html([], None, "Ask a question to see what the retriever finds."),
                    elem_id="sources",
                )
        with gr.Accordion("Add documents", open=False, elem_id="add-documents"):
            with gr.Row():
                with gr.Column(scale=3):
                    doc_title = gr.Textbox(
                        label="Title (optional; default: the first line)", elem_id="doc-title"
                    )
                    doc_text = gr.Textbox(
                        label="Text",
                        lines=5,
                        max_length=app.max_paste_chars,
                        placeholder="Paste a document…",
                        elem_id="doc-text",
                    )
                with gr.Column(scale=2):
                    files = gr.File(
                        label=f"Or upload .txt / .md / .jsonl (≤ {app.max_upload_mb:g} MB each; "
                        '.jsonl: {"id", "title", "text"} per line)',
                        file_count="multiple",
                        file_types=[".txt", ".md", ".jsonl"],
                        elem_id="doc-files",
                    )
            with gr.Row():
                add_btn = gr.Button("Add to index", variant="primary", elem_id="add")
                reset_btn = gr.Button("Reset to the built index", variant="stop", elem_id="reset")
            add_status = gr.Markdown(elem_id="add-status")

        ask_inputs, ask_outputs = [question, mode, top_k], [answer_box, sources, latency]
        # The page's events are private, with names that cannot take the public endpoints' names.
        for name, trigger in (("ui_ask", ask_btn.click), ("ui_ask_submit", question.submit)):
            trigger(
                ask, ask_inputs, ask_outputs, api_name=name, api_visibility="private", concurrency_id="qa"
            )
        add_btn.click(
            user_errors(add),
            [doc_title, doc_text, files],
            [add_status, status, doc_title, doc_text, files],
            api_name="ui_add",
            api_visibility="private",
            concurrency_id="index",
            concurrency_limit=1,
        )
        reset_btn.click(
            user_errors(reset),
            None,
            [add_status, status],
            api_name="ui_reset",
            api_visibility="private",
            concurrency_id="index",
            concurrency_limit=1,
        )
        blocks.load(
            lambda: status_markdown(service), None, status, api_name="ui_status", api_visibility="private"
        )

        gr.api(user_errors(answer), api_name="answer", concurrency_id="qa")
        gr.api(user_errors(add_text), api_name="add_text", concurrency_id="index", concurrency_limit=1)
        gr.api(user_errors(reset_index), api_name="reset", concurrency_id="index", concurrency_limit=1)
        gr.api(info, api_name="info", queue=False)
    return blocks


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now (tests and screenshots run the app beside other servers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(
    blocks: gr.Blocks, service: DemoService, *, port: int | None = None, block: bool = True, quiet=False
):
    """Queue with a concurrency limit, bind to app.host:app.port, no extra file access; returns the local URL."""
    app = service.cfg.app
    if app.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("app.host=%s: the demo is reachable from the network, without authentication", app.host)
    blocks.queue(default_concurrency_limit=app.concurrency_limit, max_size=app.queue_size)
    port = app.port if port is None else port
    try:
        _, url, _ = _launch(blocks, app, port, block, quiet)
    except OSError as e:  # the port is taken or the host is not an address of this machine
        raise UserError(
            f"cannot serve the demo on {app.host}:{port} ({e}); choose a free app.port (1-65535) "
            "or another app.host"
        ) from e
    return url


def _launch(blocks: gr.Blocks, app, port: int, block: bool, quiet: bool):
    return blocks.launch(
        server_name=app.host,
        server_port=port,
        max_file_size=int(app.max_upload_mb * 1024 * 1024),  # enforced by the upload route, in bytes
        allowed_paths=None,  # serve nothing from disk beyond gradio's own upload cache
        share=False,
        ssr_mode=False,
        mcp_server=False,
        show_error=False,  # unexpected exceptions stay in the server log; UserErrors are shown as gr.Error
        prevent_thread_lock=not block,
        quiet=quiet,
        theme=gr.themes.Default(),
        css=CSS,
        footer_links=["api"],
    )
