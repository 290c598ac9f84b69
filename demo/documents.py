"""Documents a user adds to the live index: pasted text, or uploaded .txt / .md / .jsonl files.

Everything here runs on the server, whatever the browser claims: the file name's extension decides the
format (.txt / .md: one document per file; .jsonl: the corpus format `{"id", "title", "text"}`, one
document a line), sizes and counts are checked against the `app.*` limits, and a malformed upload is
refused whole, naming every bad line (file:line), so that nothing is half added.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.text import first_control_char
from data_prep.loaders import LoadStats, iter_jsonl
from data_prep.records import Document

SUFFIXES = (".txt", ".md", ".jsonl")
MAX_REPORTED = 8  # bad lines listed in one message; the rest are counted
TITLE_CHARS = 80


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_files: int
    max_paste_chars: int
    max_title_chars: int = 300

    @classmethod
    def from_app_config(cls, app) -> Limits:
        return cls(
            int(app.max_upload_mb * 1024 * 1024), app.max_upload_files, app.max_paste_chars, app.max_title_chars
        )


def check_text(value: str, what: str) -> None:
    """Refuse control characters other than tab, newline and carriage return in a document's text or title."""
    at = first_control_char(value)
    if at is not None:
        line = value.count("\n", 0, at) + 1
        raise UserError(
            f"{what} contains the control character U+{ord(value[at]):04X} (line {line}, character "
            f"{at + 1}); only text is accepted (tabs and newlines are fine): remove it, or save the "
            "document as plain UTF-8 text"
        )


def check_title(title: str, what: str, limits: Limits) -> None:
    if len(title) > limits.max_title_chars:
        raise UserError(
            f"{what} has {len(title):,} characters; the limit is {limits.max_title_chars:,} "
            "(app.max_title_chars): give a shorter title"
        )
    check_text(title, what)


def _digest(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode("utf-8")).hexdigest()[:12]


def _title_from_text(text: str) -> str:
    """The first non-empty line (Markdown `#` marks dropped), cut at a word boundary."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.lstrip("#").strip() or line
    if len(line) <= TITLE_CHARS:
        return line
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0]
    return (cut or line[:TITLE_CHARS]) + "…"


def pasted_document(text: str | None, title: str | None, limits: Limits) -> Document:
    """A pasted text as one Document; its id is a hash of title + text, so pasting it twice is refused."""
    if text is not None and not isinstance(text, str):
        raise UserError("the document must be text")
    text = (text or "").strip()
    if not text:
        raise UserError("nothing to add: paste some text into the document box")
    if len(text) > limits.max_paste_chars:
        raise UserError(
            f"the pasted text has {len(text):,} characters; the limit is {limits.max_paste_chars:,} "
            "(app.max_paste_chars): split it or upload it as a file"
        )
    check_text(text, "the pasted text")
    if title is not None and not isinstance(title, str):
        raise UserError("the title must be text")
    check_text(title or "", "the title")  # before split(), which takes some control characters for spaces
    title = " ".join((title or "").split())
    check_title(title, "the title", limits)
    title = title or _title_from_text(text)
    return Document(id=f"pasted-{_digest(title, text)}", title=title, text=text)


def _size(n: int) -> str:
    """Bytes as the limit is given (MiB), in KiB below one: `0.0 MB` said nothing about a 20 KB file."""
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.1f} KB"


def _check_file(path: str, limits: Limits) -> tuple[Path, str]:
    p = Path(path)
    name = p.name
    if p.suffix.lower() not in SUFFIXES:
        raise UserError(f"{name}: unsupported file type; upload {', '.join(SUFFIXES)} files")
    try:
        size = os.path.getsize(p)
    except OSError as e:
        raise UserError(f"{name}: the upload could not be read ({e.strerror})") from e
    if size > limits.max_upload_bytes:
        raise UserError(
            f"{name}: {_size(size)} is over the upload limit of {_size(limits.max_upload_bytes)} "
            f"(app.max_upload_mb={limits.max_upload_bytes / (1024 * 1024):.3g})"
        )
    if size == 0:
        raise UserError(f"{name}: the file is empty")
    return p, name


def _text_document(path: Path, name: str, limits: Limits) -> Document:
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not UTF-8 text (invalid byte at offset {e.start}); save it as UTF-8") from e
    if not text:
        raise UserError(f"{name}: the file has no text")
    check_text(text, name)
    title = _title_from_text(text) if path.suffix.lower() == ".md" else ""
    title = title or path.stem.replace("_", " ").strip() or name
    check_title(title, f"{name}: the title", limits)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", path.stem).strip("-")[:40] or "file"
    return Document(id=f"upload-{slug}-{_digest(title, text)}", title=title, text=text)


def _doc_id(value) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _text_problem(text: str, title: str | None, limits: Limits) -> str | None:
    try:
        check_text(text, '"text"')
        check_title((title or "").strip(), '"title"', limits)
    except UserError as e:
        return str(e)
    return None


def _jsonl_documents(path: Path, name: str, limits: Limits) -> list[Document]:
    """Every line of a corpus-format JSONL file; raises one UserError listing all bad lines."""
    problems: list[str] = []

    def bad(where: str, reason: str) -> None:
        problems.append(f"{where}: {reason}")

    docs: list[Document] = []
    first_line: dict[str, str] = {}
    for where, obj in iter_jsonl(path, bad, LoadStats()):
        doc_id = _doc_id(obj.get("id"))
        text, title = obj.get("text"), obj.get("title", "")
        if doc_id is None:
            bad(where, 'missing or empty "id" (a string)')
        elif not isinstance(text, str) or not text.strip():
            bad(where, f'document {doc_id!r}: "text" must be a non-empty string')
        elif title is not None and not isinstance(title, str):
            bad(where, f'document {doc_id!r}: "title" must be a string')
        elif (problem := _text_problem(text, title, limits)) is not None:
            bad(where, f"document {doc_id!r}: {problem}")
        elif doc_id in first_line:
            bad(where, f"duplicate document id {doc_id!r} (first at line {first_line[doc_id]})")
        else:
            first_line[doc_id] = where.rsplit(":", 1)[-1]
            docs.append(Document(id=doc_id, title=(title or "").strip() or doc_id, text=text.strip()))
    if problems:
        # iter_jsonl names the uploaded temp file; the user knows the file by its own name.
        lines = [p.replace(str(path), name, 1) for p in problems]
        more = f"\n… and {len(lines) - MAX_REPORTED} more" if len(lines) > MAX_REPORTED else ""
        raise UserError(
            f"{name}: {len(lines)} malformed line(s); nothing was added. Each line must be a JSON object "
            '{"id": str, "title": str, "text": str}:\n' + "\n".join(lines[:MAX_REPORTED]) + more
        )
    if not docs:
        raise UserError(f"{name}: no documents in the file")
    return docs


def uploaded_documents(paths: Sequence[str], limits: Limits) -> list[Document]:
    """Documents of the uploaded files (paths given by the server's upload handling)."""
    paths = [p for p in paths if p]
    if not paths:
        raise UserError("no file uploaded")
    if len(paths) > limits.max_files:
        raise UserError(
            f"{len(paths)} files in one upload; the limit is {limits.max_files} (app.max_upload_files)"
        )
    checked = [_check_file(p, limits) for p in paths]  # all checks before any parsing
    docs: list[Document] = []
    for path, name in checked:
        if path.suffix.lower() == ".jsonl":
            docs.extend(_jsonl_documents(path, name, limits))
        else:
            docs.append(_text_document(path, name, limits))
    return docs
