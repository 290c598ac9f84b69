"""The questions an evaluation asks: the store's QA examples of `data.split`, `eval.limit` of them.

`eval.sample` says which ones: `first` takes the first N in file order; `random` takes a random sample
of N seeded by `seed`. The random draw ranks every question by a hash of (seed, question id) and keeps
the N lowest, so it depends only on the seed and the ids: every system of a run and every rerun sees the
same questions, and a larger N keeps the questions of a smaller one (resuming reuses their answers).
Either way the selected questions keep their file order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.atomic import fingerprint
from common.errors import UserError
from configs.schema import Config
from data_prep.records import QAExample
from data_prep.store import load_qa

SAMPLES = ("first", "random")


def select(examples: Sequence[QAExample], limit: int | None, sample: str, seed: int) -> list[QAExample]:
    """`limit` of `examples` (all if None): the first ones, or a (seed, id)-seeded random sample."""
    if sample not in SAMPLES:
        raise UserError(f"eval.sample must be one of {', '.join(SAMPLES)}, got {sample!r}")
    if limit is None or limit >= len(examples):
        return list(examples)
    if sample == "first":
        return list(examples[:limit])
    rank = sorted(range(len(examples)), key=lambda i: (fingerprint([int(seed), examples[i].id]), i))
    return [examples[i] for i in sorted(rank[:limit])]


def load_examples(cfg: Config) -> list[QAExample]:
    """eval.limit questions of data.split (see `select`), refusing questions without gold answers."""
    store_dir = Path(cfg.run_dir) / "store"
    examples = load_qa(store_dir, cfg.data.split)
    if not examples:
        raise UserError(
            f"{store_dir / 'qa.jsonl'} has no `{cfg.data.split}` questions; pick another data.split "
            "or rebuild the store with a non-zero data.test_fraction / data.dev_fraction"
        )
    if cfg.eval.limit is not None and cfg.eval.limit < 1:
        raise UserError(f"eval.limit must be >= 1 (or null for all), got {cfg.eval.limit}")
    examples = select(examples, cfg.eval.limit, cfg.eval.sample, cfg.seed)
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
