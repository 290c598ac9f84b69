"""qa.retrieval_cache: cached top-k hits are reused while intact and recomputed when damaged."""

from __future__ import annotations

import json

import pytest

from configs.loader import load_config
from data_prep.records import QAExample
from qa.retrieval_cache import cached_hits
from retriever.search import Retriever
from retriever.testing import build_toy_index

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval_cache")
    _, overrides, encoder, _, questions = build_toy_index(root, n_docs=12)
    retriever = Retriever.from_config(load_config(None, overrides), encoder=encoder)
    examples = [QAExample(f"q{i}", q, [a]) for i, (_, q, a) in enumerate(questions)]
    return retriever, examples


def _ids(hits: dict) -> dict:
    return {qid: [(h.segment_id, round(h.score, 6)) for h in rows] for qid, rows in hits.items()}


def test_damaged_retrieval_cache_is_recomputed_not_trusted(toy, tmp_path):
    """Regression: the cache JSON was read without a check, so a flipped digit changed the training hits."""
    retriever, examples = toy
    first = cached_hits(retriever, examples, 3, tmp_path, progress=False)
    (path,) = tmp_path.glob("retrieval-*.json")
    saved = json.loads(path.read_text())
    assert set(saved["hits"]) == {e.id for e in examples}

    # A changed segment id that still parses: the fingerprint catches it and the hits are searched again.
    qid = examples[0].id
    saved["hits"][qid][0][0] = (saved["hits"][qid][0][0] + 1) % len(retriever.store)
    path.write_text(json.dumps(saved))
    assert _ids(cached_hits(retriever, examples, 3, tmp_path, progress=False)) == _ids(first)

    # A truncated file: retrieved again, not a JSONDecodeError.
    path.write_text(path.read_text()[:40])
    assert _ids(cached_hits(retriever, examples, 3, tmp_path, progress=False)) == _ids(first)
    assert json.loads(path.read_text())["fingerprint"]  # rewritten whole


def test_intact_retrieval_cache_is_reused(toy, tmp_path):
    retriever, examples = toy
    cached_hits(retriever, examples, 2, tmp_path, progress=False)
    (path,) = tmp_path.glob("retrieval-*.json")
    mtime = path.stat().st_mtime_ns

    class NoSearch:
        """The same retriever, but searching is an error: a reused cache must not search."""

        def __getattr__(self, name):
            if name in ("batch_search", "search"):
                raise AssertionError("searched although the cache was intact")
            return getattr(retriever, name)

    cached_hits(NoSearch(), examples, 2, tmp_path, progress=False)
    assert path.stat().st_mtime_ns == mtime
