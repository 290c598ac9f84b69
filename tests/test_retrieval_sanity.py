"""The prefix is not ignored: a briefly trained dynamic_prefix answers from its segment, and follows it.

On the embedded SmolLM2 (a published retrieval LM once shipped with retrieval silently doing nothing):
with the gold segment the answers are right; with the segment replaced by another entity's article of
the same type, the answer follows the replacement's fact. Questions are from held-out (test) entities.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from common.answers import exact_match
from data_prep.store import SegmentStore, load_qa
from qa.system import QASystem
from qa.train import main as train_main
from retriever.search import Hit
from tests.tiny_run import make_tiny_run

pytestmark = pytest.mark.slow

# 300 entities (~900 train questions) and 144 steps: a 90-entity world gave 0.80 with the gold segment at
# 48 and at 96 steps (too few distinct training questions); 300 entities gave 0.917 on 120 questions at 96.
ENTITIES = 300
STEPS = 144
QUESTIONS = 120


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("sanity")
    cfg = make_tiny_run(root, smol_tokenizer, n_entities=ENTITIES, overrides=("data.synthetic.questions_per_entity=4",))
    cfg.lm.model = "embedded:smollm2-135m"
    args = [f"run_dir={cfg.run_dir}", "lm.model=embedded:smollm2-135m", f"retriever.model={cfg.retriever.model}",
            "index.factory=Flat", f"data.synthetic.n_entities={ENTITIES}", "train.systems=dynamic_prefix@pfull",
            "knowledge_encoder.max_segment_tokens=320", "train.batch_size=8", f"train.max_steps={STEPS}",
            "train.lr=3e-3", "train.warmup_steps=6", "train.eval_every=0", "train.dev_limit=8",
            "train.force_gold=true", "lm.max_new_tokens=12"]
    train_main(args)
    cfg.knowledge_encoder.max_segment_tokens = 320
    cfg.lm.max_new_tokens = 12
    qa = QASystem.from_config(cfg, systems=["dynamic_prefix@pfull"], retriever=_NoRetriever())
    return cfg, qa


class _NoRetriever:
    """Hits are given explicitly below; nothing may search."""

    def batch_search(self, *_):
        raise AssertionError("the sanity test passes segments explicitly")


def _hit(segment) -> Hit:
    return Hit(segment.segment_id, 1.0, segment.doc_id, segment.title, segment.text)


def test_answers_from_the_segment_and_follows_a_replacement(trained):
    cfg, qa = trained
    store = SegmentStore.open(Path(cfg.run_dir) / "store")
    test_qa = load_qa(Path(cfg.run_dir) / "store", "test")
    all_qa = load_qa(Path(cfg.run_dir) / "store", "all")
    by_relation: dict[str, list] = {}
    for ex in all_qa:
        by_relation.setdefault(ex.relation, []).append(ex)
    rng = random.Random(0)
    questions, gold_hits, swap_hits, swap_answers = [], [], [], []
    for ex in test_qa:
        others = [o for o in by_relation[ex.relation]
                  if o.gold_doc_id != ex.gold_doc_id and o.answers[0] != ex.answers[0] and o.gold_segment_ids]
        if not others or not ex.gold_segment_ids:
            continue
        other = rng.choice(others)
        questions.append(ex)
        gold_hits.append([_hit(store.get(ex.gold_segment_ids[0]))])
        swap_hits.append([_hit(store.get(other.gold_segment_ids[0]))])
        swap_answers.append(other.answers[0])
        if len(questions) == QUESTIONS:
            break
    assert len(questions) >= QUESTIONS // 2
    texts = [q.question for q in questions]
    with_gold = qa.answer(texts, mode="dynamic_prefix@pfull", hits=gold_hits)
    swapped = qa.answer(texts, mode="dynamic_prefix@pfull", hits=swap_hits)

    def right(prediction: str, gold: str) -> bool:
        return exact_match(prediction, gold) == 1.0  # the evaluation's EM (SQuAD normalisation)

    gold_right = sum(right(p.prediction, q.answers[0]) for p, q in zip(with_gold, questions)) / len(questions)
    follows = sum(right(p.prediction, a) for p, a in zip(swapped, swap_answers)) / len(questions)
    report = [{"q": q.question, "gold": q.answers[0], "pred": p.prediction, "swap": a, "swap_pred": s.prediction}
              for q, p, a, s in zip(questions, with_gold, swap_answers, swapped)]
    changed = sum(not right(p.prediction, s.prediction) for p, s in zip(with_gold, swapped)) / len(questions)
    # An LM that ignored its prefix would give the same answer both times and follow no replacement
    # (swap answers differ from gold ones by construction). Names in the synthetic world are confusable
    # on purpose (Tore Daikaissa, Tore Daikaissair); the bar is 0.9 with the gold segment.
    print(f"sanity: gold_right={gold_right:.2f} follows={follows:.2f} changed={changed:.2f}")
    assert changed >= 0.8, json.dumps(report, indent=1)
    assert gold_right >= 0.9, json.dumps(report, indent=1)
    assert follows >= 0.6, json.dumps(report, indent=1)
