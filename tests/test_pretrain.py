"""qa.pretrain: continuation distillation on a tiny run lowers its KL, resumes exactly, and starts qa.train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserError
from knowledge_encoder.backbones import LMBackbone
from lm.prompting import PromptTemplate, TextSegment
from qa.pretrain import main as pretrain_main
from qa.train import main as train_main
from tests.tiny_run import make_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, smol_tokenizer):
    return make_tiny_run(tmp_path_factory.mktemp("pretrain"), smol_tokenizer)


def args(cfg, run_dir, *extra):
    return [f"run_dir={run_dir}", f"lm.model={cfg.lm.model}", f"retriever.model={cfg.retriever.model}",
            "knowledge_encoder.max_segment_tokens=96", "knowledge_encoder.format_slots=2",
            "knowledge_encoder.pool_rope=pre", "pretrain.system=dynamic_prefix@p3", "pretrain.batch_size=4",
            "pretrain.warmup_steps=1", "pretrain.log_every=1", "pretrain.continuation_tokens=16", *extra]


def share(cfg, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("store", "index"):
        (run_dir / sub).symlink_to(Path(cfg.run_dir) / sub)
    return run_dir


def kls(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "logs" / "pretrain.jsonl").read_text().splitlines()]
    return [row["kl"] if "kl" in row else row["ce"] for row in rows]


def test_distillation_loss_is_zero_when_the_student_is_the_teacher(smol_tokenizer, tiny_llama):
    """P >= context length with the select compressor keeps every K,V: the student reads what the teacher reads."""
    from configs.schema import KnowledgeEncoderConfig, PretrainConfig
    from knowledge_encoder.encoder import KnowledgeEncoder
    from qa.pretrain import cut_segments, distillation_loss

    template = PromptTemplate(smol_tokenizer)
    segs = [TextSegment("Kaive", "Kaive is a city on the river Ostra, founded by fishermen long ago. " * 2)]
    feats = LMBackbone(tiny_llama, template, 96, scores="kvzip").features(segs)
    rows, split = cut_segments(feats, torch.tensor([0.5]), PretrainConfig(min_context_tokens=4))
    enc = KnowledgeEncoder(KnowledgeEncoderConfig(prefix_slots=96, compressor="select", format_slots=0),
                           tiny_llama.config)
    loss = distillation_loss(tiny_llama, enc, feats, split, 0, 1.0)
    assert rows == [0] and loss.item() < 1e-6
    # Two pooled slots cannot carry 19 tokens: the KL is small on a tiny random LM (near-uniform logits; the
    # slot bias keeps the attention mass) but well above the select path's float noise.
    pooled = KnowledgeEncoder(KnowledgeEncoderConfig(prefix_slots=2, format_slots=0), tiny_llama.config)
    assert distillation_loss(tiny_llama, pooled, feats, split, 0, 1.0).item() > max(10 * loss.item(), 1e-6)


def test_pretrain_lowers_kl_resumes_and_initialises_qa_training(tiny_cfg, tmp_path):
    run = share(tiny_cfg, tmp_path / "a")
    pretrain_main(args(tiny_cfg, run, "pretrain.max_steps=12", "pretrain.lr=3e-2", "pretrain.save_every=0"))
    curve = kls(run)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    final = run / "pretrain" / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert list(manifest["systems"]) == ["dynamic_prefix@p3"] and manifest["step"] == 12

    # Stopped after 4 steps and resumed to 6 = 6 steps straight.
    straight = share(tiny_cfg, tmp_path / "b")
    pretrain_main(args(tiny_cfg, straight, "pretrain.max_steps=6", "pretrain.save_every=0"))
    parts = share(tiny_cfg, tmp_path / "c")
    pretrain_main(args(tiny_cfg, parts, "pretrain.max_steps=6", "pretrain.stop_at_step=4", "pretrain.save_every=2"))
    assert not (parts / "pretrain" / "final").exists()
    pretrain_main(args(tiny_cfg, parts, "pretrain.max_steps=6", "pretrain.save_every=2") + ["--resume"])
    a = load_file(str(straight / "pretrain" / "final" / "dynamic_prefix@p3" / "knowledge_encoder.safetensors"))
    b = load_file(str(parts / "pretrain" / "final" / "dynamic_prefix@p3" / "knowledge_encoder.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key])

    # qa.train starts the same-named system from it.
    qa_run = share(tiny_cfg, tmp_path / "d")
    train_main(args(tiny_cfg, qa_run, "train.systems=dynamic_prefix@p3", "train.max_steps=1", "train.eval_every=0",
                    "train.batch_size=4", "train.dev_limit=4", "train.warmup_steps=1", "train.lr=1e-12",
                    "lm.max_new_tokens=2", f"train.init_from={final}"))
    pre = load_file(str(final / "dynamic_prefix@p3" / "knowledge_encoder.safetensors"))
    after = load_file(str(qa_run / "checkpoints" / "final" / "dynamic_prefix@p3" / "knowledge_encoder.safetensors"))
    torch.testing.assert_close(after["pool.queries"], pre["pool.queries"], atol=1e-6, rtol=0)
    assert pre["pool.queries"].abs().sum() > 0


def test_pretrain_gives_the_pooling_its_lr_scale_and_starts_from_a_full_length_encoder(tiny_cfg, tmp_path):
    """Regression: qa.pretrain once put every parameter at pretrain.lr, so its pooling queries learnt at a tenth of
    what qa.train gives them; and it could not start from a trained P = n encoder (pretrain.init_from)."""
    from accelerate import Accelerator

    from configs.cli import build_parser, parse
    from qa.pretrain import Pretrainer

    full = share(tiny_cfg, tmp_path / "full")
    train_main(args(tiny_cfg, full, "train.systems=dynamic_prefix@pfull", "train.max_steps=1", "train.eval_every=0",
                    "train.batch_size=4", "train.dev_limit=4", "train.warmup_steps=1", "lm.max_new_tokens=2"))
    source = full / "checkpoints" / "final"
    run = share(tiny_cfg, tmp_path / "f")
    cfg, _ = parse(build_parser("qa.pretrain", ""), args(tiny_cfg, run, "pretrain.lr=1e-3", "train.pool_lr_scale=7",
                                                      f"pretrain.init_from={source}:dynamic_prefix@pfull"))
    trainer = Pretrainer(cfg, Accelerator(cpu=True))
    rates = sorted(group["lr"] for group in trainer.opt.optimizer.param_groups)
    assert rates == pytest.approx([1e-3, 7e-3])
    heads = load_file(str(source / "dynamic_prefix@pfull" / "knowledge_encoder.safetensors"))
    mine = trainer.acc.unwrap_model(trainer.model).encoder.state_dict()
    shared = [k for k in heads if k in mine]
    assert shared and all(torch.equal(mine[k], heads[k]) for k in shared)
    with pytest.raises(UserError, match="pretrain.init_from="):
        bad, _ = parse(build_parser("qa.pretrain", ""), args(tiny_cfg, run, f"pretrain.init_from={source}:rag_text"))
        Pretrainer(bad, Accelerator(cpu=True))


def test_pretrain_refuses_a_full_length_system_and_bad_fractions(tiny_cfg, tmp_path):
    run = share(tiny_cfg, tmp_path / "e")
    with pytest.raises(UserError, match="nothing to compress"):
        pretrain_main(args(tiny_cfg, run, "pretrain.system=dynamic_prefix@pfull"))
    with pytest.raises(UserError, match="context_fraction"):
        pretrain_main(args(tiny_cfg, run, "pretrain.context_fraction=[0.9,0.2]"))
    with pytest.raises(UserError, match="dynamic_prefix"):
        pretrain_main(args(tiny_cfg, run, "pretrain.system=rag_text_tuned"))


def test_resume_refuses_a_damaged_training_state(tiny_cfg, tmp_path):
    """Regression: a flipped byte in a saved optimizer/model state was loaded by --resume without a word."""
    run = share(tiny_cfg, tmp_path / "g")
    pretrain_main(args(tiny_cfg, run, "pretrain.max_steps=4", "pretrain.stop_at_step=2", "pretrain.save_every=2"))
    state = run / "pretrain" / "state"
    saved = json.loads((state / "pretrainer_state.json").read_text())
    assert saved["sha256"] and "pretrainer_state.json" not in saved["sha256"]
    victim = state / sorted(name for name in saved["sha256"] if name.endswith(".safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match="training state is damaged"):
        pretrain_main(args(tiny_cfg, run, "pretrain.max_steps=4", "pretrain.save_every=2") + ["--resume"])
    (state / "pretrainer_state.json").write_text('{"step": 2, "sec')
    with pytest.raises(UserError, match="corrupt training state"):
        pretrain_main(args(tiny_cfg, run, "pretrain.max_steps=4", "pretrain.save_every=2") + ["--resume"])


def test_reconstruction_loss_is_lowest_with_the_segment_itself_and_falls_in_training(smol_tokenizer, tiny_cfg,
                                                                                       tmp_path):
    """objective=reconstruct: restating a segment is easier after its own K,V than after two pooled slots, and
    a short qa.pretrain run with it lowers its loss."""
    from configs.models import load_lm
    from configs.schema import KnowledgeEncoderConfig
    from knowledge_encoder.encoder import KnowledgeEncoder
    from knowledge_encoder.kvzip import REPEAT_PROMPT
    from qa.pretrain import reconstruction_loss

    lm, _ = load_lm(tiny_cfg.lm.model, None, "cpu", "float32")
    template = PromptTemplate(smol_tokenizer)
    segs = [TextSegment("Kaive", "Kaive is a city on the river Ostra, founded by fishermen long ago. " * 2)]
    feats = LMBackbone(lm, template, 96, scores="kvzip").features(segs)
    repeat = smol_tokenizer(REPEAT_PROMPT, add_special_tokens=False)["input_ids"]
    full = KnowledgeEncoder(KnowledgeEncoderConfig(prefix_slots=96, compressor="select", format_slots=0), lm.config)
    pooled = KnowledgeEncoder(KnowledgeEncoderConfig(prefix_slots=2, format_slots=0), lm.config)
    with torch.no_grad():
        own = reconstruction_loss(lm, full, feats, repeat, 96, 0).item()
        two = reconstruction_loss(lm, pooled, feats, repeat, 96, 0).item()
    assert own < two, (own, two)

    run = share(tiny_cfg, tmp_path / "r")
    pretrain_main(args(tiny_cfg, run, "pretrain.objective=reconstruct", "pretrain.max_steps=12", "pretrain.lr=3e-2",
                       "pretrain.save_every=0"))
    curve = kls(run)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
