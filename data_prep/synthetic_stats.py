"""Measurements of a synthetic world: sizes, article lengths, majority baseline, off-the-shelf retrieval.

    python -m data_prep.synthetic --config configs/default.yaml --stats --retrieval --json stats.json

- sizes: articles, questions per split and per relation;
- article length in words, in LM tokens (`lm.model`'s tokenizer) and in retriever tokens (title + text);
- majority baseline: for every relation, the most frequent train answer, scored by exact match (SQuAD
  normalisation) on dev and test; a hard world keeps it near zero;
- retrieval (with `retrieval=True`): `retriever.model` (default MiniLM) over whole articles (each one
  segment, joined with its title by `segment_input_text`), exact cosine search, on the `data.split`
  questions: top-k answer accuracy (an answer string occurs in a retrieved article's text, whole-token
  match, the DPR convention of `retriever.metrics`) and gold-document hit@k.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import numpy as np

from configs.schema import Config
from data_prep.records import QAExample, Segment
from data_prep.synthetic import World, iter_questions, majority_answers


def _summary(values: list[int]) -> dict:
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


def world_stats(cfg: Config, retrieval: bool = False, ks: tuple[int, ...] = (1, 5, 20)) -> dict:
    """All numbers of the module docstring for the world of `cfg.data.synthetic` (streams the documents)."""
    from transformers import AutoTokenizer

    from configs.models import resolve_lm_path

    syn, d = cfg.data.synthetic, cfg.data
    world = World(syn)
    lm_tok = AutoTokenizer.from_pretrained(resolve_lm_path(cfg.lm.model, cfg.cache_dir))
    words, lm_tokens, paragraphs = [], [], []
    docs: list[Segment] = []
    for i in range(world.n):
        doc = world.document(i)
        words.append(len(doc.text.split()))
        paragraphs.append(doc.text.count("\n\n") + 1)
        lm_tokens.append(len(lm_tok(f"{doc.title}\n{doc.text}", add_special_tokens=False)["input_ids"]))
        if retrieval:
            docs.append(Segment(i, doc.id, doc.title, doc.text, 0, len(doc.text), 0, 0))

    questions = list(iter_questions(syn, cfg.seed, d.dev_fraction, d.test_fraction))
    by_split: dict[str, list[QAExample]] = {
        s: [q for q in questions if q.split == s] for s in ("train", "dev", "test")
    }
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
        "words_per_article": _summary(words),
        "lm_tokens_per_article": _summary(lm_tokens),
        "paragraphs_per_article": _summary(paragraphs),
        "distinct_test_answers": len({q.answers[0] for q in by_split["test"]}),
        "majority_baseline_em": {s: _majority_em(majority, by_split[s]) for s in ("dev", "test")},
    }
    if retrieval:
        stats["retrieval"] = _retrieval(cfg, docs, by_split[d.split] if d.split != "all" else questions, ks)
    return stats


def _retrieval(cfg: Config, docs: list[Segment], examples: list[QAExample], ks: tuple[int, ...]) -> dict:
    """Exact cosine search of every question over every article with `cfg.retriever.model`."""
    from data_prep.store import segment_input_text
    from retriever.encoder import Encoder
    from retriever.metrics import retrieval_metrics

    t0 = time.time()
    encoder = Encoder.from_config(cfg)
    passages = encoder.encode_passages([segment_input_text(s) for s in docs])  # (n_docs, dim), normalised
    queries = encoder.encode_queries([q.question for q in examples])  # (n_q, dim)
    kmax = min(max(ks), len(docs))
    scores = queries @ passages.T  # (n_q, n_docs) cosine
    top = np.argsort(-scores, axis=1, kind="stable")[:, :kmax]
    hits = [[docs[j] for j in row] for row in top]
    out = retrieval_metrics(examples, hits, ks=ks)
    out = {k: v for k, v in out.items() if not k.startswith("recall@")}  # no gold segments here
    retr_tokens = [len(encoder.tokenizer(segment_input_text(s))["input_ids"]) for s in docs]
    out.update(
        {
            "model": cfg.retriever.model,
            "split": cfg.data.split,
            "retriever_tokens_per_article": _summary(retr_tokens),
            "seconds": round(time.time() - t0, 1),
        }
    )
    # Per relation top-5 answer accuracy, to see which questions are hard to retrieve for.
    per_rel: dict[str, list[bool]] = {}
    for ex, hs in zip(examples, hits):
        per_rel.setdefault(ex.relation, []).append(ex.gold_doc_id in {h.doc_id for h in hs[:5]})
    out["gold_doc_hit@5_per_type"] = {
        t: round(float(np.mean([v for r, vs in per_rel.items() if r.startswith(t + ".") for v in vs])), 3)
        for t in sorted({r.split(".")[0] for r in per_rel})
    }
    return out


def print_stats(stats: dict) -> None:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    for key, value in stats.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={fmt(v) if not isinstance(v, dict) else v}" for k, v in value.items())
            print(f"{key}: {inner}")
        else:
            print(f"{key}: {fmt(value)}")
