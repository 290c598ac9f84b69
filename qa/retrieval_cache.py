"""Cached top-k retrieval per question, so training and repeated evaluations do not re-encode questions.

The cache file is keyed by a fingerprint of everything that decides the result: the index file's sha256,
the encoder fingerprint, the segment store, nprobe (and the BM25 fusion when on), k and the question ids. A changed retriever or store
gives a new file, never a stale answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from common.atomic import atomic_write_json, fingerprint
from data_prep.records import QAExample

log = logging.getLogger(__name__)


def retrieval_fingerprint(retriever, k: int, question_ids: Sequence[str]) -> str:
    m = retriever.manifest
    return fingerprint({
        "index": m.get("sha256"),
        "encoder": (m.get("encoder") or {}).get("fingerprint"),
        "store": m.get("store_fingerprint"),
        **retriever.search_settings,
        "k": k,
        "questions": fingerprint(list(question_ids)),
        "live": getattr(retriever, "live_changes", 0),
    })


def _read_cache(path: Path, ids: Sequence[str]) -> dict | None:
    """The cached {question id: [[segment id, score], ...]} at `path`, or None (absent, or damaged: a cache
    is recomputed, never trusted; a flipped digit in a score or id would change what training reads)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        raw = saved["hits"]
        if saved["fingerprint"] == fingerprint(raw) and set(raw) == set(ids):
            return raw
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        log.warning("retrieval cache %s unreadable (%s): retrieving again", path, err)
        return None
    log.warning("retrieval cache %s does not match its hash or its questions: retrieving again", path)
    return None


def cached_hits(retriever, examples: Sequence[QAExample], k: int, cache_dir: Path,
                batch_size: int = 256, progress: bool = True) -> dict[str, list]:
    """{question id: top-k Hits}; computed once per fingerprint and stored as JSON (ids and scores)."""
    ids = [e.id for e in examples]
    path = Path(cache_dir) / f"retrieval-{retrieval_fingerprint(retriever, k, ids)}.json"
    raw = _read_cache(path, ids)
    if raw is None:
        raw = {}
        bar = tqdm(total=len(examples), desc=f"retrieving top-{k}", unit="q", disable=not progress)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            for ex, hits in zip(chunk, retriever.batch_search([e.question for e in chunk], k)):
                raw[ex.id] = [[h.segment_id, h.score] for h in hits]
            bar.update(len(chunk))
        bar.close()
        atomic_write_json(path, {"hits": raw, "fingerprint": fingerprint(raw)})
        log.info("cached top-%d retrieval of %d questions in %s", k, len(raw), path)
    needed = {sid for rows in raw.values() for sid, _ in rows}
    segments = retriever.segments(sorted(needed))
    from retriever.search import Hit

    return {
        qid: [Hit(sid, score, segments[sid].doc_id, segments[sid].title, segments[sid].text)
              for sid, score in rows if sid in segments]
        for qid, rows in raw.items()
    }
