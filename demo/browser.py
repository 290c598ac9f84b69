"""Drive the demo page in Debian's headless Chromium (playwright, never a browser of its own).

Used by tests/test_app_browser.py and by `python -m demo.screenshot` (the README's docs/demo.png).
Playwright only talks to the given Chromium binary (`CHROMIUM` env var, else `chromium` on PATH); it
starts with a fresh profile and without Chromium's background network traffic.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlparse

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


def chromium_path() -> str | None:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.access(path, os.X_OK) else None


@dataclass
class PageResult:
    """What the page shows after a question has been answered."""

    answer: str
    source_titles: list[str]
    source_ids: list[int]
    latency: str
    outside_requests: list[str] = field(default_factory=list)  # URLs the page asked for beyond this machine
    highlights: list[str] = field(default_factory=list)  # the <mark>ed answer occurrences in the source cards


@contextmanager
def open_page(width: int = 1400, height: int = 1000) -> Iterator:
    """A playwright page in headless Chromium; the set `page.requests` collects every URL it requests."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if path is None:
        raise RuntimeError(
            "Chromium not found: install Debian's `chromium` (or set CHROMIUM=/path/to/chromium)"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.requests = []
            page.on("request", lambda request: page.requests.append(request.url))
            yield page
        finally:
            browser.close()


def outside(urls: list[str]) -> list[str]:
    """The URLs that leave this machine (data:, blob: and loopback URLs do not)."""
    out = []
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https", "ws", "wss") and parsed.hostname not in LOCAL_HOSTS:
            out.append(url)
    return out


def ask(
    page, question: str, mode: str | None = None, top_k: int | None = None, timeout_s: float = 180
) -> PageResult:
    """Type a question into the loaded page, pick mode and top-k, click Ask, wait for the final answer."""
    timeout = timeout_s * 1000
    page.locator("#question textarea").fill(question)
    if mode is not None:
        page.locator("#mode label").filter(has_text=mode).first.click()
    if top_k is not None:
        number = page.locator('#top-k input[type="number"]')
        number.fill(str(top_k))
        number.press("Enter")
    page.locator("#latency").evaluate("el => { el.dataset.before = el.innerText; }")
    page.locator("#ask").click()
    # The latency table (its "total" column) is written with the final answer only.
    page.wait_for_function(
        "() => { const el = document.querySelector('#latency');"
        " return el && el.innerText.includes('total') && el.innerText !== el.dataset.before; }",
        timeout=timeout,
    )
    cards = page.locator("#sources [data-segment-id]")
    return PageResult(
        answer=page.locator("#answer textarea").input_value(),
        source_titles=[t.strip() for t in page.locator("#sources .source-title").all_inner_texts()],
        source_ids=[int(cards.nth(i).get_attribute("data-segment-id")) for i in range(cards.count())],
        latency=page.locator("#latency").inner_text(),
        outside_requests=outside(page.requests),
        highlights=[t.strip() for t in page.locator("#sources mark").all_inner_texts()],
    )
