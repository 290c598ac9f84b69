"""Section 2, encoding throughput: the retriever's encoder on fixed-length segments, fp32 vs bf16,
as a fraction of this machine's matmul peak measured in the same run.

Inputs are real store text, tokenized as one stream and cut into rows of exactly `bench.encode_tokens`
tokens (special tokens included), so no FLOP is spent on padding and every row is a full 288-token
window. The timed work is the transformer forward plus mean pooling and L2 normalisation (what an
embedding costs once text is tokenized). bf16 means bf16 weights and activations (not autocast).

FLOPs per segment are counted from the model: 2 x (weights of every nn.Linear outside the pooler) x T
for the projections, plus 4 x layers x T^2 x hidden for attention scores and the weighted sum (a test
checks the count against torch's FlopCounterMode). The peak is the best FLOP/s of an n x n x n matmul
of the same dtype, timed right before and right after the encoder (the larger of the two is used, so
a shared machine's load lowers the fraction rather than raising it). A half dtype that this CPU has no
native kernels for (a 512³ matmul 2x or more slower than fp32, `configs.precision`) is reported as not run.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from configs.precision import SLOW_FACTOR, cpu_half_slowdown
from data_prep.store import SegmentStore, segment_input_text

log = logging.getLogger(__name__)

FRACTION_GOAL = 0.7
GOAL = f"encoder FLOP/s >= {FRACTION_GOAL} x the same-dtype matmul peak (the better dtype)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def matmul_peak_flops(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """Best FLOP/s of (n x n) @ (n x n) in `dtype` on the CPU (2 n^3 FLOPs each)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def encoder_flops_per_sequence(model: torch.nn.Module, tokens: int) -> float:
    """FLOPs of one forward pass over one sequence of `tokens` tokens (see the module docstring)."""
    linear = sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "pooler" not in name
    )
    cfg = model.config
    return 2.0 * linear * tokens + 4.0 * cfg.num_hidden_layers * tokens**2 * cfg.hidden_size


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] and [SEP] for BERT)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    raise ValueError("cannot locate the text between the tokenizer's special tokens")


def fixed_length_inputs(tokenizer, texts: Iterable[str], rows: int, tokens: int) -> torch.Tensor:
    """(rows, tokens) input ids: `texts` tokenized as one stream, cut into windows, special tokens added.

    The texts are cycled if they hold fewer tokens than needed (a tiny store).
    """
    prefix, suffix = special_tokens(tokenizer)
    special = len(prefix) + len(suffix)
    body = tokens - special
    if body < 1:
        raise ValueError(f"{tokens} tokens leave no room next to {special} special tokens")
    texts = list(texts)
    if not texts:
        raise ValueError("no text to encode")
    stream: list[int] = []
    need = rows * body
    while len(stream) < need:
        for t in texts:
            stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
            if len(stream) >= need:
                break
    out = [prefix + stream[i * body : (i + 1) * body] + suffix for i in range(rows)]
    return torch.tensor(out, dtype=torch.long)


@torch.inference_mode()
def embed(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (B, hidden) of full-length rows (B, T)."""
    mask = torch.ones_like(ids)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = hidden.float().mean(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def time_encoder(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, passes: int = 2) -> float:
    """Best wall time over `passes` of encoding every row of `ids` in batches (after one warm-up batch)."""
    embed(model, ids[:batch_size])
    best = float("inf")
    for _ in range(max(1, passes)):
        t0 = time.perf_counter()
        for start in range(0, len(ids), batch_size):
            embed(model, ids[start : start + batch_size])
        best = min(best, time.perf_counter() - t0)
    return best


def _store_texts(run_dir: Path, limit: int) -> list[str]:
    store = SegmentStore.open(run_dir / "store")
    texts = []
    for batch in store.iter_batches(256):
        texts.extend(segment_input_text(s) for s in batch)
        if len(texts) >= limit:
            break
    return texts[:limit]


def run(cfg) -> dict:
    """The section's numbers (JSON-ready); see the module docstring."""
    from retriever.encoder import Encoder

    b = cfg.bench
    t_start = time.perf_counter()
    enc = Encoder.load(
        cfg.retriever.model,
        similarity=cfg.retriever.similarity,
        max_seq_length=max(cfg.retriever.max_seq_length, b.encode_tokens),
        device="cpu",
        dtype="float32",
    )
    base = enc.model[0].auto_model.eval()
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and b.encode_tokens > positions:
        raise ValueError(f"bench.encode_tokens={b.encode_tokens} exceeds the encoder's {positions} positions")
    # Each stored segment is at most one window, so encode_segments rows need at most that many x 2 texts.
    texts = _store_texts(Path(cfg.run_dir), 2 * b.encode_segments + 16)
    ids = fixed_length_inputs(enc.tokenizer, texts, b.encode_segments, b.encode_tokens)
    flops = encoder_flops_per_sequence(base, b.encode_tokens)
    passes = max(1, min(2, b.repeats))
    out: dict = {}
    for name in b.encode_dtypes:
        dtype = DTYPES[name]
        key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[name]
        if dtype != torch.float32 and (slowdown := cpu_half_slowdown(dtype)) >= SLOW_FACTOR:
            # No native kernels: the 4096² peak matmul alone would take minutes, and nobody would encode so.
            out[key] = {
                "dtype": name,
                "skipped": f"{name} matmul is {slowdown:.0f}x slower than fp32 on this CPU",
            }
            log.info("encoder %s skipped: %s", name, out[key]["skipped"])
            continue
        model = base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)
        peak_before = matmul_peak_flops(dtype, b.matmul_size)
        seconds = time_encoder(model, ids, b.encode_batch_size, passes)
        peak_after = matmul_peak_flops(dtype, b.matmul_size)
        peak = max(peak_before, peak_after)
        achieved = flops * len(ids) / seconds
        out[key] = {
            "dtype": name,
            "segments_per_s": round(len(ids) / seconds, 2),
            "tokens_per_s": round(len(ids) * b.encode_tokens / seconds, 1),
            "gflop_per_segment": round(flops / 1e9, 3),
            "achieved_gflops": round(achieved / 1e9, 2),
            "matmul_peak_gflops": round(peak / 1e9, 2),
            "matmul_peak_gflops_before_after": [round(peak_before / 1e9, 2), round(peak_after / 1e9, 2)],
            "fraction_of_peak": round(achieved / peak, 3),
        }
        log.info("encoder %s: %s", name, out[key])
        if model is not base:
            del model
    better = max((k for k in out if "skipped" not in out[k]), key=lambda k: out[k]["segments_per_s"])
    fraction = out[better]["fraction_of_peak"]
    return {
        "goal": GOAL,
        "met": bool(fraction >= FRACTION_GOAL),
        "fraction_of_peak": fraction,
        "better_dtype": better,
        **out,
        "model": cfg.retriever.model,
        "parameters": sum(p.numel() for p in base.parameters()),
        "segments": len(ids),
        "tokens_per_segment": b.encode_tokens,
        "batch_size": b.encode_batch_size,
        "matmul_size": b.matmul_size,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def to_markdown(r: dict) -> str:
    lines = [
        f"`{r['model']}` ({r['parameters'] / 1e6:.1f}M parameters), {r['segments']} segments of exactly "
        f"{r['tokens_per_segment']} tokens from the store's text, batch {r['batch_size']}, "
        f"{r['torch_threads']} torch threads; {r['fp32']['gflop_per_segment'] if 'fp32' in r else ''} GFLOP per "
        f"segment (projections + attention). Peak = best {r['matmul_size']}² matmul of the same dtype, "
        "timed before and after the encoder in this run.",
        "",
        "| dtype | segments/s | tokens/s | encoder GFLOP/s | matmul peak GFLOP/s | fraction of peak |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in ("fp32", "bf16", "fp16"):
        if key in r and "skipped" in r[key]:
            lines.append(f"| {r[key]['dtype']} | not run: {r[key]['skipped']} | | | | |")
        elif key in r:
            d = r[key]
            mark = " **(better)**" if key == r["better_dtype"] else ""
            lines.append(
                f"| {d['dtype']}{mark} | {d['segments_per_s']} | {d['tokens_per_s']:,} | "
                f"{d['achieved_gflops']} | {d['matmul_peak_gflops']} | {d['fraction_of_peak']:.2f} |"
            )
    return "\n".join(lines)
