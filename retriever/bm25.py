"""BM25 over the segment store: the lexical half of hybrid retrieval (`retriever.hybrid.*`).

Dense retrievers miss questions whose key words are rare names and numbers that the encoder smooths
away; BM25 matches them exactly (on SQuAD, BM25 beats DPR and the fusion of both beats either: Karpukhin
et al. 2020, table 2). The index is the store's title + text, lower-cased `\\w+` tokens, scored with
Okapi BM25 and the non-negative idf of Lucene:

    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    w(t, d)     = idf(t) · tf(t, d) · (k1 + 1) / (tf(t, d) + k1 · (1 - b + b · |d| / avgdl))
    score(q, d) = Σ_{t in q} qtf(t) · w(t, d)

The weights w are precomputed into a sparse (N segments × V terms) CSR matrix, row i = segment id i of
the store, so a batch of questions is one sparse product (n × V) @ (V × N).

`run_dir/bm25/`: `manifest.json` (format, k1, b, N, V, avgdl, the store fingerprint, sha256 of the
arrays), `vocab.json` (the V terms, column order) and `weights.npz` (CSR data/indices/indptr, saved
without pickle). Written atomically; opening it for another store or other k1/b is refused.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from common.atomic import atomic_dir, sha256_file
from common.errors import UserError
from common.integrity import read_json_object
from data_prep.store import SegmentStore, segment_input_text

log = logging.getLogger(__name__)

BM25_FORMAT = 1
_TOKEN = re.compile(r"\w+")
# Bound on the dense (questions × segments) score block a batch search materialises (float32 cells).
SCORE_BLOCK_CELLS = 1 << 25


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (`\\w+`, so digits and non-Latin letters count as words)."""
    return _TOKEN.findall(text.lower())


class BM25Index:
    """Okapi BM25 over a fixed list of documents (see the module docstring for the formula)."""

    def __init__(self, weights: sp.csr_matrix, vocab: dict[str, int], *, k1: float, b: float, meta: dict):
        self.weights = weights  # (N, V) float32: w(t, d)
        self._by_term: sp.csr_matrix | None = None  # (V, N), built on the first search
        self._df: np.ndarray | None = None  # (V,), built on the first live scoring
        self.vocab = vocab
        self.k1 = k1
        self.b = b
        self.meta = meta

    @property
    def n_docs(self) -> int:
        return self.weights.shape[0]

    @classmethod
    def build(
        cls,
        texts: Sequence[str] | object,
        *,
        k1: float = 0.9,
        b: float = 0.4,
        total: int | None = None,
        progress: bool = False,
        meta: dict | None = None,
    ) -> BM25Index:
        """Index `texts` (any iterable of strings; document i = row i)."""
        if k1 < 0 or not 0 <= b <= 1:
            raise UserError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        vocab: dict[str, int] = {}
        rows, cols, tfs, lengths = [], [], [], []
        for row, text in enumerate(
            tqdm(texts, total=total, desc="BM25 index", unit="seg", disable=not progress)
        ):
            counts = Counter(tokenize(text))
            lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                cols.append(vocab.setdefault(term, len(vocab)))
                tfs.append(tf)
            rows.append(np.full(len(counts), row, dtype=np.int64))
        n, v = len(lengths), len(vocab)
        tf = sp.csr_matrix(
            (
                np.asarray(tfs, dtype=np.float32),
                (np.concatenate(rows) if rows else np.zeros(0, np.int64), np.asarray(cols, dtype=np.int64)),
            ),
            shape=(n, v),
        )
        dl = np.asarray(lengths, dtype=np.float32)
        avgdl = float(dl.mean()) if n and dl.mean() > 0 else 1.0
        df = np.bincount(tf.indices, minlength=v).astype(np.float32)
        idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)
        # Per stored entry: its row's length norm and its column's idf (CSR keeps rows contiguous).
        row_of_entry = np.repeat(np.arange(n), np.diff(tf.indptr))
        norm = k1 * (1.0 - b + b * dl[row_of_entry] / avgdl)
        data = idf[tf.indices] * tf.data * (k1 + 1.0) / (tf.data + norm)
        weights = sp.csr_matrix((data.astype(np.float32), tf.indices, tf.indptr), shape=(n, v))
        info = dict(meta or {}, n_docs=n, vocab_size=v, avgdl=avgdl)
        return cls(weights, vocab, k1=k1, b=b, meta=info)

    def query_matrix(self, queries: Sequence[str]) -> sp.csr_matrix:
        """(n, V) query-term counts; terms the corpus never uses are dropped (they score nothing)."""
        indptr, indices, data = [0], [], []
        for q in queries:
            counts = Counter(t for t in tokenize(q) if t in self.vocab)
            indices.extend(self.vocab[t] for t in counts)
            data.extend(counts.values())
            indptr.append(len(indices))
        return sp.csr_matrix(
            (np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
            shape=(len(queries), len(self.vocab)),
        )

    def score_blocks(self, queries: Sequence[str]):
        """Yield (start, scores) with scores (rows, N) float32 dense, BM25 of queries[start:start+rows]
        against every document; blocks stay under SCORE_BLOCK_CELLS cells."""
        step = max(1, SCORE_BLOCK_CELLS // max(self.n_docs, 1))
        if self._by_term is None:  # transposing costs as much as a search of many questions: once per index
            self._by_term = self.weights.T.tocsr()
        wt = self._by_term
        for start in range(0, len(queries), step):
            q = self.query_matrix(queries[start : start + step])
            yield start, np.asarray((q @ wt).todense(), dtype=np.float32)

    def document_frequencies(self) -> np.ndarray:
        """(V,) number of indexed documents that contain each term."""
        if self._df is None:
            self._df = np.bincount(self.weights.indices, minlength=len(self.vocab)).astype(np.float32)
        return self._df

    def score_extra(self, queries: Sequence[str], docs: Sequence[Counter]) -> np.ndarray:
        """BM25 of `queries` against documents outside the index (segments added live), scored as if they
        were appended to it: df and N count them too, lengths are normalised by the index's avgdl.

        docs: term counts of each extra document (`Counter(tokenize(text))`). Returns (n, len(docs)) float32.
        """
        out = np.zeros((len(queries), len(docs)), dtype=np.float32)
        if not docs or not queries:
            return out
        n = self.n_docs + len(docs)
        avgdl = float(self.meta.get("avgdl") or 1.0)
        df_base = self.document_frequencies()
        df_extra = Counter(t for counts in docs for t in counts)

        def idf(term: str) -> float:
            df = df_extra[term] + (df_base[self.vocab[term]] if term in self.vocab else 0.0)
            return float(np.log1p((n - df + 0.5) / (df + 0.5)))

        for j, counts in enumerate(docs):
            norm = self.k1 * (1.0 - self.b + self.b * sum(counts.values()) / avgdl)
            for i, q in enumerate(queries):
                out[i, j] = sum(
                    qtf * idf(t) * counts[t] * (self.k1 + 1.0) / (counts[t] + norm)
                    for t, qtf in Counter(tokenize(q)).items()
                    if t in counts
                )
        return out

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k documents per query → (scores (n, k) float32, rows (n, k) int64); -1 / -inf where fewer
        than k documents share a term with the query."""
        scores_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids_out = np.full((len(queries), k), -1, dtype=np.int64)
        for start, block in self.score_blocks(queries):
            s, i = top_k_rows(block, k)
            scores_out[start : start + len(block)] = s
            ids_out[start : start + len(block)] = i
        return scores_out, ids_out

    # ------------------------------------------------------------------ persistence

    def save(self, path: Path | str) -> None:
        """Write the index directory atomically (see the module docstring)."""
        with atomic_dir(path) as tmp:
            w = self.weights
            np.savez(
                tmp / "weights.npz",
                data=w.data,
                indices=w.indices,
                indptr=w.indptr,
                shape=np.asarray(w.shape, dtype=np.int64),
            )
            terms = sorted(self.vocab, key=self.vocab.__getitem__)
            (tmp / "vocab.json").write_text(json.dumps(terms, ensure_ascii=False), encoding="utf-8")
            manifest = dict(
                self.meta,
                format=BM25_FORMAT,
                k1=self.k1,
                b=self.b,
                sha256={name: sha256_file(tmp / name) for name in ("weights.npz", "vocab.json")},
            )
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path | str) -> BM25Index:
        """Read a directory written by `save`, checking its format and checksums."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"{path}: no BM25 index (manifest.json missing)")
        manifest = read_json_object(manifest_path, "BM25 manifest", f"delete {path} to rebuild it")
        if manifest.get("format") != BM25_FORMAT:
            raise UserError(
                f"{path}: BM25 index format {manifest.get('format')!r}, this version reads {BM25_FORMAT}"
            )
        for name, digest in (manifest.get("sha256") or {}).items():
            if sha256_file(path / name) != digest:
                raise UserError(
                    f"{path / name}: checksum differs from its manifest (corrupt or edited); rebuild it"
                )
        with np.load(path / "weights.npz", allow_pickle=False) as z:
            weights = sp.csr_matrix(
                (z["data"], z["indices"], z["indptr"]), shape=tuple(int(x) for x in z["shape"])
            )
        terms = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        meta = {k: v for k, v in manifest.items() if k not in ("format", "k1", "b", "sha256")}
        return cls(
            weights, {t: i for i, t in enumerate(terms)}, k1=manifest["k1"], b=manifest["b"], meta=meta
        )


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns of each row of (n, N) `scores`, best first, ignoring scores <= 0 (no shared term)
    → (scores (n, k), columns (n, k)), padded with -inf / -1."""
    n, N = scores.shape
    out_s = np.full((n, k), -np.inf, dtype=np.float32)
    out_i = np.full((n, k), -1, dtype=np.int64)
    kk = min(k, N)
    if kk == 0:
        return out_s, out_i
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < N else np.tile(np.arange(N), (n, 1))
    top = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    top, part = np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1)
    keep = top > 0
    out_s[:, :kk] = np.where(keep, top, -np.inf)
    out_i[:, :kk] = np.where(keep, part, -1)
    return out_s, out_i


def open_store_bm25(
    path: Path | str, store: SegmentStore, *, k1: float, b: float, progress: bool = True
) -> BM25Index:
    """The BM25 index of `store` at `path`: loaded when it matches the store and k1/b, else (re)built
    from the store and saved atomically (it is derived data: a few seconds per 10k segments)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        try:
            index = BM25Index.load(path)
        except UserError as e:
            log.warning("%s; rebuilding it", e)
        else:
            want = {"store_fingerprint": store.fingerprint, "k1": k1, "b": b}
            have = {"store_fingerprint": index.meta.get("store_fingerprint"), "k1": index.k1, "b": index.b}
            if have == want:
                return index
            log.warning("%s was built for %s, the config needs %s; rebuilding it", path, have, want)
    texts = (segment_input_text(s) for batch in store.iter_batches(4096) for s in batch)
    index = BM25Index.build(
        texts, k1=k1, b=b, total=len(store), progress=progress, meta={"store_fingerprint": store.fingerprint}
    )
    index.save(path)
    log.info("BM25 index of %d segments (%d terms) written to %s", index.n_docs, len(index.vocab), path)
    return index
