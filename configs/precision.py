"""Whether bf16 is fast on this CPU, measured rather than assumed.

bf16 on a CPU is only fast where oneDNN has native kernels (AVX-512 BF16 or AMX: Intel Sapphire Rapids,
AMD Zen 4 and later). Elsewhere torch falls back to a generic loop: on a 2-core AMD EPYC Zen 3 VM with AVX2
only, a 1024² bf16 matmul ran at 0.9 GFLOP/s against 75 GFLOP/s in fp32, and a retriever fine-tuning run
with `retriever.finetune.precision=bf16` went 11 minutes without finishing its first step (the fp32 step
takes seconds). Every option that asks for bf16 compute on the CPU calls `warn_if_slow_bf16` so that a
user learns this at once, not from a run that never ends.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger(__name__)

# bf16 this many times slower than fp32 (same matmul) counts as "no native bf16"; native kernels are faster.
SLOW_FACTOR = 2.0


def _best_matmul_seconds(dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=8)
def cpu_half_slowdown(dtype: torch.dtype = torch.bfloat16, n: int = 512) -> float:
    """Time of an n³ matmul in `dtype` (bf16 or fp16) over the same fp32 matmul on this CPU
    (< 1: the half dtype is faster). About 1 s where it is slow (n = 512: small sizes take other kernels); once
    per process."""
    return _best_matmul_seconds(dtype, n) / _best_matmul_seconds(torch.float32, n)


def cpu_bf16_slowdown() -> float:
    """`cpu_half_slowdown` of bf16."""
    return cpu_half_slowdown(torch.bfloat16)


def warn_if_slow_bf16(what: str, device: torch.device | str = "cpu") -> bool:
    """Log a warning when `what` (e.g. "lm.autocast_bf16=true") will run bf16 on a CPU without native
    bf16 kernels; returns True when it warned. GPUs and fast-bf16 CPUs pass silently."""
    if torch.device(device).type != "cpu":
        return False
    slowdown = cpu_bf16_slowdown()
    if slowdown < SLOW_FACTOR:
        return False
    log.warning(
        "%s: bf16 matmul is %.0fx slower than fp32 on this CPU (no native bf16 kernels: AVX-512 BF16 or "
        "AMX); this run will be far slower than in fp32. Use fp32 here (the default).",
        what,
        slowdown,
    )
    return True
