"""The demo page in headless Chromium: ask a question, see the streamed answer and the sources render;
add a document through the page; a malformed upload shows its bad lines. Saves a screenshot.

Uses Debian's `chromium` (which .ci/run installs) through playwright. It skips only when Chromium or
playwright is missing outside CI; in CI (CI=true) a missing browser is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from demo.browser import ask, chromium_path, open_page
from tests.test_app import EXTRA, build_tiny_demo, free_port

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require_browser() -> None:
    missing = None
    if chromium_path() is None:
        missing = "Debian's chromium is not installed (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is not installed (pip install -r requirements.txt)"
    if missing:
        if IN_CI:
            pytest.fail(f"{missing}; .ci/run installs it")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def page_app(tmp_path_factory):
    _require_browser()
    import torch

    from configs.loader import load_config
    from demo.service import DemoService
    from demo.ui import build_ui, launch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("browser")
    cfg = load_config(None, build_tiny_demo(root))
    service = DemoService.from_config(cfg)
    blocks = build_ui(service)
    url = launch(blocks, service, port=free_port(), block=False, quiet=True)
    yield url, service
    blocks.close()
    service.retriever.reset()


def test_page_asks_streams_and_shows_sources(page_app, tmp_path):
    url, service = page_app
    question = "Who leads " + service.retriever.store.get(5).title + "?"
    expected = service.answer(question, "rag_text", 3)
    with open_page() as page:
        page.goto(url, wait_until="networkidle")
        assert "Retrieval-augmented dynamic-prefix QA" in page.title()
        result = ask(page, question, mode="rag_text", top_k=3)
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
    assert result.answer == expected.text and result.answer  # greedy: the page shows what the API returns
    assert result.source_ids == [h.segment_id for h in expected.sources] and len(result.source_ids) == 3
    assert result.source_titles == [h.title for h in expected.sources]
    assert "retrieve" in result.latency and "generate" in result.latency and "total" in result.latency
    assert result.outside_requests == []  # no analytics, fonts or CDNs: the page only talks to the app
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_page_adds_a_document_and_reports_bad_uploads(page_app, tmp_path):
    url, service = page_app
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "title": "t", "text": "fine"}\n{oops\n', encoding="utf-8")
    with open_page() as page:
        page.goto(url, wait_until="networkidle")
        page.get_by_text("Add documents").first.click()
        page.locator("#doc-title textarea, #doc-title input").first.fill("Quorn")
        page.locator("#doc-text textarea").fill(EXTRA)
        page.locator("#add").click()
        page.wait_for_function(
            "() => document.querySelector('#add-status')?.innerText.includes('Added 1 document')",
            timeout=60_000,
        )
        assert "1 added live: Quorn" in page.locator("#status").inner_text()  # the status names it
        result = ask(page, "Quorn\n" + EXTRA, mode="dynamic_prefix", top_k=2)
        assert result.source_titles[0] == "Quorn"  # added, embedded and searched at once
        page.locator("#doc-files input[type=file]").set_input_files(str(bad))
        page.locator("#add").click()
        page.get_by_text("bad.jsonl:2").first.wait_for(timeout=60_000)  # the error names file and line
    assert service.status()["live_documents"] and len(service.status()["live_documents"]) == 1


@pytest.mark.slow
def test_real_question_typed_into_the_page_is_answered_by_the_shipped_model(tmp_path):
    """The real-text demo end to end: Wikipedia paragraphs packaged in the repo, MiniLM + BM25, the shipped
    model (no checkpoint given, nothing trained), a held-out SQuAD question typed into the page in headless
    Chromium: the answer is right and the source card highlights it."""
    _require_browser()
    import json

    import torch

    from configs.loader import load_config
    from data_prep.build import build_store
    from demo.service import DemoService
    from demo.ui import build_ui, launch
    from retriever.index import build_index

    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    data = root / "data" / "squad-du-train"
    articles = {"Frédéric_Chopin", "Portugal", "Buddhism"}  # the answer's article among two long distractors
    rows = [json.loads(line) for line in (data / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows if r["title"] in articles), encoding="utf-8")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(
            line + "\n"
            for line in (data / "qa.jsonl").read_text(encoding="utf-8").splitlines()
            if json.loads(line)["gold_doc_id"].rsplit("_", 1)[0] in articles
        ),
        encoding="utf-8",
    )
    cfg = load_config(
        root / "configs" / "demo.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.corpus={corpus}",
            f"data.qa={qa}",
            "index.factory=Flat",
            "device=cpu",
        ],
    )
    build_store(cfg, progress=False)
    build_index(cfg, progress=False)
    service = DemoService.from_config(cfg)
    assert "models/smollm2-135m-squad" in service.checkpoint_note  # the shipped model, found by default
    blocks = build_ui(service)
    url = launch(blocks, service, port=free_port(), block=False, quiet=True)
    try:
        with open_page() as page:
            page.goto(url, wait_until="networkidle")
            # A question of a held-out test article (data.split, seed 0): the shipped model never trained on it.
            result = ask(page, "What was Frédéric's nationalities?", mode="dynamic_prefix@pfull", top_k=1)
    finally:
        blocks.close()
    assert result.source_titles == ["Frédéric_Chopin"]
    assert result.answer == "Polish and French"
    assert result.highlights == ["Polish and French"]  # the source shows where the answer stands
    assert result.outside_requests == []
