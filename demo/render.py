"""HTML / Markdown for the demo page: retrieved segments with the answer span highlighted, latency.

Every piece of user or corpus text goes through `html.escape` (pasted documents are untrusted input).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

_EDGE_PUNCT = " \t\n.,;:!?\"'()[]{}«»“”‘’"


def answer_pattern(answer: str | None) -> re.Pattern | None:
    """A case-insensitive pattern of the answer, any whitespace between its words; None if too short."""
    words = (answer or "").strip(_EDGE_PUNCT).split()
    if not words or sum(len(w) for w in words) < 2 or not any(ch.isalnum() for w in words for ch in w):
        return None
    body = r"\s+".join(re.escape(w) for w in words)
    # Word boundaries only where the answer starts/ends with a word character ("Zib" is not in "Zibra").
    start = r"\b" if re.match(r"\w", words[0]) else ""
    end = r"\b" if re.search(r"\w$", words[-1]) else ""
    return re.compile(start + body + end, re.IGNORECASE)


def highlight_spans(text: str, answer: str | None) -> list[tuple[int, int]]:
    """(start, end) character spans where the answer occurs in `text`."""
    pattern = answer_pattern(answer)
    return [] if pattern is None else [m.span() for m in pattern.finditer(text)]


def highlighted_html(text: str, answer: str | None) -> str:
    """`text` escaped, with every occurrence of the answer in <mark>."""
    out, last = [], 0
    for start, end in highlight_spans(text, answer):
        out += [html.escape(text[last:start]), "<mark>", html.escape(text[start:end]), "</mark>"]
        last = end
    out.append(html.escape(text[last:]))
    return "".join(out)


def sources_html(hits: Sequence, answer: str | None = None, note: str = "") -> str:
    """One card per retrieved segment (rank, score, title, ids, text with the answer highlighted)."""
    if not hits:
        return f'<div class="sources-empty">{html.escape(note or "No segments retrieved.")}</div>'
    cards = []
    for rank, h in enumerate(hits, 1):
        found = bool(highlight_spans(h.text, answer) or highlight_spans(h.title, answer))
        cards.append(
            f'<div class="source{" source-answer" if found else ""}" data-segment-id="{int(h.segment_id)}">'
            f'<div class="source-head"><span class="source-rank">#{rank}</span> '
            f'<span class="source-title">{highlighted_html(h.title, answer)}</span> '
            f'<span class="source-score">score {h.score:.3f}</span></div>'
            f'<div class="source-meta">segment {int(h.segment_id)} · document {html.escape(str(h.doc_id))}</div>'
            f'<div class="source-text">{highlighted_html(h.text, answer)}</div></div>'
        )
    return f'<div class="sources">{"".join(cards)}</div>'


def latency_markdown(timings: dict[str, float], prompt_tokens: int = 0, prefix_slots: int = 0) -> str:
    """One table row: retrieve / encode / generate / total in milliseconds, prompt and prefix sizes."""
    r, e, g = (timings.get(k, 0.0) for k in ("retrieve_ms", "encode_ms", "generate_ms"))
    prefix = f"{prefix_slots} slots" if prefix_slots else "none"
    return (
        "| retrieve | encode | generate | total | prompt | prefix |\n|---:|---:|---:|---:|---:|---:|\n"
        f"| {r:.0f} ms | {e:.0f} ms | {g:.0f} ms | **{r + e + g:.0f} ms** | {prompt_tokens} tokens | {prefix} |"
    )


def md_code(value: object) -> str:
    """`value` as a Markdown code span that nothing in it can break out of."""
    return "`" + str(value).replace("`", "'").replace("\n", " ") + "`"


CSS = """
.sources { display: flex; flex-direction: column; gap: 8px; }
.source { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px; }
.source-answer { border-color: #d97706; }
.source-head { font-weight: 600; }
.source-rank, .source-score, .source-meta { color: var(--body-text-color-subdued); font-size: 0.85em; }
.source-score { float: right; font-weight: 400; }
.source-text { white-space: pre-wrap; margin-top: 4px; font-size: 0.92em; max-height: 14em; overflow-y: auto; }
.source mark { background: #fde68a; color: #111; padding: 0 2px; border-radius: 3px; }
.sources-empty { color: var(--body-text-color-subdued); }
"""
