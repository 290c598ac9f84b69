"""train.joint_retriever: the marginal likelihood, its gradients, the retriever update, checkpoints, resume, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserError
from configs.loader import load_config
from lm.prompting import TextSegment
from qa.batching import Example
from qa.joint_retriever import (
    JointRetriever,
    candidate_logprobs,
    marginal_nll,
    single_segment_examples,
)
from qa.model import IGNORE, answer_ce, answer_logprob
from tests.test_train import run_train, share_run_data
from tests.tiny_run import make_tiny_run

JOINT = ("retriever.top_k=3", "train.joint_retriever=true", "train.retriever_lr=1e-3")


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, smol_tokenizer):
    return make_tiny_run(tmp_path_factory.mktemp("joint"), smol_tokenizer)


def trainer_for(cfg, run_dir: Path, *overrides: str):
    """A Trainer (single CPU process) on the tiny run's store and index in a fresh `run_dir`."""
    from accelerate import Accelerator

    from qa.train import Trainer

    share_run_data(cfg, run_dir)
    c = load_config(None, [f"run_dir={run_dir}", f"lm.model={cfg.lm.model}", f"retriever.model={cfg.retriever.model}",
                           "index.factory=Flat", "knowledge_encoder.max_segment_tokens=96",
                           "knowledge_encoder.format_slots=2", "train.static_slots=3", "train.batch_size=4",
                           "train.eval_every=0", "train.dev_limit=4", "train.warmup_steps=1", "train.max_steps=4",
                           "lm.max_new_tokens=4", "data.synthetic.n_entities=30", *overrides])
    return Trainer(c, Accelerator(cpu=True))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


# ---------------------------------------------------------------------------------------------- the loss


def test_marginal_nll_equals_minus_log_sum_of_prior_times_likelihood():
    # Two questions, three candidates. Scores chosen so p(z|x) at temperature 0.5 is known in closed form.
    scores = torch.tensor([[0.0, 0.5 * math.log(2.0), 0.5 * math.log(5.0)],
                           [1.0, 1.0, 1.0]], requires_grad=True)
    prior = torch.tensor([[1 / 8, 2 / 8, 5 / 8], [1 / 3, 1 / 3, 1 / 3]])
    likelihood = torch.tensor([[0.5, 0.1, 0.02], [0.2, 0.3, 0.4]])  # p(y|x,z)
    loss = marginal_nll(scores, likelihood.log(), temperature=0.5)
    by_hand = -0.5 * (math.log(1 / 8 * 0.5 + 2 / 8 * 0.1 + 5 / 8 * 0.02) + math.log((0.2 + 0.3 + 0.4) / 3))
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    # Not the expected log-likelihood sum_z p(z|x) log p(y|x,z) (a lower bound that trains differently).
    assert loss.item() != pytest.approx(-(prior * likelihood.log()).sum(-1).mean().item(), rel=1e-2)
    # d loss / d s = (p(z|x) - p(z|x,y)) / (temperature * B): mass moves to the candidates that explain y.
    loss.backward()
    posterior = prior * likelihood / (prior * likelihood).sum(-1, keepdim=True)
    torch.testing.assert_close(scores.grad, (prior - posterior) / (0.5 * 2), rtol=1e-5, atol=1e-7)
    assert scores.grad[0, 0] < 0 < scores.grad[0, 2]


def test_marginal_nll_does_not_underflow():
    loss = marginal_nll(torch.zeros(1, 2), torch.tensor([[-2000.0, -2001.0]]), temperature=1.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2000 + math.log(2) - math.log(1 + math.exp(-1)))


def test_answer_logprob_sums_the_tokens_that_answer_ce_averages():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)  # the last 5 positions of (3, 8) prompts+answers
    labels = torch.full((3, 8), IGNORE)
    labels[0, -4:] = torch.tensor([1, 2, 3, 4])
    labels[1, -2:] = torch.tensor([5, 6])
    labels[2, -3:] = torch.tensor([7, 8, 9])
    per_row = answer_logprob(logits, labels)
    assert per_row.shape == (3,)
    assert (-per_row.sum() / 9).item() == pytest.approx(answer_ce(logits, labels).item(), rel=1e-5)
    by_hand = logits[1, 2].log_softmax(-1)[5] + logits[1, 3].log_softmax(-1)[6]
    assert per_row[1].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_single_segment_examples_are_question_major():
    ex = [Example(f"q{b}", [TextSegment(f"t{b}{z}", "x") for z in range(3)], [10 * b + z for z in range(3)], ["a"])
          for b in range(2)]
    flat = single_segment_examples(ex)
    assert [(e.question, e.segment_ids) for e in flat] == [(f"q{i // 3}", [10 * (i // 3) + i % 3]) for i in range(6)]
    assert all(len(e.segments) == 1 for e in flat) and len(ex[0].segments) == 3  # inputs untouched


# ---------------------------------------------------------------------------------------------- retriever side


def test_retriever_moves_prior_mass_to_the_candidate_the_reader_prefers(tiny_cfg):
    """With a reader that explains the answer only by candidate 0, training raises p(z=0|x) (and only the
    question side has gradients). Fails if the loss's sign, the softmax axis or the gradient path is wrong."""
    from data_prep.store import SegmentStore
    from retriever.encoder import Encoder

    enc = Encoder.from_config(tiny_cfg, dtype="float32")
    joint = JointRetriever.from_encoder(enc, tiny_cfg, "cpu")
    store = SegmentStore.open(Path(tiny_cfg.run_dir) / "store")
    segs = [TextSegment(s.title, s.text) for s in store.get_many(list(range(12)))]
    examples = [Example(f"What is the capital of place {b}?", segs[3 * b:3 * b + 3], [3 * b, 3 * b + 1, 3 * b + 2],
                        ["x"]) for b in range(4)]
    reader = torch.tensor([[0.0, -6.0, -6.0]]).expand(4, 3)  # log p(y|x,z): only z=0 explains y
    opt = torch.optim.AdamW(joint.parameters(), lr=1e-3)
    emb = joint.segment_embeddings(examples)
    assert emb.shape == (4, 3, enc.dim) and not emb.requires_grad

    def prior0() -> float:
        with torch.no_grad():
            joint.model.eval()
            q = joint._embed([ex.question for ex in examples])
            return (torch.einsum("bd,bkd->bk", q, emb) / joint.temperature).softmax(-1)[:, 0].mean().item()

    start = prior0()
    for _ in range(15):
        loss = marginal_nll(joint.scores(examples, emb), reader, joint.temperature)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert prior0() > start + 0.2, (start, prior0())


# ---------------------------------------------------------------------------------------------- in the trainer


def test_trainer_step_updates_retriever_only_when_joint(tiny_cfg, tmp_path):
    systems = "train.systems=dynamic_prefix@p2,rag_text_tuned,static_prefix"
    on = trainer_for(tiny_cfg, tmp_path / "on", systems, *JOINT)
    off = trainer_for(tiny_cfg, tmp_path / "off", systems, "retriever.top_k=3")
    assert off.joint is None and on.joint is not None
    r_on, r_off = snapshot(on.retriever.encoder.model), snapshot(off.retriever.encoder.model)
    for key in r_on:
        torch.testing.assert_close(r_on[key], r_off[key])  # the same retriever to start with
    enc0 = snapshot(on.models["dynamic_prefix@p2"].encoder)
    torch.testing.assert_close(enc0, snapshot(off.models["dynamic_prefix@p2"].encoder))

    on.train_step()
    off.train_step()
    moved = changed(r_on, on.retriever.encoder.model)
    assert any("word_embeddings" in k for k in moved) and any("encoder.layer" in k for k in moved), moved
    assert changed(r_off, off.retriever.encoder.model) == []
    # The joint term belongs to the systems that retrieve, and trains their knowledge encoder / prefix too.
    assert set(on.joint_losses) == {"dynamic_prefix@p2", "rag_text_tuned"}
    assert all(math.isfinite(v) and v > 0 for v in on.joint_losses.values())
    assert on.joint_stats["grad_norm"] > 0
    enc_on, enc_off = on.models["dynamic_prefix@p2"].encoder, off.models["dynamic_prefix@p2"].encoder
    assert changed(enc0, enc_on) and changed(enc0, enc_off)
    assert any(not torch.equal(a, b) for a, b in zip(enc_on.state_dict().values(), enc_off.state_dict().values()))
    # static_prefix reads no segment: the joint mode leaves its update exactly as without it.
    for a, b in zip(on.models["static_prefix"].state_dict().values(), off.models["static_prefix"].state_dict().values()):
        torch.testing.assert_close(a, b)


def test_candidate_logprobs_row_is_the_system_reading_that_segment_alone(tiny_cfg, tmp_path):
    trainer = trainer_for(tiny_cfg, tmp_path / "rows", "train.systems=dynamic_prefix@p2,rag_text_tuned", *JOINT)
    chunk = trainer.train_examples[:3]
    for name, model in trainer.models.items():
        model.eval()
        with torch.no_grad():
            table = candidate_logprobs(model, trainer.batcher, model.system, chunk)
            assert table.shape == (3, 3)
            for b in (0, 2):
                for z in range(3):
                    one = single_segment_examples([chunk[b]])[z]
                    batch = trainer.batcher.build([one], model.system, with_labels=True)
                    alone = model(batch, sequence_logprob=True)[1]
                    torch.testing.assert_close(table[b, z], alone[0], rtol=1e-4, atol=1e-4, msg=f"{name} {b} {z}")


def test_refusals(tiny_cfg):
    with pytest.raises(UserError, match=r"top_k >= 2 .*no gradient"):
        run_train(tiny_cfg, "train.systems=dynamic_prefix@p2", "retriever.top_k=1", "train.joint_retriever=true")
    with pytest.raises(UserError, match="none of train.systems"):
        run_train(tiny_cfg, "train.systems=static_prefix", "retriever.top_k=3", "train.joint_retriever=true")
    with pytest.raises(UserError, match="retriever_lr must be > 0"):
        run_train(tiny_cfg, "train.systems=dynamic_prefix@p2", *JOINT, "train.retriever_lr=0")


def test_checkpoint_holds_a_loadable_retriever_and_resume_is_exact(tiny_cfg, tmp_path):
    from sentence_transformers import SentenceTransformer

    from retriever.encoder import Encoder

    common = ("train.systems=dynamic_prefix@p2,rag_text_tuned", *JOINT, "train.max_steps=3", "train.log_every=1")
    straight = run_train(tiny_cfg, *common, f"run_dir={share_run_data(tiny_cfg, tmp_path / 'a')}")
    final = straight / "checkpoints" / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    info = manifest["joint_retriever"]
    assert info["folder"] == "retriever" and info["index_stale"] and info["base_model"] == tiny_cfg.retriever.model
    model = SentenceTransformer(str(final / "retriever"), device="cpu")
    assert model.encode(["Who leads it?"]).shape == (1, model.get_embedding_dimension())
    trained = Encoder.load(str(final / "retriever"), device="cpu")
    original = Encoder.load(tiny_cfg.retriever.model, device="cpu")
    assert trained.fingerprint == info["fingerprint"] != original.fingerprint
    log = [json.loads(line) for line in (straight / "logs" / "train.jsonl").read_text().splitlines()]
    assert set(log[0]["joint_loss"]) == {"dynamic_prefix@p2", "rag_text_tuned"} and "retriever" in log[0]

    # Interrupted after step 2, resumed: the same retriever and knowledge encoder as the uninterrupted run.
    b = share_run_data(tiny_cfg, tmp_path / "b")
    run_train(tiny_cfg, *common, f"run_dir={b}", "train.stop_at_step=2")
    with pytest.raises(UserError, match="joint_retriever=true"):
        run_train(tiny_cfg, "train.systems=dynamic_prefix@p2,rag_text_tuned", "retriever.top_k=3",
                  "train.max_steps=3", f"run_dir={b}", resume=True)
    resumed = run_train(tiny_cfg, *common, f"run_dir={b}", resume=True) / "checkpoints" / "final"
    for sub in ("retriever/model.safetensors", "dynamic_prefix@p2/knowledge_encoder.safetensors"):
        x, y = load_file(str(final / sub)), load_file(str(resumed / sub))
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=1e-5, msg=f"{sub}:{key}")


def test_without_joint_the_checkpoint_has_no_retriever(tiny_cfg, tmp_path):
    run_dir = run_train(tiny_cfg, "train.systems=dynamic_prefix@p2", "retriever.top_k=2", "train.max_steps=1",
                        f"run_dir={share_run_data(tiny_cfg, tmp_path / 'off')}")
    final = run_dir / "checkpoints" / "final"
    assert json.loads((final / "manifest.json").read_text())["joint_retriever"] is None
    assert not (final / "retriever").exists()


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_joint(tiny_cfg, tmp_path):
    """The retriever's gradients are averaged over processes by hand (it is not DDP-wrapped)."""
    import os
    import subprocess
    import sys

    from tests.test_train import REPO

    run_dir = share_run_data(tiny_cfg, tmp_path / "ddp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qa.train",
           f"run_dir={run_dir}", f"lm.model={tiny_cfg.lm.model}", f"retriever.model={tiny_cfg.retriever.model}",
           "index.factory=Flat", "knowledge_encoder.max_segment_tokens=96", "knowledge_encoder.format_slots=2",
           "train.systems=dynamic_prefix@p2,rag_text_tuned", "train.static_slots=3", "train.batch_size=2",
           "train.max_steps=2", "train.eval_every=0", "train.dev_limit=2", "train.warmup_steps=1",
           "lm.max_new_tokens=2", "data.synthetic.n_entities=30", *JOINT]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = run_dir / "checkpoints" / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["joint_retriever"]["folder"] == "retriever"
    assert (final / "retriever" / "model.safetensors").is_file()
