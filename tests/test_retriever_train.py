"""InfoNCE fine-tuning: a tiny run lowers the loss and raises top-k accuracy on a toy set; the command
trains on the train split only, evaluates before/after on held-out articles and re-indexes."""

from __future__ import annotations

import json

import pytest

from common.errors import UserError
from configs.loader import load_config
from data_prep.split import split_of
from data_prep.store import SegmentStore, load_qa
from retriever import train as T
from retriever.encoder import Encoder
from retriever.faiss_index import read_manifest
from retriever.search import Retriever, tokenizer_backend
from retriever.testing import make_tiny_encoder, toy_documents, words_of, write_toy_store

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(root, n_docs, splits=None, extra=()):
    docs, questions = toy_documents(n_docs)
    words = words_of([d.title + " " + d.text for d in docs] + [q for _, q, _ in questions])
    make_tiny_encoder(root / "enc", words)
    overrides = [
        f"run_dir={root / 'run'}",
        f"retriever.model={root / 'enc'}",
        "index.factory=Flat",
        "retriever.batch_size=64",
        "device=cpu",
        *extra,
    ]
    cfg = load_config(None, overrides)
    encoder = Encoder.from_config(cfg, dtype="float32")
    split_map = {d.id: splits for d in docs} if isinstance(splits, str) else None
    write_toy_store(root / "run" / "store", docs, questions, tokenizer_backend(encoder), splits=split_map)
    return cfg, overrides, encoder


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: CPU autocast, as on GPUs
def test_tiny_finetuning_lowers_infonce_and_raises_accuracy(tmp_path, precision):
    cfg, _, encoder = _setup(tmp_path, 40, splits="train")
    store = SegmentStore.open(tmp_path / "run" / "store")
    pairs = T.training_examples(tmp_path / "run" / "store")
    examples = [ex for ex, _ in pairs]
    before_ret = T.retriever_over(cfg, encoder, store, tmp_path / "run", progress=False)
    before = T.evaluate(before_ret, examples, ks=(1, 5))
    train_pairs = T.make_pairs(pairs, T.mine_hard_negatives(before_ret, pairs, 1, cfg))
    assert all(len(p.negatives) == 1 and p.negatives[0] != p.positive for p in train_pairs)
    loss_before = T.infonce_loss(encoder, train_pairs)

    stats = T.train_encoder(
        encoder,
        train_pairs,
        out_dir=tmp_path / "tuned",
        lr=1e-3,
        epochs=8,
        batch_size=16,
        precision=precision,
        progress=False,
    )
    assert stats["steps"] > 0 and stats["steps_per_s"] > 0
    tuned = Encoder.load(str(tmp_path / "tuned"), device="cpu")
    assert tuned.model.max_seq_length == cfg.retriever.max_seq_length  # saved with the model
    assert tuned.fingerprint != Encoder.from_config(cfg).fingerprint
    loss_after = T.infonce_loss(tuned, train_pairs)
    after = T.evaluate(
        T.retriever_over(cfg, tuned, store, tmp_path / "after", progress=False), examples, ks=(1, 5)
    )
    # measured: loss 3.9 → 1.3, top-1 0.23 → 0.93, top-5 0.64 → 1.0
    assert loss_after < loss_before - 1.0, (loss_before, loss_after)
    assert after["top1_accuracy"] > before["top1_accuracy"] + 0.3, (before, after)
    assert after["top5_accuracy"] > before["top5_accuracy"] + 0.2, (before, after)


def test_precision_rules():
    assert T.resolve_precision("auto", cuda=False) == "fp32"
    assert T.resolve_precision("bf16", cuda=False) == "bf16"
    assert T.resolve_precision("fp32", cuda=True) == "fp32"
    with pytest.raises(UserError, match="needs a GPU"):
        T.resolve_precision("fp16", cuda=False)


def test_training_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformerTrainer

    cfg, _, encoder = _setup(tmp_path, 12, splits="train")
    pairs = T.make_pairs(T.training_examples(tmp_path / "run" / "store"), [[] for _ in range(36)])
    kw = dict(lr=1e-3, epochs=2, batch_size=8, save_steps=3, progress=False)  # 5 steps per epoch
    T.train_encoder(Encoder.from_config(cfg), pairs, out_dir=tmp_path / "clean", **kw)

    real_step, calls = SentenceTransformerTrainer.training_step, []

    def crash_at_step_5(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, *a, **k)

    monkeypatch.setattr(SentenceTransformerTrainer, "training_step", crash_at_step_5)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        T.train_encoder(
            Encoder.from_config(cfg), pairs, out_dir=tmp_path / "resumed", checkpoint_dir=ckpt, **kw
        )
    assert (ckpt / "checkpoint-3").is_dir() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(SentenceTransformerTrainer, "training_step", real_step)
    stats = T.train_encoder(encoder, pairs, out_dir=tmp_path / "resumed", checkpoint_dir=ckpt, **kw)
    assert stats["resumed_from"] == 3 and stats["steps"] == 10 and not ckpt.exists()
    a = Encoder.load(str(tmp_path / "clean"), device="cpu")
    b = Encoder.load(str(tmp_path / "resumed"), device="cpu")
    assert a.fingerprint == b.fingerprint  # the resumed run ends with exactly the uninterrupted weights
    # a run with other settings never resumes a foreign checkpoint
    other = dict(kw, lr=5e-4)
    stats = T.train_encoder(
        Encoder.from_config(cfg), pairs, out_dir=tmp_path / "other", checkpoint_dir=ckpt, **other
    )
    assert stats["resumed_from"] is None


def test_train_command_uses_train_split_only_and_reindexes(tmp_path, monkeypatch):
    cfg, overrides, _ = _setup(
        tmp_path,
        40,
        extra=[
            "retriever.finetune.epochs=1",
            "retriever.finetune.batch_size=16",
            "retriever.finetune.lr=1e-3",
            "data.split=test",
        ],
    )
    store_dir = tmp_path / "run" / "store"
    train_questions = {ex.question for ex in load_qa(store_dir, "train")}
    held_out = {ex.question for ex in load_qa(store_dir, "test")} | {
        ex.question for ex in load_qa(store_dir, "dev")
    }
    assert train_questions and held_out

    seen = {}
    real = T.train_encoder

    def spy(encoder, pairs, **kw):
        seen["pairs"] = pairs
        return real(encoder, pairs, **kw)

    monkeypatch.setattr(T, "train_encoder", spy)
    assert T.main(overrides) == 0

    pairs = seen["pairs"]
    assert {p.question for p in pairs} <= train_questions and not {p.question for p in pairs} & held_out
    for p in pairs:  # negatives (and positives) come from train articles only
        for text in [p.positive, *p.negatives]:
            assert split_of(text.split("\n", 1)[0], cfg.seed) == "train"

    report = json.loads((tmp_path / "run" / "logs" / "retriever_train.json").read_text())
    assert report["eval_split"] == "test" and report["before"]["n"] == len(load_qa(store_dir, "test"))
    assert {"top1_accuracy", "top5_accuracy", "top20_accuracy", "mrr@10", "recall@5"} <= set(report["after"])
    assert report["train"]["steps"] >= 1 and report["infonce_loss_after"] < report["infonce_loss_before"]
    assert report["after_all_lists"] == report["after"]  # a Flat index: searching every list changes nothing
    # the index was rebuilt with the fine-tuned encoder, which `retriever.model=<run_dir>/retriever` loads
    manifest = read_manifest(tmp_path / "run" / "index")
    assert manifest["encoder"]["fingerprint"] == report["encoder_fingerprint"]
    tuned_cfg = load_config(None, [*overrides, f"retriever.model={tmp_path / 'run' / 'retriever'}"])
    assert len(Retriever.from_config(tuned_cfg).search("What is the capital of ?", 3)) == 3
    with pytest.raises(UserError, match="was built with encoder"):
        Retriever.from_config(cfg)  # the off-the-shelf encoder no longer matches the rebuilt index


def test_exhaustive_evaluation_searches_every_ivf_list(tmp_path):
    cfg, _, encoder = _setup(
        tmp_path, 60, extra=["index.factory=IVF{nlist},Flat", "index.nlist=8", "index.nprobe=1"]
    )
    store = SegmentStore.open(tmp_path / "run" / "store")
    examples = [ex for ex, _ in T.training_examples(tmp_path / "run" / "store")]
    ivf = T.retriever_over(cfg, encoder, store, tmp_path / "run", progress=False)
    flat_cfg = load_config(
        None, [f"run_dir={tmp_path / 'flat'}", "index.factory=Flat", f"retriever.model={cfg.retriever.model}"]
    )
    flat = T.retriever_over(flat_cfg, encoder, store, tmp_path / "flat", progress=False)
    exact = T.evaluate(flat, examples)
    assert T.evaluate_exhaustive(ivf, examples) == exact
    assert ivf.nprobe == 1  # restored
    assert T.evaluate(ivf, examples)["top20_accuracy"] < exact["top20_accuracy"]  # 1 of 8 lists misses some


def test_evaluate_command_reports_both_searches_and_never_rebuilds(tmp_path, capsys):
    from retriever import evaluate as E

    extra = ["index.factory=IVF{nlist},Flat", "index.nlist=8", "index.nprobe=1", "data.split=test"]
    cfg, overrides, encoder = _setup(tmp_path, 60, splits="test", extra=extra)
    store = SegmentStore.open(tmp_path / "run" / "store")
    ivf = T.retriever_over(cfg, encoder, store, tmp_path / "run", progress=False)
    examples = load_qa(tmp_path / "run" / "store", "test")
    assert E.main(overrides) == 0
    report = json.loads((tmp_path / "run" / "logs" / "retriever_eval.json").read_text())
    assert report["metrics"] == T.evaluate(ivf, examples) and report["metrics"]["n"] == len(examples)
    assert report["all_lists"] == T.evaluate_exhaustive(ivf, examples)
    assert "every list" in capsys.readouterr().out
    index_file = tmp_path / "run" / "index" / "index.faiss"
    built = index_file.stat().st_mtime_ns
    docs, _ = toy_documents(60)
    make_tiny_encoder(tmp_path / "other", words_of([d.title + " " + d.text for d in docs]), seed=1)
    with pytest.raises(UserError, match="was built with encoder"):
        E.main([*overrides, f"retriever.model={tmp_path / 'other'}"])
    assert index_file.stat().st_mtime_ns == built  # refused, not rebuilt


def test_train_command_refuses_training_split_for_evaluation(tmp_path):
    _, overrides, _ = _setup(tmp_path, 5, extra=["data.split=train"])
    with pytest.raises(UserError, match="data.split=dev or test"):
        T.main(overrides)
