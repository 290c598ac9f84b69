"""Percentile-bootstrap confidence intervals for mean scores, and for the difference between two systems.

A metric's per-example scores x (N,) are resampled with replacement R times; the mean of each resample
gives R bootstrap means, and the alpha/2 and 1 - alpha/2 quantiles of those are the interval. The paired
version resamples the same example indices for both systems, so the per-question correlation between
them (both find the easy questions easy) is kept, which makes the interval on the difference narrower
and honest. Resamples are drawn in chunks so memory stays bounded for large N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_CHUNK_ELEMENTS = 4_000_000  # resample indices held at once (32 MB of int64)


def _as_scores(per_example: Sequence[float], what: str = "per_example") -> np.ndarray:
    x = np.asarray(per_example, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence of scores, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{what} is empty: no examples to bootstrap")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} holds NaN or infinite scores")
    return x


def _check(n_resamples: int, alpha: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def bootstrap_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement) of x (N,) → (n_resamples,)."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    out = np.empty(n_resamples, dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, step):
        rows = min(step, n_resamples - start)
        idx = rng.integers(0, n, size=(rows, n))  # (rows, N)
        out[start : start + rows] = x[idx].mean(axis=1)
    return out


def bootstrap_ci(
    per_example: Sequence[float], n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """(low, high) percentile-bootstrap interval of the mean of `per_example`; 95% by default."""
    _check(n_resamples, alpha)
    x = _as_scores(per_example)
    means = bootstrap_means(x, n_resamples, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass
class PairedDifference:
    """Mean of a - b over the same examples, its bootstrap interval, and a bootstrap two-sided p-value."""

    diff: float
    low: float
    high: float
    p_value: float  # 2 * min(P*(diff <= 0), P*(diff >= 0)) over resamples, capped at 1

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        return self.low > 0 or self.high < 0


def paired_bootstrap_ci(
    per_example_a: Sequence[float],
    per_example_b: Sequence[float],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedDifference:
    """Paired bootstrap of mean(a) - mean(b) where a[i] and b[i] score the same example i."""
    _check(n_resamples, alpha)
    a = _as_scores(per_example_a, "per_example_a")
    b = _as_scores(per_example_b, "per_example_b")
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: {a.shape[0]} vs {b.shape[0]}")
    d = a - b
    means = bootstrap_means(d, n_resamples, seed)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2.0 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return PairedDifference(diff=float(d.mean()), low=float(low), high=float(high), p_value=p)
