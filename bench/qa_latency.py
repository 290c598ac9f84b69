"""Section 3, QA latency: time to first token and total per question for closed_book, rag_text and the
dynamic prefix (computed online, or read from a prefix store) at k = 1, 3, 5.

Fair by construction:
- every system reads the same retrieved segments (one top-max(k) search per question, its first k
  used), so retrieval time (reported separately, dense and BM25 hybrid side by side) is left out of
  every total;
- every system generates exactly `bench.qa_answer_tokens` tokens (no stop token), greedily, with the
  KV cache (`lm.generate.greedy_generate`), at the same batch size, after untimed warm-up batches;
- the systems are interleaved question by question in a rotating order, so a load change on a shared
  machine hits them all alike.

A measurement starts before the prompt is tokenized and ends when the last token is out:
  closed_book / rag_text   tokenize -> LM prefill (+ the k segments as text for rag_text) -> decode
  dynamic, online          tokenize -> the LM's K,V of the k segments (backbone) -> knowledge encoder ->
                           prefill after the prefix -> decode
  dynamic, precomputed     tokenize -> read k prefixes from the prefix store -> prefill -> decode
Time to first token is when `greedy_generate` emits the first token (after the prefill).

The dynamic systems are freshly initialised (`qa.checkpoint.new_model`), or, with `bench.qa_checkpoint`, read
from a trained checkpoint (a compressed encoder's latency depends on its shapes, P, k, L and heads, and on
what it computes, e.g. an encode adapter, not on the trained values). The prefix store is built for the benchmark in
`bench.work_dir` from that untrained checkpoint, over the segments the timed questions retrieve (a
subset store: precomputing every segment of the corpus is a separate, longer job).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from bench.common import autocast, load_lm_template, questions, summary
from configs.loader import config_from_dict, to_dict
from data_prep.store import SegmentStore, write_store
from lm.generate import StopTokens, greedy_generate
from lm.prompting import TextSegment
from qa.batching import Batcher, Example
from qa.systems import parse_system

log = logging.getLogger(__name__)

RATIO_GOAL = 0.5
GOAL = f"dynamic_prefix (precomputed) total <= {RATIO_GOAL} x rag_text total at k = 5"


class FreshFeatures:
    """A Batcher feature source that runs the backbone every time (the online path, no cache)."""

    def __init__(self, backbone):
        self.backbone = backbone

    def get(self, segments, device):
        return self.backbone.features(list(segments)).to(device, torch.float32)


class NoFeatures:
    """For the precomputed path: the prefix comes from the store, so no backbone features are made."""

    def get(self, segments, device):
        return None


@dataclasses.dataclass
class Variant:
    """One timed configuration: a system at k, with how its prefix is made."""

    label: str  # e.g. "rag_text", "dynamic_prefix (online)"
    system: str  # system name for parse_system
    k: int
    source: str  # "none" | "online" | "precomputed"


def bench_cfg(cfg):
    """A copy of `cfg` whose run_dir is the bench's own work dir (store subset, checkpoint, prefixes)."""
    data = to_dict(cfg)
    data["run_dir"] = cfg.bench.work_dir
    data["qa"]["checkpoint"] = None
    return config_from_dict(data, "bench work config")


def build_prefix_store(cfg, lm, template, models: dict, segment_ids: list[int], progress: bool = True):
    """Subset store + untrained checkpoint + precomputed prefixes in bench.work_dir.

    Returns ({original segment id -> subset id}, {system -> PrefixStore}, report). Re-running with the same
    segments and weights reuses the finished prefix store (precompute checks its fingerprints).
    """
    from knowledge_encoder.prefix_store import PrefixStore, prefix_dir
    from qa.checkpoint import encoder_sha256, save_checkpoint
    from qa.precompute import precompute

    wcfg = bench_cfg(cfg)
    work = Path(wcfg.run_dir)
    source = SegmentStore.open(Path(cfg.run_dir) / "store")
    ids = sorted(set(int(i) for i in segment_ids))
    mapping = {orig: new for new, orig in enumerate(ids)}
    subset = [dataclasses.replace(s, segment_id=mapping[s.segment_id]) for s in source.get_many(ids)]
    t0 = time.perf_counter()
    write_store(
        work / "store",
        subset,
        manifest_extra={
            "source_store": str(source.path),
            "source_fingerprint": source.fingerprint,
            "source_segment_ids": ids,
        },
    )
    checkpoint = work / "checkpoints" / "final"
    note = f"copied from {cfg.bench.qa_checkpoint}" if cfg.bench.qa_checkpoint else "untrained"
    save_checkpoint(checkpoint, models, wcfg, lm.config, {"note": f"{note}, for latency benchmarks only"})
    report = precompute(wcfg, list(models), progress=progress)
    store_fp = SegmentStore.open(work / "store").fingerprint
    stores = {
        name: PrefixStore.open(prefix_dir(work, name), encoder_sha256(checkpoint, name), store_fp)
        for name in models
    }
    return (
        mapping,
        stores,
        {
            "segments": len(ids),
            "seconds": round(time.perf_counter() - t0, 1),
            "dir": str(work / "prefixes"),
            "precompute": report,
        },
    )


def _time_variant(qa, batcher: Batcher, variant: Variant, examples: list[Example], stop, n_tokens: int, cfg):
    """One batch: (ttft_ms, total_ms, prefix_ms, answer tokens, prompt tokens, prefix slots)."""
    system = parse_system(variant.system)
    model = qa.model_for(system) if system.trainable else None
    first: list[float] = []

    def on_token(row: int, token_id: int) -> None:
        if not first:
            first.append(time.perf_counter())

    with torch.no_grad(), autocast(cfg):
        t0 = time.perf_counter()
        batch, prefix = qa.prepare(
            system, model, examples, batcher
        )  # the serving path: store read or encoder
        t1 = time.perf_counter()
        out = greedy_generate(
            qa.lm, batch.input_ids, batch.attention_mask, prefix, stop, n_tokens, on_token=on_token
        )
        t2 = time.perf_counter()
    return {
        "ttft_ms": (first[0] - t0) * 1e3 if first else float("nan"),
        "total_ms": (t2 - t0) * 1e3,
        "prefix_ms": (t1 - t0) * 1e3,
        "answer_tokens": min(len(o) for o in out),
        "prompt_tokens": float(batch.attention_mask.sum(1).float().mean()),
        "prefix_slots": 0.0 if prefix is None else float(prefix.mask.sum(1).float().mean()),
    }


def time_retrieval(cfg, texts: list[str], k: int) -> tuple[list, dict[str, float]]:
    """Per-question search time of the dense retriever and of the BM25 hybrid, side by side.

    Both share one encoder, faiss index and store; only `retriever.hybrid.enabled` differs (the hybrid
    builds `run_dir/bm25` once when it is missing). Questions are searched one at a time, the two
    retrievers alternating which goes first, after one untimed warm-up each. Returns the configured
    retriever's hits (what every system reads) and {"dense": ms, "hybrid": ms} per question.
    """
    from retriever.search import Retriever

    configured = Retriever.from_config(cfg)
    other_cfg = to_dict(cfg)
    other_cfg["retriever"]["hybrid"]["enabled"] = not cfg.retriever.hybrid.enabled
    other = Retriever.configured(
        config_from_dict(other_cfg, "bench retrieval config"),
        encoder=configured.encoder,
        index=configured.index,
        manifest=configured.manifest,
        store=configured.store,
        run_dir=configured.run_dir,
    )
    hybrid, dense = (configured, other) if cfg.retriever.hybrid.enabled else (other, configured)
    seconds = {"dense": 0.0, "hybrid": 0.0}
    for r in (dense, hybrid):
        r.search(texts[0], k)  # warm-up
    hits = []
    for i, q in enumerate(texts):
        order = (
            (("dense", dense), ("hybrid", hybrid)) if i % 2 == 0 else (("hybrid", hybrid), ("dense", dense))
        )
        for name, r in order:
            t0 = time.perf_counter()
            got = r.search(q, k)
            seconds[name] += time.perf_counter() - t0
            if r is configured:
                hits.append(got)
    return hits, {name: s * 1e3 / len(texts) for name, s in seconds.items()}


def run(cfg, progress: bool = True) -> dict:
    """The section's numbers (JSON-ready); see the module docstring."""
    from knowledge_encoder.backbones import build_backbone
    from qa.checkpoint import new_model
    from qa.prefix_source import PrefixSource
    from qa.system import QASettings, QASystem

    b = cfg.bench
    t_start = time.perf_counter()
    ks = sorted(set(b.qa_k_values))
    kmax = max(ks)
    bs = b.qa_batch_size
    n_warm, n_timed = b.qa_warmup * bs, b.qa_questions
    rows = questions(cfg, cfg.data.split, n_warm + n_timed)
    texts = [r.question for r in rows]

    hits, retrieval_ms = time_retrieval(cfg, texts, kmax)
    retrieve_ms = retrieval_ms["hybrid" if cfg.retriever.hybrid.enabled else "dense"]
    if any(len(h) < kmax for h in hits):
        raise ValueError(f"the index returned fewer than k={kmax} segments for some questions")

    lm, tokenizer, template = load_lm_template(cfg)
    device = next(lm.parameters()).device
    systems = [parse_system(s) for s in b.qa_systems]
    dynamic = [s for s in systems if s.kind.dynamic]
    kcfg = cfg.knowledge_encoder
    # The backbone knows its feature size (None for per-layer K,V); the online path reads with it too.
    backbone = build_backbone(kcfg, lm, template, cfg.retriever.model, device) if dynamic else None
    torch.manual_seed(cfg.seed)
    if b.qa_checkpoint:
        from qa.checkpoint import load_models

        models = load_models(Path(b.qa_checkpoint), [str(s) for s in dynamic], lm,
                             {"lm_layers": lm.config.hidden_size}, cfg.lm.model, tokenizer=tokenizer)
    else:
        models = {
            str(s): new_model(s, cfg, lm, template, backbone.feature_dim)
            .to(device)
            .eval()
            .requires_grad_(False)
            for s in dynamic
        }
    store_report, mapping, stores = None, {}, {}
    if models:
        mapping, stores, store_report = build_prefix_store(
            cfg, lm, template, models, [h.segment_id for hs in hits for h in hs], progress
        )

    settings = QASettings.from_config(cfg)
    online = QASystem(settings, lm, tokenizer, None, models, {n: n for n in models})
    stored = QASystem(settings, lm, tokenizer, None, models, {n: n for n in models})
    stored.prefix_sources.update({name: PrefixSource(store=store) for name, store in stores.items()})
    batchers = {
        "none": Batcher(template, None, device),
        "precomputed": Batcher(template, NoFeatures(), device),
    }
    if models:
        batchers["online"] = Batcher(template, FreshFeatures(backbone), device)

    variants = [Variant(str(s), str(s), 0, "none") for s in systems if not s.kind.retrieves]
    for k in ks:
        for s in systems:
            if not s.kind.retrieves:
                continue
            if s.kind.dynamic:
                variants.append(Variant(f"{s} (online)", str(s), k, "online"))
                variants.append(Variant(f"{s} (precomputed)", str(s), k, "precomputed"))
            else:
                variants.append(Variant(str(s), str(s), k, "none"))

    def examples_for(start: int, k: int, precomputed: bool) -> list[Example]:
        out = []
        for i in range(start, start + bs):
            hs = hits[i][:k]
            ids = [mapping[h.segment_id] if precomputed else h.segment_id for h in hs]
            out.append(Example(texts[i], [TextSegment(h.title, h.text) for h in hs], ids))
        return out

    stop = StopTokens(frozenset())  # no stop token: every system generates exactly n tokens
    n_tokens = b.qa_answer_tokens
    samples: dict[int, list[dict]] = {i: [] for i in range(len(variants))}
    starts = list(range(0, n_warm + n_timed - bs + 1, bs))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts) * len(variants), desc="qa latency", unit="run")
    for batch_no, start in enumerate(starts):
        order = list(range(len(variants)))
        shift = batch_no % len(order)
        order = order[shift:] + order[:shift]  # rotate: no system is always first after another's cache
        for i in order:
            v = variants[i]
            qa = stored if v.source == "precomputed" else online
            ex = examples_for(start, v.k, v.source == "precomputed")
            m = _time_variant(qa, batchers[v.source], v, ex, stop, n_tokens, cfg)
            if start >= n_warm:
                samples[i].append(m)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    def describe(i: int) -> dict:
        ms = samples[i]
        tokens = sorted({m["answer_tokens"] for m in ms})
        if tokens != [n_tokens]:
            raise RuntimeError(
                f"{variants[i].label}: answers of {tokens} tokens, expected exactly {n_tokens}"
            )
        return {
            "ttft_ms": summary([m["ttft_ms"] for m in ms]),
            "total_ms": summary([m["total_ms"] for m in ms]),
            "prefix_ms": summary([m["prefix_ms"] for m in ms]),
            "prompt_tokens": round(sum(m["prompt_tokens"] for m in ms) / len(ms), 1),
            "prefix_slots": round(sum(m["prefix_slots"] for m in ms) / len(ms), 1),
            "batches": len(ms),
        }

    result: dict = {}
    for i, v in enumerate(variants):
        if v.k == 0:
            result[v.label] = describe(i)
    head = str(dynamic[0]) if dynamic else None
    for k in ks:
        entry: dict = {"systems": {}}
        for i, v in enumerate(variants):
            if v.k == k:
                entry["systems"][v.label] = describe(i)
        rag = entry["systems"].get("rag_text")
        if rag is not None:
            for s in dynamic:
                pre = entry["systems"][f"{s} (precomputed)"]["total_ms"]["mean"]
                onl = entry["systems"][f"{s} (online)"]["total_ms"]["mean"]
                suffix = "" if str(s) == head else f"@{s.tag}"
                entry[f"dynamic{suffix}_over_rag"] = round(pre / rag["total_ms"]["mean"], 3)
                entry[f"dynamic{suffix}_online_over_rag"] = round(onl / rag["total_ms"]["mean"], 3)
                entry[f"dynamic{suffix}_ttft_over_rag"] = round(
                    entry["systems"][f"{s} (precomputed)"]["ttft_ms"]["mean"] / rag["ttft_ms"]["mean"], 3
                )
        result[f"k{k}"] = entry
    goal_k = 5 if 5 in ks else kmax
    ratio = result[f"k{goal_k}"].get("dynamic_over_rag")
    return {
        "goal": GOAL,
        "met": bool(ratio is not None and ratio <= RATIO_GOAL and goal_k == 5),
        "goal_k": goal_k,
        **result,
        "retrieve_ms_per_question": round(retrieve_ms, 1),
        "retrieval": {
            "dense_ms_per_question": round(retrieval_ms["dense"], 2),
            "hybrid_ms_per_question": round(retrieval_ms["hybrid"], 2),
            "hybrid_over_dense": round(retrieval_ms["hybrid"] / retrieval_ms["dense"], 2),
            "configured": "hybrid" if cfg.retriever.hybrid.enabled else "dense",
        },
        "questions": n_timed,
        "warmup_batches": b.qa_warmup,
        "batch_size": bs,
        "answer_tokens": n_tokens,
        "k_values": ks,
        "dynamic_systems": {
            str(s): {
                "prefix_slots_per_segment": models[str(s)].encoder.slots or "segment length",
                "format_slots": kcfg.format_slots,
            }
            for s in dynamic
        },
        "weights": (f"trained knowledge encoders read from {b.qa_checkpoint}" if b.qa_checkpoint
                    else "freshly initialised (untrained) knowledge encoders: latency depends on shapes only"),
        "prefix_store": store_report,
        "lm": cfg.lm.model,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def to_markdown(r: dict) -> str:
    lines = [
        f"{r['questions']} questions of the `{r['lm']}` run (batch {r['batch_size']}, every system forced to "
        f"{r['answer_tokens']} answer tokens with the KV cache, {r['warmup_batches']} warm-up batches, systems "
        f"interleaved). Times per batch in ms, mean (median); retrieval ({r['retrieve_ms_per_question']} ms per "
        "question, the same segments for every system) is not included. "
        f"Dynamic prefixes: {r['weights']}.",
        *_retrieval_line(r.get("retrieval")),
        "",
        "| k | system | prompt tokens | prefix slots | prefix ms | time to first token ms | total ms | total / rag_text |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def row(k: str, name: str, d: dict, rag_total: float | None) -> str:
        ratio = "–" if rag_total is None else f"{d['total_ms']['mean'] / rag_total:.2f}"
        return (
            f"| {k} | {name} | {d['prompt_tokens']:g} | {d['prefix_slots']:g} | {d['prefix_ms']['mean']} | "
            f"{d['ttft_ms']['mean']} ({d['ttft_ms']['median']}) | {d['total_ms']['mean']} "
            f"({d['total_ms']['median']}) | {ratio} |"
        )

    for name, d in r.items():
        if isinstance(d, dict) and "ttft_ms" in d:
            lines.append(row("–", name, d, None))
    for k in r["k_values"]:
        entry = r[f"k{k}"]
        rag = entry["systems"].get("rag_text")
        rag_total = rag["total_ms"]["mean"] if rag else None
        # rag_text first, the baseline the others are divided by (results.json keeps keys sorted)
        for name, d in sorted(entry["systems"].items(), key=lambda kv: (kv[0] != "rag_text", kv[0])):
            lines.append(row(str(k), name, d, rag_total))
    if r.get("prefix_store"):
        p = r["prefix_store"]
        lines += [
            "",
            f"Prefix store for the benchmark: {p['segments']} segments (those the timed questions "
            f"retrieve), built in {p['seconds']} s into `{p['dir']}`.",
        ]
    return "\n".join(lines)


def _retrieval_line(t: dict | None) -> list[str]:
    if not t:
        return []
    return [
        "",
        f"Retrieval per question, one at a time, side by side: dense {t['dense_ms_per_question']} ms, "
        f"dense + BM25 (`retriever.hybrid.enabled`) {t['hybrid_ms_per_question']} ms, "
        f"hybrid / dense {t['hybrid_over_dense']} (the systems read the {t['configured']} retriever's segments).",
    ]
