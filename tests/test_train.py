"""qa.train on a tiny run: it learns, resumes exactly, and runs under `accelerate launch` with 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserError
from configs.loader import load_config
from qa.train import main as train_main
from tests.tiny_run import make_tiny_run

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = "train.systems=dynamic_prefix@p2,dynamic_prefix@pfull,static_prefix,rag_text_tuned"


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, smol_tokenizer):
    return make_tiny_run(tmp_path_factory.mktemp("train"), smol_tokenizer)


def run_train(cfg, *extra: str, resume: bool = False) -> Path:
    args = [f"run_dir={cfg.run_dir}", f"lm.model={cfg.lm.model}", f"retriever.model={cfg.retriever.model}",
            "index.factory=Flat", "knowledge_encoder.max_segment_tokens=96", "knowledge_encoder.format_slots=2",
            "train.static_slots=3", "train.batch_size=4", "train.eval_every=0", "train.dev_limit=4",
            "train.warmup_steps=1", "lm.max_new_tokens=4", "data.synthetic.n_entities=30", *extra]
    train_main(args + (["--resume"] if resume else []))
    # Later overrides win, so the last run_dir= is the one that was used.
    return Path([a for a in args if a.startswith("run_dir=")][-1].split("=", 1)[1])


def share_run_data(cfg, run_dir: Path) -> Path:
    """A fresh run_dir that reads the tiny run's store and index."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("store", "index"):
        os.symlink(Path(cfg.run_dir) / sub, run_dir / sub)
    return run_dir


def losses(run_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in (run_dir / "logs" / "train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for name, value in rec.get("loss", {}).items():
            out.setdefault(name, []).append(value)
    return out


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(checkpoint.glob("*/*.safetensors")):
        for key, value in load_file(str(f)).items():
            out[f"{f.parent.name}/{key}"] = value
    return out


def test_short_run_lowers_loss_and_writes_checkpoint(tiny_cfg):
    run_dir = run_train(tiny_cfg, SYSTEMS, "train.max_steps=8", "train.log_every=1", "train.lr=1e-2",
                        "train.max_train_questions=4")
    curves = losses(run_dir)
    assert set(curves) == {"dynamic_prefix@p2", "dynamic_prefix@pfull", "static_prefix", "rag_text_tuned"}
    for name, curve in curves.items():
        # One batch of 4 questions seen again and again: every system must fit it better and better.
        assert curve[-1] < curve[0] - 0.02 and curve[-1] < curve[len(curve) // 2], (name, curve)
    manifest = json.loads((run_dir / "checkpoints" / "final" / "manifest.json").read_text())
    assert set(manifest["systems"]) == set(curves)
    assert (run_dir / "logs" / "loss.png").is_file()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_cfg, tmp_path):
    share_run_data(tiny_cfg, tmp_path / "a")
    share_run_data(tiny_cfg, tmp_path / "b")
    straight = run_train(tiny_cfg, "train.systems=dynamic_prefix@p2,static_prefix", "train.max_steps=4",
                         f"run_dir={tmp_path / 'a'}")
    common = ("train.systems=dynamic_prefix@p2,static_prefix", f"run_dir={tmp_path / 'b'}")
    run_train(tiny_cfg, *common, "train.max_steps=4", "train.stop_at_step=3")  # interrupted after step 3
    resumed = run_train(tiny_cfg, *common, "train.max_steps=4", resume=True)
    a, b = weights(straight / "checkpoints" / "final"), weights(resumed / "checkpoints" / "final")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_a_continued_run_reads_the_batches_after_the_first_runs(tiny_cfg, tmp_path, monkeypatch):
    """train.data_start_step=N with train.init_from: step 1 of the continuation reads batch N + 1 of the order."""
    from qa.train import Trainer

    seen: list[list[int]] = []
    real_shard = Trainer._shard
    monkeypatch.setattr(Trainer, "_shard", lambda self, ids: seen.append(list(ids)) or real_shard(self, ids))
    common = ("train.systems=dynamic_prefix@p2",)
    first = run_train(tiny_cfg, *common, "train.max_steps=3", f"run_dir={share_run_data(tiny_cfg, tmp_path / 'a')}")
    straight = seen[:]
    seen.clear()
    run_train(tiny_cfg, *common, "train.max_steps=2", "train.data_start_step=1",
              f"train.init_from={first / 'checkpoints' / 'final'}", f"run_dir={share_run_data(tiny_cfg, tmp_path / 'b')}")
    assert len(straight) == 3 and seen == straight[1:]
    manifest = json.loads((tmp_path / "b" / "checkpoints" / "final" / "manifest.json").read_text())
    assert manifest["continues"] == {"init_from": str(first / "checkpoints" / "final"), "data_start_step": 1}


def test_untrainable_system_is_refused(tiny_cfg):
    with pytest.raises(UserError, match="nothing to train"):
        run_train(tiny_cfg, "train.systems=rag_text")


def test_gpu_recipe_config_loads_and_resolves_without_download():
    from configs.models import resolve_encoder_path, resolve_lm_path
    from qa.systems import parse_systems

    cfg = load_config(REPO / "configs" / "llama2-7b-nq.yaml")
    assert cfg.lm.model == "meta-llama/Llama-2-7b-hf" and cfg.retriever.model == "facebook/contriever-msmarco"
    assert resolve_lm_path(cfg.lm.model) == "meta-llama/Llama-2-7b-hf"  # a hub id passes through, no download
    assert resolve_encoder_path(cfg.retriever.model) == "facebook/contriever-msmarco"
    assert cfg.data.corpus.startswith("nq:") and cfg.knowledge_encoder.projection == "factored"
    parse_systems(cfg.train.systems)
    parse_systems(cfg.eval.systems)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_cfg, tmp_path):
    run_dir = share_run_data(tiny_cfg, tmp_path / "ddp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qa.train",
           f"run_dir={run_dir}", f"lm.model={tiny_cfg.lm.model}", f"retriever.model={tiny_cfg.retriever.model}",
           "index.factory=Flat", "knowledge_encoder.max_segment_tokens=96", "knowledge_encoder.format_slots=2",
           "train.systems=dynamic_prefix@p2,static_prefix", "train.static_slots=3", "train.batch_size=2",
           "train.max_steps=3", "train.eval_every=0", "train.dev_limit=2", "train.warmup_steps=1",
           "lm.max_new_tokens=2", "data.synthetic.n_entities=30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((run_dir / "checkpoints" / "final" / "manifest.json").read_text())
    assert manifest["step"] == 3 and set(manifest["systems"]) == {"dynamic_prefix@p2", "static_prefix"}


def test_prefix_store_serving_skips_the_backbone_and_answers_alike(tiny_cfg, tmp_path, monkeypatch):
    """Regression: answering from a prefix store still ran the frozen backbone over every segment."""
    from qa.batching import FeatureCache
    from qa.precompute import main as precompute_main
    from qa.system import QASystem

    run_dir = share_run_data(tiny_cfg, tmp_path / "served")
    run_train(tiny_cfg, f"run_dir={run_dir}", "train.systems=dynamic_prefix@p2", "train.max_steps=2",
              "train.max_train_questions=4")
    overrides = [f"run_dir={run_dir}", f"lm.model={tiny_cfg.lm.model}", f"retriever.model={tiny_cfg.retriever.model}",
                 "index.factory=Flat", "knowledge_encoder.max_segment_tokens=96", "knowledge_encoder.format_slots=2",
                 "lm.max_new_tokens=4", "data.synthetic.n_entities=30", "qa.mode=dynamic_prefix@p2"]
    cfg = load_config(None, overrides)
    questions = ["Who founded it?", "Where was it born?", "When?"]
    online = [p.prediction for p in QASystem.from_config(cfg).answer(questions)]

    precompute_main(overrides)
    served = QASystem.from_config(cfg)
    assert "dynamic_prefix@p2" in served.prefix_stores

    def no_backbone(*_args, **_kwargs):
        raise AssertionError("the backbone ran although the prefix store holds every segment")

    monkeypatch.setattr(FeatureCache, "get", no_backbone)
    predictions = served.answer(questions)
    assert [p.prediction for p in predictions] == online
    assert all(p.prefix_slots > 0 for p in predictions)
