"""Natural Questions via `datasets`: `nq[:<split>]` (corpus + QA) and `nq_open[:<split>]` (QA only).

`nq:<split>` reads `data.nq_dataset` (default `google-research-datasets/natural_questions`, schema: `id`,
`document{title, url, html, tokens{token, is_html, start_byte, end_byte}}`, `question{text, tokens}`,
`long_answer_candidates{...}`, `annotations{id, long_answer{start_token, end_token, start_byte, end_byte,
candidate_index}, short_answers{start_token, end_token, start_byte, end_byte, text}, yes_no_answer}`):

- corpus: one document per example that has a long answer: the long answer's non-HTML tokens joined by
  spaces (the annotation that also has short answers is preferred), titled with the Wikipedia page title.
  Its id is `nq-` + a hash of title and text, so a paragraph that answers several questions is stored
  once (the repeats are counted in the manifest as `source_notes.nq_shared_passages`).
- QA: every example with at least one short answer; answers = the short-answer texts of all annotators;
  gold document = that long answer; split by the page title (the project's one split rule), so the
  official train/validation split only decides which examples are read. Examples without a short
  answer (long-answer-only or yes/no) are skipped and counted.

`nq_open:<split>` reads `data.nq_open_dataset` (default `google-research-datasets/nq_open`, schema:
`question: string`, `answer: list[string]`). NQ-open questions have no article, so they cannot be split
by title: the official splits map to ours, `train` → `train` and `validation` (the standard NQ-open test
set) → `test`, and no question lands in `dev`. They have no gold document either: `gold_segment_ids` stay
empty, and retrieval is judged DPR-style (does a retrieved segment contain an answer string).

Without network the hub datasets load only from the `datasets` cache; otherwise the loader fails with a
UserError saying so (or point `data.nq_dataset` at a local folder holding the dataset's parquet files).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

from common.errors import UserError
from data_prep.loaders import LoadStats
from data_prep.records import Document, QAExample

OFFICIAL_SPLITS = ("train", "validation")
NQ_OPEN_SPLIT_MAP = {"train": "train", "validation": "test"}


def load_split(name: str, split: str, cache_dir: str | None = None):
    """One split of a hub (or local-folder) dataset, with a clear error when it cannot be reached."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except (OSError, ValueError) as e:  # ConnectionError / offline mode / not found / unknown split
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
            "HF_DATASETS_OFFLINE"
        )
        raise UserError(
            f"cannot load dataset {name!r} split {split!r} ({type(e).__name__}: {e}). This loader needs the "
            "Hugging Face hub or the dataset already in the `datasets` cache"
            + (" (offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else "")
            + "; download it where the hub is reachable, or set data.nq_dataset / data.nq_open_dataset to "
            "a local folder with its parquet files"
        ) from e


def _splits(split: str | None) -> tuple[str, ...]:
    return (split,) if split else OFFICIAL_SPLITS


def passage_text(row: dict) -> str | None:
    """The chosen long answer of an NQ example as plain text (HTML tokens dropped), or None."""
    ann = row["annotations"]
    longs = ann["long_answer"]
    shorts = ann["short_answers"]
    tokens = row["document"]["tokens"]
    # Prefer an annotation that also has short answers: its long answer contains them.
    order = sorted(range(len(longs)), key=lambda j: (not (j < len(shorts) and shorts[j]["text"]), j))
    for j in order:
        la = longs[j]
        start, end = la["start_token"], la["end_token"]
        if la.get("candidate_index", 0) < 0 or start < 0 or end <= start:
            continue
        words = [
            t for t, is_html in zip(tokens["token"][start:end], tokens["is_html"][start:end]) if not is_html
        ]
        text = " ".join(words).strip()
        if text:
            return text
    return None


def short_answers(row: dict) -> list[str]:
    texts = [t.strip() for sa in row["annotations"]["short_answers"] for t in sa["text"]]
    return list(dict.fromkeys(t for t in texts if t))


def passage_id(title: str, text: str) -> str:
    return "nq-" + hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:16]


def nq_records(
    split: str | None, data_cfg, stats: LoadStats
) -> Iterator[tuple[str, Document | None, QAExample | None]]:
    """(where, passage or None, QA example or None) for every example, in dataset order."""
    for sp in _splits(split):
        ds = load_split(data_cfg.nq_dataset, sp, data_cfg.hf_cache_dir)
        for i, row in enumerate(ds):
            where = f"{data_cfg.nq_dataset}[{sp}] row {i} (id {row['id']})"
            title = row["document"]["title"]
            text = passage_text(row)
            doc = Document(passage_id(title, text), title, text) if text else None
            answers = short_answers(row)
            qa = None
            if doc is None:
                stats.skip_qa("nq_no_long_answer")
            elif not answers:
                stats.skip_qa("nq_no_short_answer")
            else:
                qa = QAExample(f"nq-{row['id']}", row["question"]["text"], answers, doc.id, title)
            yield where, doc, qa


def nq_documents(
    split: str | None, data_cfg, stats: LoadStats, qa_out: list | None = None
) -> Iterator[tuple[str, Document]]:
    """Unique long-answer passages; if `qa_out` is given, the QA examples of the same pass are appended to it
    as (where, example), so corpus and QA come from one read of the dataset."""
    seen: set[str] = set()
    shared = 0
    for where, doc, qa in nq_records(split, data_cfg, stats):
        if qa is not None and qa_out is not None:
            qa_out.append((where, qa))
        if doc is None:
            continue
        if doc.id in seen:
            shared += 1
            stats.notes["nq_shared_passages"] = shared  # not an error: several questions, one paragraph
            continue
        seen.add(doc.id)
        yield where, doc


def nq_qa(split: str | None, data_cfg, stats: LoadStats) -> Iterator[tuple[str, QAExample]]:
    for where, _doc, qa in nq_records(split, data_cfg, stats):
        if qa is not None:
            yield where, qa


def nq_open_qa(split: str | None, data_cfg, stats: LoadStats) -> Iterator[tuple[str, QAExample]]:
    for sp in _splits(split):
        if sp not in NQ_OPEN_SPLIT_MAP:
            raise UserError(f"nq_open:{sp}: NQ-open has the splits {', '.join(NQ_OPEN_SPLIT_MAP)}")
        ds = load_split(data_cfg.nq_open_dataset, sp, data_cfg.hf_cache_dir)
        for i, row in enumerate(ds):
            answers = list(dict.fromkeys(a.strip() for a in row["answer"] if a and a.strip()))
            if not row["question"].strip() or not answers:
                stats.skip_qa("nq_open_empty")
                continue
            ex = QAExample(f"nq_open-{sp}-{i}", row["question"], answers, split=NQ_OPEN_SPLIT_MAP[sp])
            yield f"{data_cfg.nq_open_dataset}[{sp}] row {i}", ex
