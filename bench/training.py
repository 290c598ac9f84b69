"""Section 4, training throughput: examples/s and peak memory of one `qa.train` step per system.

A step is what `qa.train.Trainer.train_step` does for one system: build the batch from the feature
cache, `PrefixQAModel.forward` (with the teacher pass of a compressed dynamic prefix when the config's
distillation is on), backward through the frozen LM, AdamW step, zero_grad. Batch = `train.batch_size`
questions with `retriever.top_k` segments each. Segment features (the frozen LM's K,V) are cached before
timing, as they are after the first epoch of training.

Segments are `bench.train_segment_tokens` LM tokens long (288 by default: the window length of the
design), built from the store's real text by appending the following segments and cutting at a word
boundary; the actual mean n is reported (P = pfull reads all n). Systems start untrained
(`qa.checkpoint.new_model`): throughput depends on shapes, not on weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from bench.common import autocast, load_lm_template, questions, summary
from bench.machine import PeakRSS, release_free_memory
from data_prep.store import SegmentStore
from lm.prompting import TextSegment
from qa.batching import Batcher, Example, FeatureCache
from qa.systems import parse_system

log = logging.getLogger(__name__)


def long_segment(store: SegmentStore, template, start_id: int, tokens: int) -> TextSegment:
    """A segment of at most `tokens` LM tokens (title line included), as close to it as word boundaries allow.

    Text: segment `start_id` followed by the next segments of the store (wrapping around).
    """
    first = store.get(start_id)
    words: list[str] = []
    sid = start_id
    while True:
        words.extend(store.get(sid).text.split())
        if len(template.segment_ids(TextSegment(first.title, " ".join(words)), 10**9)) >= tokens:
            break
        sid = (sid + 1) % len(store)
        if sid == start_id:  # the whole store is shorter than one segment: use all of it
            break

    def length(n: int) -> int:
        return len(template.segment_ids(TextSegment(first.title, " ".join(words[:n])), 10**9))

    lo, hi = 0, len(words)  # the largest word count whose token length fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(mid) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return TextSegment(first.title, " ".join(words[:lo]))


def make_examples(cfg, template, batch_size: int, k: int, tokens: int) -> list[Example]:
    """`batch_size` training questions, each with its gold segment (and the next k-1) stretched to `tokens`."""
    store = SegmentStore.open(Path(cfg.run_dir) / "store")
    out = []
    for ex in questions(cfg, "train", batch_size):
        start = int(ex.gold_segment_ids[0]) if ex.gold_segment_ids else 0
        ids = [(start + j) % len(store) for j in range(k)]
        segs = [long_segment(store, template, i, tokens) for i in ids]
        out.append(Example(ex.question, segs, ids, list(ex.answers), ex.id))
    return out


def time_system(
    cfg, name: str, lm, template, batcher: Batcher, examples: list[Example], steps: int, warmup: int
) -> dict:
    """Warm-up then `steps` timed training steps of one freshly initialised system.

    Peak memory covers the model, its optimizer state and every step (warm-up included: the first step
    allocates the most), above the RSS of the LM and the cached features.
    """
    from qa.checkpoint import new_model

    system = parse_system(name)
    device = next(lm.parameters()).device
    release_free_memory()
    with PeakRSS() as mem:
        torch.manual_seed(cfg.seed)
        model = new_model(system, cfg, lm, template, batcher.cache.backbone.feature_dim).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

        def step() -> float:
            t0 = time.perf_counter()
            batch = batcher.build(examples, system, with_labels=True)
            with autocast(cfg):
                _, loss = model(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {loss.item()}")
            return time.perf_counter() - t0

        for _ in range(warmup):
            step()
        times = [step() for _ in range(steps)]
    with torch.no_grad():
        batch = batcher.build(examples, system, with_labels=True)
        prefix = model.prefix(batch)
    mean = sum(times) / len(times)
    result = {
        "examples_per_s": round(len(examples) / mean, 2),
        "step_s": summary(times, 3),
        "memory": mem.as_dict(),
        "prefix_slots": 0 if prefix is None else round(float(prefix.mask.sum(1).float().mean()), 1),
        "prompt_tokens": round(float(batch.attention_mask.sum(1).float().mean()), 1),
        "segment_tokens": None
        if batch.features is None
        else round(float(batch.features.mask.sum(1).float().mean()), 1),
        "teacher_pass": bool(model.distills),
        "trainable_parameters": sum(p.numel() for p in params),
    }
    return result  # the model and its optimizer state are freed with this frame


def run(cfg) -> dict:
    """The section's numbers (JSON-ready); see the module docstring."""
    from knowledge_encoder.backbones import build_backbone

    b = cfg.bench
    t_start = time.perf_counter()
    lm, _, template = load_lm_template(cfg)
    device = next(lm.parameters()).device
    kcfg = cfg.knowledge_encoder
    if b.train_segment_tokens > kcfg.max_segment_tokens:
        raise ValueError(
            f"bench.train_segment_tokens={b.train_segment_tokens} exceeds "
            f"knowledge_encoder.max_segment_tokens={kcfg.max_segment_tokens}"
        )
    k = max(1, cfg.retriever.top_k)
    examples = make_examples(cfg, template, cfg.train.batch_size, k, b.train_segment_tokens)
    backbone = build_backbone(kcfg, lm, template, cfg.retriever.model, device)
    cache = FeatureCache(backbone, max_bytes=int(cfg.train.feature_cache_gb * (1 << 30)))
    batcher = Batcher(template, cache, device)
    cache.get([s for ex in examples for s in ex.segments], device)  # features cached before timing
    n = [len(template.segment_ids(s, kcfg.max_segment_tokens)) for ex in examples for s in ex.segments]
    systems = {}
    for name in b.train_systems:
        log.info("timing qa.train steps of %s", name)
        systems[name] = time_system(cfg, name, lm, template, batcher, examples, b.train_steps, b.train_warmup)
        release_free_memory()
    return {
        "systems": systems,
        "batch_size": cfg.train.batch_size,
        "k": k,
        "segment_tokens_mean": round(sum(n) / len(n), 1),
        "segment_tokens_min_max": [min(n), max(n)],
        "steps": b.train_steps,
        "warmup_steps": b.train_warmup,
        "distill_weight": cfg.train.distill_weight if cfg.train.teacher == "pfull" else 0.0,
        "autocast_bf16": cfg.lm.autocast_bf16,
        "weights": "freshly initialised (untrained) systems: throughput depends on shapes only",
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def to_markdown(r: dict) -> str:
    lines = [
        f"One `qa.train` step (batch build from the feature cache, forward, backward through the frozen LM, AdamW) "
        f"at batch {r['batch_size']}, k = {r['k']}, on segments of {r['segment_tokens_mean']} LM tokens on average "
        f"(min/max {r['segment_tokens_min_max'][0]}/{r['segment_tokens_min_max'][1]}); {r['warmup_steps']} warm-up "
        f"+ {r['steps']} timed steps per system; {r['weights']}. A compressed dynamic prefix also runs its P = n "
        f"teacher pass when distillation is on (distill weight {r['distill_weight']}), as qa.train does.",
        "",
        "| system | prefix slots / question | prompt tokens | teacher pass | examples/s | step s (median) "
        "| peak RSS MB | peak above the LM + cached features MB | trainable params |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, d in r["systems"].items():
        m = d["memory"]
        lines.append(
            f"| {name} | {d['prefix_slots']:g} | {d['prompt_tokens']:g} | {'yes' if d['teacher_pass'] else 'no'} "
            f"| {d['examples_per_s']} | {d['step_s']['median']} | {m['peak_rss_mb']:,} | "
            f"{m['peak_over_before_mb']:,} | {d['trainable_parameters']:,} |"
        )
    return "\n".join(lines)
