"""The questions an evaluation asks: the store's QA examples of `data.split`, the first `eval.limit` of
them in file order, each with gold answers and a unique id."""

from __future__ import annotations

from pathlib import Path

from configs.errors import UserError
from configs.schema import Config
from data_prep.records import QAExample
from data_prep.store import load_qa


def load_examples(cfg: Config) -> list[QAExample]:
    """The first eval.limit questions of data.split, refusing questions without gold answers."""
    store_dir = Path(cfg.run_dir) / "store"
    examples = load_qa(store_dir, cfg.data.split)
    if not examples:
        raise UserError(
            f"{store_dir / 'qa.jsonl'} has no `{cfg.data.split}` questions; pick another data.split "
            "or rebuild the store with a non-zero data.test_fraction / data.dev_fraction"
        )
    if cfg.eval.limit is not None:
        if cfg.eval.limit < 1:
            raise UserError(f"eval.limit must be >= 1 (or null for all), got {cfg.eval.limit}")
        examples = examples[: cfg.eval.limit]
    unanswered = [ex.id for ex in examples if not any(a.strip() for a in ex.answers)]
    if unanswered:
        raise UserError(
            f"{store_dir / 'qa.jsonl'}: {len(unanswered)} of the {len(examples)} `{cfg.data.split}` questions "
            f"evaluated have no gold answers (first: id {unanswered[0]}); eval.run scores predictions against "
            "gold answers, so build the store from a QA file with `answers` (to just answer questions, use "
            "`python -m qa.answer`)"
        )
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise UserError(
                f"{store_dir / 'qa.jsonl'}: question id {ex.id!r} occurs twice; ids must be unique"
            )
        seen.add(ex.id)
    return examples
