"""Records passed between modules: documents, QA examples and segments (docs/ARCHITECTURE.md "Formats")."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    """One corpus row: `{"id", "title", "text"}`."""

    id: str
    title: str
    text: str


@dataclass
class QAExample:
    """One QA row: `{"id", "question", "answers", "gold_doc_id"?}`; `title` is the split key of its article."""

    id: str
    question: str
    answers: list[str]
    gold_doc_id: str | None = None
    title: str | None = None
    gold_segment_ids: list[int] = field(default_factory=list)
    split: str | None = None
    relation: str | None = None  # question type (e.g. `person.birthplace`), for per-relation baselines


@dataclass
class Segment:
    """A window of a document: `text` is the document's characters [char_start, char_end)."""

    segment_id: int
    doc_id: str
    title: str
    text: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int
