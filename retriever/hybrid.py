"""Hybrid retrieval: fuse the dense (faiss) ranking with BM25 (`retriever.hybrid.*`, off by default).

For each question the dense index and BM25 each return their best `depth` segments; every candidate of
the union gets its exact BM25 score (one sparse product covers all segments) and its dense score when the
dense search returned it. Two fusions:

- `linear` (the DPR paper's hybrid, with per-question min-max normalisation so the two scales meet):
  fused = (1 - weight) · norm(dense) + weight · norm(bm25), a dense score missing from the dense top-depth
  counts as that question's lowest dense score;
- `rrf` (reciprocal rank fusion, Cormack et al. 2009): fused = (1 - weight) / (60 + rank_dense) +
  weight / (60 + rank_bm25), a missing dense rank contributing nothing.

weight 0 is the dense ranking of the union, weight 1 the BM25 ranking. Segments added live (ids beyond
the built store) are scored by BM25 as if they were indexed (df and N count them, lengths use the index's
average); segments removed live are never returned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from common.errors import UserError
from data_prep.store import SegmentStore
from retriever.bm25 import BM25Index, open_store_bm25, tokenize, top_k_rows

FUSIONS = ("linear", "rrf")
RRF_K = 60


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based rank of each entry, highest first (ties keep input order)."""
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[np.argsort(-x, kind="stable")] = np.arange(1, len(x) + 1)
    return ranks


def fuse(dense: np.ndarray, bm25: np.ndarray, weight: float, method: str = "linear") -> np.ndarray:
    """Fused scores of one question's candidates (higher is better).

    dense: (C,) dense scores, NaN where the dense search did not return the candidate;
    bm25: (C,) BM25 scores (0 = no shared term). Returns (C,) float64.
    """
    if method not in FUSIONS:
        raise UserError(f"retriever.hybrid.fusion must be one of {FUSIONS}, got {method!r}")
    if not 0.0 <= weight <= 1.0:
        raise UserError(f"retriever.hybrid.weight must be in [0, 1], got {weight}")
    dense = np.asarray(dense, dtype=np.float64)
    bm25 = np.asarray(bm25, dtype=np.float64)
    present = ~np.isnan(dense)
    if method == "linear":
        filled = np.where(present, dense, dense[present].min() if present.any() else 0.0)
        return (1.0 - weight) * _minmax(filled) + weight * _minmax(bm25)
    dense_part = np.zeros(len(dense))
    if present.any():
        dense_part[present] = 1.0 / (RRF_K + _ranks(dense[present]))
    bm25_part = np.where(bm25 > 0, 1.0 / (RRF_K + _ranks(bm25)), 0.0)
    return (1.0 - weight) * dense_part + weight * bm25_part


class HybridSearcher:
    """BM25 + fusion applied on top of a dense top-`depth` (see the module docstring)."""

    def __init__(self, bm25: BM25Index, *, weight: float = 0.5, fusion: str = "linear", depth: int = 100):
        if depth < 1:
            raise UserError(f"retriever.hybrid.depth must be >= 1, got {depth}")
        fuse(np.zeros(1), np.zeros(1), weight, fusion)  # validates weight and fusion up front
        self.bm25 = bm25
        self.weight = weight
        self.fusion = fusion
        self.depth = depth
        self._live_cache: dict[int, Counter] = {}

    @classmethod
    def from_config(
        cls, hybrid_cfg, store: SegmentStore, path: Path, progress: bool = True
    ) -> HybridSearcher:
        """Open (or build, when missing or stale) the BM25 index of `store` at `path`."""
        bm25 = open_store_bm25(path, store, k1=hybrid_cfg.k1, b=hybrid_cfg.b, progress=progress)
        return cls(bm25, weight=hybrid_cfg.weight, fusion=hybrid_cfg.fusion, depth=hybrid_cfg.depth)

    def signature(self) -> dict:
        """What decides the fused ranking (for cache keys)."""
        return {
            "bm25": self.bm25.meta.get("store_fingerprint"),
            "k1": self.bm25.k1,
            "b": self.bm25.b,
            "weight": self.weight,
            "fusion": self.fusion,
            "depth": self.depth,
        }

    def rerank(
        self,
        queries: Sequence[str],
        dense_scores: np.ndarray,
        dense_ids: np.ndarray,
        k: int,
        removed: Collection[int] = (),
        live: Mapping[int, str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fuse each question's dense candidates (dense_scores/dense_ids (n, D), -1 = none) with its BM25
        top-`depth` → (scores (n, k), ids (n, k)), padded with -inf / -1.

        live: segments added since the BM25 index was built (id → title + text); they are scored by BM25
        as if indexed (`BM25Index.score_extra`) and compete on both sides.
        """
        n = len(queries)
        out_s = np.full((n, k), -np.inf, dtype=np.float32)
        out_i = np.full((n, k), -1, dtype=np.int64)
        n_docs = self.bm25.n_docs
        gone = np.asarray([i for i in removed if 0 <= i < n_docs], dtype=np.int64)
        live_ids, live_counts = self._live_terms(live or {})
        for start, block in self.bm25.score_blocks(queries):
            if len(gone):
                block[:, gone] = 0.0
            _, sparse_ids = top_k_rows(block, self.depth)
            live_block = self.bm25.score_extra(queries[start : start + len(block)], live_counts)
            for r in range(len(block)):
                q = start + r
                live_bm25 = dict(zip(live_ids, live_block[r].tolist()))
                valid = dense_ids[q] >= 0
                d_ids, d_scores = dense_ids[q][valid], dense_scores[q][valid]
                seen = set(d_ids.tolist())
                extra = [int(i) for i in sparse_ids[r] if i >= 0 and i not in seen]
                extra += [i for i, score in live_bm25.items() if score > 0 and i not in seen]
                cand = np.concatenate([d_ids, np.asarray(extra, dtype=np.int64)])
                if not len(cand):
                    continue
                dense = np.concatenate([d_scores.astype(np.float64), np.full(len(extra), np.nan)])
                in_store = cand < n_docs
                bm25 = np.zeros(len(cand))
                bm25[in_store] = block[r, cand[in_store]]
                bm25[~in_store] = [live_bm25.get(int(i), 0.0) for i in cand[~in_store]]
                fused = fuse(dense, bm25, self.weight, self.fusion)
                order = np.argsort(-fused, kind="stable")[:k]
                out_s[q, : len(order)] = fused[order]
                out_i[q, : len(order)] = cand[order]
        return out_s, out_i

    def _live_terms(self, live: Mapping[int, str]) -> tuple[list[int], list[Counter]]:
        """Ids and term counts of the live segments, tokenised once per segment id."""
        self._live_cache = {i: self._live_cache.get(i) or Counter(tokenize(t)) for i, t in live.items()}
        ids = sorted(self._live_cache)
        return ids, [self._live_cache[i] for i in ids]
