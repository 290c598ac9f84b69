"""Measurements of a synthetic world: sizes, article lengths, majority baseline.

    python -m data_prep.synthetic --config configs/default.yaml --stats --json stats.json

- sizes: articles, questions per split and per relation;
- article length in words, in LM tokens (`lm.model`'s tokenizer) and in retriever tokens (title + text);
- majority baseline: for every relation, the most frequent train answer, scored by exact match (SQuAD
  normalisation) on dev and test; a hard world keeps it near zero.

Off-the-shelf retrieval over the whole articles needs the retriever, a floor above data_prep
(docs/ARCHITECTURE.md): it is `python -m retriever.synthetic_eval`, which adds its numbers to these.
"""

from __future__ import annotations

import statistics
from collections import Counter

from configs.schema import Config
from data_prep.records import QAExample, Segment
from data_prep.synthetic import World, iter_questions, majority_answers


def length_summary(values: list[int]) -> dict:
    """min, mean, p95 and max of some lengths."""
    values = sorted(values)
    return {
        "min": values[0],
        "mean": round(statistics.fmean(values), 1),
        "p95": values[int(0.95 * (len(values) - 1))],
        "max": values[-1],
    }


def _majority_em(majority: dict[str, str], examples: list[QAExample]) -> float | None:
    from common.answers import retrieval_normalize as normalize_answer

    if not examples:
        return None
    hits = 0
    for ex in examples:
        guess = normalize_answer(majority.get(ex.relation, ""))
        hits += any(guess == normalize_answer(a) for a in ex.answers)
    return hits / len(examples)


def article_segments(world: World) -> list[Segment]:
    """Every article of the world as one segment (segment id = entity index), for whole-article retrieval."""
    out = []
    for i in range(world.n):
        doc = world.document(i)
        out.append(Segment(i, doc.id, doc.title, doc.text, 0, len(doc.text), 0, 0))
    return out


def split_questions(cfg: Config) -> dict[str, list[QAExample]]:
    """The world's questions by split (train, dev, test), by the one split rule."""
    d = cfg.data
    questions = list(iter_questions(d.synthetic, cfg.seed, d.dev_fraction, d.test_fraction))
    return {s: [q for q in questions if q.split == s] for s in ("train", "dev", "test")}


def world_stats(cfg: Config) -> dict:
    """All numbers of the module docstring for the world of `cfg.data.synthetic` (streams the documents)."""
    from transformers import AutoTokenizer

    from configs.models import resolve_lm_path

    syn = cfg.data.synthetic
    world = World(syn)
    lm_tok = AutoTokenizer.from_pretrained(resolve_lm_path(cfg.lm.model, cfg.cache_dir))
    words, lm_tokens, paragraphs = [], [], []
    for i in range(world.n):
        doc = world.document(i)
        words.append(len(doc.text.split()))
        paragraphs.append(doc.text.count("\n\n") + 1)
        lm_tokens.append(len(lm_tok(f"{doc.title}\n{doc.text}", add_special_tokens=False)["input_ids"]))

    by_split = split_questions(cfg)
    majority = majority_answers(by_split["train"])
    stats: dict = {
        "world": {
            "n_entities": syn.n_entities,
            "world_seed": syn.seed,
            "split_seed": cfg.seed,
            "questions_per_entity": syn.questions_per_entity,
            "name_variants": syn.name_variants,
            "distractor_facts": syn.distractor_facts,
        },
        "articles": world.n,
        "articles_per_type": dict(Counter(world.type_of(i) for i in range(world.n))),
        "questions": {s: len(v) for s, v in by_split.items()},
        "entities_per_split": {s: len({q.gold_doc_id for q in v}) for s, v in by_split.items()},
        "words_per_article": length_summary(words),
        "lm_tokens_per_article": length_summary(lm_tokens),
        "paragraphs_per_article": length_summary(paragraphs),
        "distinct_test_answers": len({q.answers[0] for q in by_split["test"]}),
        "majority_baseline_em": {s: _majority_em(majority, by_split[s]) for s in ("dev", "test")},
    }
    return stats


def print_stats(stats: dict) -> None:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    for key, value in stats.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={fmt(v) if not isinstance(v, dict) else v}" for k, v in value.items())
            print(f"{key}: {inner}")
        else:
            print(f"{key}: {fmt(value)}")
