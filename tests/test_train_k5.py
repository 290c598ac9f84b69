"""Reading k = 5 candidates in training: gold + 4 retrieved hard negatives, shuffled per question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.store import SegmentStore, load_qa
from qa.train import main as train_main
from qa.training_data import make_examples
from retriever.search import Hit
from tests.tiny_run import make_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, smol_tokenizer):
    return make_tiny_run(tmp_path_factory.mktemp("k5"), smol_tokenizer)


def test_shuffled_examples_keep_the_gold_segment_at_varying_places(tiny_cfg):
    store = SegmentStore.open(Path(tiny_cfg.run_dir) / "store")
    qa = [q for q in load_qa(Path(tiny_cfg.run_dir) / "store", "train") if q.gold_segment_ids][:40]
    others = [i for i in range(len(store))]
    hits = {}
    for q in qa:  # four non-gold hits per question: force_gold must add the gold one
        negatives = [i for i in others if i not in q.gold_segment_ids][:5]
        hits[q.id] = [Hit(i, 1.0, "", store.get(i).title, store.get(i).text) for i in negatives]
    plain = make_examples(qa, hits, 5, store, force_gold=True)
    shuffled = make_examples(qa, hits, 5, store, force_gold=True, shuffle_seed=0)
    assert [sorted(e.segment_ids) for e in plain] == [sorted(e.segment_ids) for e in shuffled]
    places = set()
    for q, e in zip(qa, shuffled):
        gold = [j for j, sid in enumerate(e.segment_ids) if sid in q.gold_segment_ids]
        assert len(gold) == 1 and len(e.segment_ids) == 5
        places.add(gold[0])
    assert len(places) >= 3  # without shuffling the forced gold is always last
    assert make_examples(qa, hits, 5, store, force_gold=True, shuffle_seed=0)[0].segment_ids == shuffled[0].segment_ids


def test_qa_train_reads_five_shuffled_segments(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for sub in ("store", "index"):
        (run / sub).symlink_to(Path(tiny_cfg.run_dir) / sub)
    train_main([f"run_dir={run}", f"lm.model={tiny_cfg.lm.model}", f"retriever.model={tiny_cfg.retriever.model}",
                "index.factory=Flat", "knowledge_encoder.max_segment_tokens=96", "knowledge_encoder.format_slots=2",
                "retriever.top_k=5", "train.shuffle_segments=true", "train.systems=dynamic_prefix@p2",
                "train.max_steps=2", "train.batch_size=2", "train.eval_every=0", "train.dev_limit=2",
                "train.warmup_steps=1", "lm.max_new_tokens=2"])
    manifest = json.loads((run / "checkpoints" / "final" / "manifest.json").read_text())
    assert manifest["data"]["top_k"] == 5 and manifest["data"]["train_examples"] > 0


def test_training_reads_no_segment_of_a_dev_or_test_article(tiny_cfg, tmp_path):
    from accelerate import Accelerator

    from configs.loader import load_config
    from qa.train import Trainer, train_segment_ids

    run = tmp_path / "run2"
    run.mkdir()
    for sub in ("store", "index"):
        (run / sub).symlink_to(Path(tiny_cfg.run_dir) / sub)
    args = [f"run_dir={run}", f"lm.model={tiny_cfg.lm.model}", f"retriever.model={tiny_cfg.retriever.model}",
            "index.factory=Flat", "knowledge_encoder.max_segment_tokens=96", "retriever.top_k=5",
            "train.systems=dynamic_prefix@p2", "train.dev_limit=2"]
    store = SegmentStore.open(run / "store")
    keep = train_segment_ids(store)
    assert 0 < len(keep) < len(store)
    trainer = Trainer(load_config(None, args), Accelerator(cpu=True))
    assert trainer.train_examples and all(len(e.segment_ids) == 5 for e in trainer.train_examples)
    assert all(sid in keep for e in trainer.train_examples for sid in e.segment_ids)
    # with the rule off, the plain top-5 reads other articles' segments as distractors
    loose = Trainer(load_config(None, args + ["train.train_segments_only=false"]), Accelerator(cpu=True))
    assert any(sid not in keep for e in loose.train_examples for sid in e.segment_ids)
