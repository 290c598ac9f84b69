"""bench/retrieval_scale.py on a small size: the mixture resembles its data, recall is measured against
exact search, and more probes never lose recall."""

from __future__ import annotations

import numpy as np

from bench.retrieval_scale import fit_mixture, measure, to_markdown


def _clustered(n=3000, d=24, centers=6, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 3
    x = c[rng.integers(centers, size=n)] + rng.standard_normal((n, d)).astype(np.float32) * 0.5
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mixture_fits_clustered_data():
    x = _clustered()
    mix = fit_mixture(x, n_components=6, seed=0)
    assert mix.means.shape == (6, 24) and np.isclose(mix.weights.sum(), 1.0)
    y = mix.sample(3000, seed=1)
    assert y.shape == (3000, 24) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    # samples land near the data: their nearest real neighbour is far closer than for random directions
    rand = np.random.default_rng(2).standard_normal((3000, 24)).astype(np.float32)
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)
    assert (y @ x.T).max(axis=1).mean() > (rand @ x.T).max(axis=1).mean() + 0.1


def test_measure_recall_against_exact():
    x = _clustered(n=4000)
    q = _clustered(n=50, seed=5)
    r = measure(x, q, nlist=16, nprobe_values=(1, 4, 16, 64), repeats=1, single_queries=10)
    rows = r["ivf"]["by_nprobe"]
    assert [row["nprobe"] for row in rows] == [1, 4, 16]  # nprobe > nlist is skipped
    recalls = [row["recall@10"] for row in rows]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0  # all lists probed = exact
    assert all(row["qps"] > 0 for row in rows) and r["exact"]["qps"] > 0
    r.update(vectors="test vectors", queries="test queries")
    assert "| Flat (exact) |" in to_markdown(r)
