"""Corpus and QA loaders: `data.corpus` / `data.qa` specs → documents and QA examples.

Specs (`parse_source`):

- `path.jsonl`: corpus rows `{"id", "title", "text"}`; QA rows `{"id", "question", "answers",
  "gold_doc_id"?, "title"?, "relation"?}` (a QA row needs gold_doc_id or title: the split is by article).
- `path.json` (SQuAD v1.1/v2.0): corpus = every paragraph, id `<article title>_<paragraph index>`, title =
  the article title with `_` → space; QA = every answerable question, gold_doc_id = its paragraph
  (v2.0 unanswerable questions are skipped and counted).
- `nq` / `nq:<split>`: Natural Questions long answers as corpus, short answers as QA (`data_prep.nq`).
- `dpr:<psgs_w100.tsv>` (corpus only): DPR passages `id<TAB>text<TAB>title`.
- `nq_open` / `nq_open:<split>` (QA only): NQ-open questions (`data_prep.nq`).

(`synthetic` is resolved by `data_prep.build` into the JSONL files it generates.)

Bad input: a malformed line (invalid JSON, not an object, a missing or mistyped key) either stops the
build with `file:line: what is wrong` (`data.on_bad_line=error`) or is skipped and counted (`skip`);
bytes that are not UTF-8 are replaced by U+FFFD and the line is counted in `non_utf8_lines` (with a
warning naming file:line); a UTF-8 BOM is ignored; empty documents (blank text) are skipped and counted;
a duplicate document or QA id is an error naming both places (`skip`: the later one is dropped and counted).
Loaders stream: a JSONL or TSV corpus is never held in memory (only the set of ids seen, for duplicates).
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import sha256_file
from common.errors import UserError
from common.text import control_char_note
from data_prep.records import Document, QAExample

log = logging.getLogger(__name__)
_MAX_WARNINGS = 10
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass
class LoadStats:
    """Counters of what the loaders skipped or repaired (they end up in the store manifest)."""

    bad_lines: int = 0
    non_utf8_lines: int = 0
    empty_documents: int = 0
    duplicate_ids: int = 0
    qa_skipped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)  # source-specific counts (e.g. NQ shared passages)
    bytes_read: int = 0
    _warned: int = 0

    def warn(self, msg: str) -> None:
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            log.warning("%s", msg)
        elif self._warned == _MAX_WARNINGS + 1:
            log.warning("(further warnings of this build are counted, not shown)")

    def skip_qa(self, reason: str) -> None:
        self.qa_skipped[reason] = self.qa_skipped.get(reason, 0) + 1

    def counts(self) -> dict[str, Any]:
        return {
            "bad_lines_skipped": self.bad_lines,
            "non_utf8_lines": self.non_utf8_lines,
            "empty_documents_skipped": self.empty_documents,
            "duplicate_ids_skipped": self.duplicate_ids,
            "qa_skipped": dict(sorted(self.qa_skipped.items())),
            "source_notes": dict(sorted(self.notes.items())),
        }


class BadInput:
    """Applies `data.on_bad_line` to one malformed record: raise (`error`) or count and warn (`skip`)."""

    def __init__(self, on_bad_line: str, stats: LoadStats):
        if on_bad_line not in ("error", "skip"):
            raise UserError(f"data.on_bad_line must be `error` or `skip`, got {on_bad_line!r}")
        self.mode = on_bad_line
        self.stats = stats

    def __call__(self, where: str, reason: str) -> None:
        if self.mode == "error":
            raise UserError(f"{where}: {reason} (fix it, or set data.on_bad_line=skip to skip such records)")
        self.stats.bad_lines += 1
        self.stats.warn(f"skipping {where}: {reason}")


# ---------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Source:
    """A parsed `data.corpus` / `data.qa` spec."""

    spec: str
    kind: str  # jsonl | squad | dpr | nq | nq_open
    path: Path | None = None
    split: str | None = None  # official dataset split for nq / nq_open (None = all)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the input: sha256 of a file, or dataset name + split for hub datasets."""
        if self.path is not None:
            return {"kind": self.kind, "path": str(self.path), "sha256": sha256_file(self.path)}
        return {"kind": self.kind, "split": self.split}


def parse_source(spec: str, role: str) -> Source:
    """`role` is `corpus` or `qa`; raises UserError for an unknown spec, a missing file or a wrong role."""
    spec = spec.strip()
    name, _, arg = spec.partition(":")
    if name in ("nq", "nq_open") and (not arg or arg.isidentifier()):
        if name == "nq_open" and role == "corpus":
            raise UserError(
                "data.corpus=nq_open: NQ-open has questions only; use dpr:<psgs_w100.tsv> as the corpus"
            )
        return Source(spec, name, None, arg or None)
    if name == "dpr" and arg:
        if role != "corpus":
            raise UserError(
                f"data.qa={spec}: a DPR passage file is a corpus; use nq_open:<split> for its questions"
            )
        return Source(spec, "dpr", _existing(arg, "data.corpus"))
    if spec == "synthetic":
        raise UserError("`synthetic` must be resolved into files first (data_prep.build does it)")
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return Source(spec, "jsonl", _existing(spec, f"data.{role}"))
    if suffix == ".json":
        return Source(spec, "squad", _existing(spec, f"data.{role}"))
    raise UserError(
        f"data.{role}={spec!r}: not a known source; use a .jsonl file, a SQuAD .json file, `synthetic`, "
        "`nq:<split>`" + (", `dpr:<psgs_w100.tsv>`" if role == "corpus" else ", `nq_open:<split>`")
    )


def _existing(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{key}: file not found: {p}")
    return p


# ---------------------------------------------------------------------------------------------- JSONL


def iter_jsonl(path: Path, bad: BadInput, stats: LoadStats) -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) for each well-formed line; blank lines are ignored."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            stats.bytes_read += len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            not_utf8 = ""
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw.decode("utf-8", errors="replace")
                stats.non_utf8_lines += 1
                stats.warn(f"{where}: bytes that are not UTF-8 (at byte {e.start}) were replaced by U+FFFD")
                not_utf8 = f"; the line is not UTF-8 (invalid byte at {e.start})"
                if lineno == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                    not_utf8 = "; the file is UTF-16 (it starts with a UTF-16 byte-order mark)"
                not_utf8 += ": save the file as UTF-8"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad(where, f"not valid JSON ({e.msg} at column {e.colno}){not_utf8}")
                continue
            if not isinstance(obj, dict):
                bad(where, f"expected a JSON object, got {type(obj).__name__}")
                continue
            if (b"\\ud" in raw or b"\\uD" in raw) and _SURROGATE.search(raw):
                # `\ud800`-style escapes decode to lone surrogates, which cannot be written as UTF-8.
                obj = _strip_surrogates(obj)
            yield where, obj


def _strip_surrogates(obj: Any) -> Any:
    if isinstance(obj, str):
        return obj.encode("utf-8", "replace").decode("utf-8")
    if isinstance(obj, list):
        return [_strip_surrogates(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _strip_surrogates(v) for k, v in obj.items()}
    return obj


def _id(obj: dict, key: str) -> str | None:
    """A string id; integers are accepted and converted (many corpora number their rows)."""
    v = obj.get(key)
    if isinstance(v, str) and v.strip():
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return None


def _jsonl_documents(path: Path, bad: BadInput, stats: LoadStats) -> Iterator[tuple[str, Document]]:
    for where, obj in iter_jsonl(path, bad, stats):
        doc_id = _id(obj, "id")
        if doc_id is None:
            bad(where, 'missing or empty "id" (a string)')
            continue
        problems = [k for k in ("title", "text") if not isinstance(obj.get(k), str)]
        if problems:
            bad(where, f"document {doc_id!r}: " + ", ".join(f'"{k}" must be a string' for k in problems))
            continue
        yield where, Document(doc_id, obj["title"], obj["text"])


def _jsonl_qa(path: Path, bad: BadInput, stats: LoadStats) -> Iterator[tuple[str, QAExample]]:
    for where, obj in iter_jsonl(path, bad, stats):
        qa_id = _id(obj, "id")
        if qa_id is None:
            bad(where, 'missing or empty "id" (a string)')
            continue
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            bad(where, f'QA {qa_id!r}: "question" must be a non-empty string')
            continue
        control = control_char_note(question)
        if control:
            # Every prompt refuses such a question (lm.prompting.check_question): refused here with its line,
            # not mid-training.
            bad(where, f'QA {qa_id!r}: "question" contains {control}')
            continue
        answers = obj.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            bad(where, f'QA {qa_id!r}: "answers" must be a list of strings')
            continue
        answers = [a for a in answers if a.strip()]
        if not answers:
            bad(where, f'QA {qa_id!r}: "answers" is empty')
            continue
        gold = obj.get("gold_doc_id")
        gold_id = _id(obj, "gold_doc_id") if gold is not None else None
        if gold is not None and gold_id is None:
            bad(where, f'QA {qa_id!r}: "gold_doc_id" must be a string')
            continue
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            bad(where, f'QA {qa_id!r}: "title" must be a string')
            continue
        if gold_id is None and not (title or "").strip():
            # The split rule is by article: without one we could only split by question, which leaks.
            bad(
                where,
                f'QA {qa_id!r}: no "gold_doc_id" and no "title"; add one (the split is by article)',
            )
            continue
        relation = obj.get("relation")
        yield (
            where,
            QAExample(
                qa_id,
                question,
                answers,
                gold_id,
                title,
                relation=relation if isinstance(relation, str) else None,
            ),
        )


# ---------------------------------------------------------------------------------------------- SQuAD


def _read_squad_json(path: Path, stats: LoadStats) -> list:
    raw = path.read_bytes()
    stats.bytes_read += len(raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8-sig", errors="replace")
        stats.non_utf8_lines += 1
        stats.warn(f"{path}: bytes that are not UTF-8 (at byte {e.start}) were replaced by U+FFFD")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f'{path}: not a SQuAD file (expected {{"version": ..., "data": [articles]}})')
    return _strip_surrogates(data["data"]) if "\\ud" in text.lower() else data["data"]


def _squad_title(raw_title: str) -> str:
    return raw_title.replace("_", " ").strip()


def _squad_articles(path: Path, bad: BadInput, stats: LoadStats) -> Iterator[tuple[str, str, int, dict]]:
    """(where, raw article title, paragraph index, paragraph) for each well-formed paragraph."""
    for ai, article in enumerate(_read_squad_json(path, stats)):
        where = f"{path}: data[{ai}]"
        if not isinstance(article, dict) or not isinstance(article.get("title"), str):
            bad(where, 'an article needs a string "title"')
            continue
        paragraphs = article.get("paragraphs")
        if not isinstance(paragraphs, list):
            bad(where, f'article {article["title"]!r}: "paragraphs" must be a list')
            continue
        for pi, par in enumerate(paragraphs):
            pwhere = f"{where}.paragraphs[{pi}]"
            if not isinstance(par, dict) or not isinstance(par.get("context"), str):
                bad(pwhere, 'a paragraph needs a string "context"')
                continue
            yield pwhere, article["title"], pi, par


def _squad_documents(path: Path, bad: BadInput, stats: LoadStats) -> Iterator[tuple[str, Document]]:
    for where, raw_title, pi, par in _squad_articles(path, bad, stats):
        yield where, Document(f"{raw_title}_{pi}", _squad_title(raw_title), par["context"])


def _squad_qa(path: Path, bad: BadInput, stats: LoadStats) -> Iterator[tuple[str, QAExample]]:
    for pwhere, raw_title, pi, par in _squad_articles(path, bad, stats):
        qas = par.get("qas", [])
        if not isinstance(qas, list):
            bad(pwhere, '"qas" must be a list')
            continue
        for qi, qa in enumerate(qas):
            where = f"{pwhere}.qas[{qi}]"
            if not isinstance(qa, dict) or _id(qa, "id") is None or not isinstance(qa.get("question"), str):
                bad(where, 'a question needs "id" and a string "question"')
                continue
            answers = qa.get("answers", [])
            if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
                bad(where, '"answers" must be a list of {"text", "answer_start"}')
                continue
            texts = list(
                dict.fromkeys(
                    a["text"] for a in answers if isinstance(a.get("text"), str) and a["text"].strip()
                )
            )
            if qa.get("is_impossible") or not texts:
                stats.skip_qa("unanswerable")  # SQuAD v2.0 questions without an answer
                continue
            yield (
                where,
                QAExample(_id(qa, "id"), qa["question"], texts, f"{raw_title}_{pi}", _squad_title(raw_title)),
            )


# ---------------------------------------------------------------------------------------------- DPR TSV


def _dpr_documents(path: Path, bad: BadInput, stats: LoadStats) -> Iterator[tuple[str, Document]]:
    """DPR `psgs_w100.tsv`: a header `id text title`, then one passage a row (csv-quoted text)."""
    csv.field_size_limit(1 << 28)
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        while True:
            try:
                row = next(reader, None)
            except csv.Error as e:  # e.g. a NUL byte; the reader cannot resynchronise after it
                raise UserError(f"{path}:{reader.line_num}: unreadable TSV row ({e})") from e
            if row is None:
                break
            where = f"{path}:{reader.line_num}"
            if reader.line_num == 1 and [c.strip().lower() for c in row[:3]] == ["id", "text", "title"]:
                continue
            if not row:
                continue
            if len(row) != 3 or not row[0].strip():
                bad(where, f"expected 3 tab-separated columns id, text, title; got {len(row)}")
                continue
            yield where, Document(row[0].strip(), row[2], row[1])


# ---------------------------------------------------------------------------------------------- dispatch


def iter_documents(source: Source, on_bad_line: str, stats: LoadStats, data_cfg=None) -> Iterator[Document]:
    """Every usable document of a corpus, in file order: malformed ones handled by `on_bad_line`,
    empty ones skipped and counted, duplicate ids rejected (or skipped and counted)."""
    bad = BadInput(on_bad_line, stats)
    if source.kind == "jsonl":
        records = _jsonl_documents(source.path, bad, stats)
    elif source.kind == "squad":
        records = _squad_documents(source.path, bad, stats)
    elif source.kind == "dpr":
        records = _dpr_documents(source.path, bad, stats)
    elif source.kind == "nq":
        from data_prep import nq

        records = nq.nq_documents(source.split, data_cfg, stats)
    else:
        raise UserError(f"{source.spec}: cannot be used as a corpus")
    seen: set[str] = set()
    for where, doc in records:
        if doc.id in seen:
            if bad.mode == "error":
                raise UserError(
                    f"{where}: duplicate document id {doc.id!r} (ids must be unique; "
                    "set data.on_bad_line=skip to keep the first and skip the others)"
                )
            stats.duplicate_ids += 1
            stats.warn(f"skipping {where}: duplicate document id {doc.id!r}")
            continue
        seen.add(doc.id)
        if not doc.text.strip():
            stats.empty_documents += 1
            continue
        yield doc


def read_qa(source: Source, on_bad_line: str, stats: LoadStats, data_cfg=None) -> list[tuple[str, QAExample]]:
    """All QA examples of a QA source as (where, example), duplicate ids rejected (or skipped and counted)."""
    bad = BadInput(on_bad_line, stats)
    if source.kind == "jsonl":
        records = _jsonl_qa(source.path, bad, stats)
    elif source.kind == "squad":
        records = _squad_qa(source.path, bad, stats)
    elif source.kind in ("nq", "nq_open"):
        from data_prep import nq

        records = (
            nq.nq_qa(source.split, data_cfg, stats)
            if source.kind == "nq"
            else nq.nq_open_qa(source.split, data_cfg, stats)
        )
    else:
        raise UserError(f"{source.spec}: cannot be used as a QA set")
    out: list[tuple[str, QAExample]] = []
    first: dict[str, str] = {}
    for where, ex in records:
        if ex.id in first:
            if bad.mode == "error":
                raise UserError(
                    f"{where}: duplicate QA id {ex.id!r} (first at {first[ex.id]}); "
                    "set data.on_bad_line=skip to keep the first"
                )
            stats.duplicate_ids += 1
            stats.warn(f"skipping {where}: duplicate QA id {ex.id!r}")
            continue
        first[ex.id] = where
        out.append((where, ex))
    return out
