"""Segmentation: documents → overlapping token windows of the retriever's tokenizer, as character spans.

Rules (documents cut into 288-token windows with stride 64; docs/ARCHITECTURE.md "Formats"):

- Tokens are those of the retriever's fast tokenizer (`cfg.retriever.model`), without special tokens.
- `window` (default 288) is the token budget of title + text: a segment holds at most
  `window - len(title tokens)` text tokens, so the encoder input `segment_input_text(seg)` (title, newline,
  text) is at most `window` tokens plus [CLS]/[SEP], and an encoder with `max_seq_length >= window + 2`
  never truncates a segment. (A title longer than half the window is not allowed to eat the text: the text
  budget never drops below `window // 2`, so only such documents, counted by the builder as `long_titles`,
  can exceed the window.)
- `stride` (default 64) is the OVERLAP between consecutive windows, as in Hugging Face's
  `return_overflowing_tokens=True, stride=...`: window starts advance by `budget - stride` tokens
  (288 - title - 64 = ~220). The last window ends at the document's last token and may be shorter.
- A document of at most `budget` tokens gives exactly one segment; a document with no tokens gives none
  (the builder skips and counts it). The number of segments of an n-token document is
  `1 + ceil(max(0, n - budget) / (budget - stride))`.
- Segments hold whole tokens: `text == document.text[char_start:char_end]`, from the first character of
  the first token to the last character of the last token (offset mapping of the fast tokenizer), and
  `[token_start, token_end)` is the window in the document's token sequence.

Multiprocessing: `iter_segmented` runs the tokenizer in a process pool, a bounded number of chunks in
flight so memory stays flat whatever the corpus size, and yields results in document order.
"""

from __future__ import annotations

import gc
import hashlib
import math
import multiprocessing as mp
import os
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import UserError
from data_prep.records import Document, Segment


def load_fast_tokenizer(spec: str):
    """The `tokenizers.Tokenizer` behind the retriever's HF fast tokenizer (spec as in `retriever.model`).

    Truncation and padding are switched off on a private copy: the packaged MiniLM tokenizer.json, for
    one, pads and truncates to 128 tokens, which would silently cut every document.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from configs.models import resolve_encoder_path

    path = resolve_encoder_path(spec)
    try:
        hf_tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of `{spec}` ({path}): {e}") from e
    if not getattr(hf_tok, "is_fast", False):
        raise UserError(
            f"`{spec}` has no fast tokenizer; segmentation needs its offset mapping (tokenizer.json)"
        )
    tok = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def encoder_positions(spec: str) -> int | None:
    """The position limit in the config.json of encoder `spec`, when its folder is on disk (else None)."""
    import json
    from pathlib import Path

    from configs.models import resolve_encoder_path

    try:
        config = Path(resolve_encoder_path(spec)) / "config.json"
        value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, UserError):
        return None  # a hub id, a bare tokenizer folder: the encoder's load checks it (retriever.index)
    return value if isinstance(value, int) and value > 0 else None


@dataclass(frozen=True)
class SegmenterSpec:
    """Everything a worker process needs to rebuild the segmenter (picklable, small)."""

    tokenizer_json: str
    window: int = 288
    stride: int = 64


class Segmenter:
    """Cuts (title, text) pairs into token windows; see the module docstring for the rules."""

    def __init__(self, tokenizer, window: int = 288, stride: int = 64):
        if window < 2 or not 0 <= stride < window:
            raise ValueError(
                f"need window >= 2 and 0 <= stride < window; got window={window}, stride={stride}"
            )
        self.tok = tokenizer
        self.window = window
        self.stride = stride
        self.min_budget = max(1, window // 2)

    @classmethod
    def from_spec(cls, spec: SegmenterSpec) -> Segmenter:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(spec.tokenizer_json)
        tok.no_truncation()
        tok.no_padding()
        return cls(tok, spec.window, spec.stride)

    @classmethod
    def from_model(cls, spec: str, window: int = 288, stride: int = 64) -> Segmenter:
        return cls(load_fast_tokenizer(spec), window, stride)

    @property
    def spec(self) -> SegmenterSpec:
        return SegmenterSpec(self.tok.to_str(), self.window, self.stride)

    @property
    def tokenizer_fingerprint(self) -> str:
        """sha256 (16 hex) of the tokenizer's serialized form: identical tokenization ⇔ same fingerprint."""
        return hashlib.sha256(self.tok.to_str().encode("utf-8")).hexdigest()[:16]

    def budget(self, title_tokens: int) -> int:
        """Text tokens per window for a title of `title_tokens` tokens."""
        return max(self.window - title_tokens, self.min_budget)

    def spans(self, titles: Sequence[str], texts: Sequence[str]) -> list[np.ndarray]:
        """For each document, its windows as an int64 array of shape (n_segments, 4):
        columns char_start, char_end, token_start, token_end. A document without tokens gives shape (0, 4).
        """
        return self.spans_and_title_lengths(titles, texts)[0]

    def spans_and_title_lengths(
        self, titles: Sequence[str], texts: Sequence[str]
    ) -> tuple[list[np.ndarray], list[int]]:
        """`spans(...)` plus the token count of each title."""
        title_lens = [len(e.ids) for e in self.tok.encode_batch(list(titles), add_special_tokens=False)]
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for title_len, enc in zip(title_lens, encs):
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            out.append(self._windows(offsets, self.budget(title_len)))
        return out, title_lens

    def _windows(self, offsets: np.ndarray, budget: int) -> np.ndarray:
        n = len(offsets)
        if n == 0:
            return np.zeros((0, 4), dtype=np.int64)
        step = max(budget - self.stride, 1)
        count = 1 + math.ceil(max(0, n - budget) / step)
        ts = np.arange(count, dtype=np.int64) * step
        te = np.minimum(ts + budget, n)
        return np.stack([offsets[ts, 0], offsets[te - 1, 1], ts, te], axis=1)

    def segment(self, doc: Document, first_id: int = 0) -> list[Segment]:
        """The segments of one document, numbered from `first_id`."""
        (spans,) = self.spans([doc.title], [doc.text])
        return spans_to_segments(doc, spans, first_id)


def spans_to_segments(doc: Document, spans: np.ndarray, first_id: int) -> list[Segment]:
    return [
        Segment(first_id + i, doc.id, doc.title, doc.text[cs:ce], cs, ce, ts, te)
        for i, (cs, ce, ts, te) in enumerate(spans.tolist())
    ]


# ---------------------------------------------------------------------------------------------- gold segments


def normalize_for_match(s: str) -> str:
    """Lowercase, NFKC, whitespace-collapsed: the answer-in-segment test is `norm(answer) in norm(text)`."""
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


def gold_positions(
    segment_texts: Sequence[str], answers: Iterable[str], normalized: bool = False
) -> list[int]:
    """Positions (into `segment_texts`) of the segments that contain one of `answers`
    (`normalized=True`: the texts are already `normalize_for_match`-ed, e.g. cached for several questions)."""
    needles = [a for a in (normalize_for_match(x) for x in answers) if a]
    if not needles:
        return []
    texts = segment_texts if normalized else [normalize_for_match(t) for t in segment_texts]
    return [i for i, t in enumerate(texts) if any(a in t for a in needles)]


# ---------------------------------------------------------------------------------------------- the pool

_WORKER: Segmenter | None = None


def _init_worker(spec: SegmenterSpec) -> None:
    global _WORKER
    # Each worker is one core's worth of work: no Rust thread pool inside it.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = Segmenter.from_spec(spec)


def _work(chunk: list[tuple[str, str]]) -> tuple[list[np.ndarray], list[int]]:
    return _WORKER.spans_and_title_lengths([t for t, _ in chunk], [x for _, x in chunk])


def _chunks(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for d in docs:
        chunk.append(d)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def resolve_workers(num_workers: int) -> int:
    return num_workers if num_workers > 0 else (os.cpu_count() or 1)


def iter_segmented(
    docs: Iterable[Document],
    segmenter: Segmenter,
    num_workers: int = 0,
    chunk_docs: int = 256,
    max_inflight: int | None = None,
) -> Iterator[tuple[Document, np.ndarray, int]]:
    """(document, spans, title tokens) for every document, in input order; spans as in `Segmenter.spans`.

    num_workers: processes (0 = all cores); 1 tokenizes in this process. At most `max_inflight` chunks
    (default 4 per worker) are queued, so only O(workers × chunk_docs) documents are ever held in memory
    (`Pool.imap` would read the whole input ahead of the workers).
    """
    workers = resolve_workers(num_workers)
    if workers == 1:
        for chunk in _chunks(docs, chunk_docs):
            spans, title_lens = segmenter.spans_and_title_lengths(
                [d.title for d in chunk], [d.text for d in chunk]
            )
            yield from zip(chunk, spans, title_lens)
        return
    max_inflight = max_inflight or 4 * workers
    # fork is fastest (no re-import); workers only need the tokenizer, passed as its JSON.
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else methods[0])
    # While forking, the objects that exist (the QA set, id sets...) sit in a generation the GC never scans,
    # so the workers' collectors do not touch, and copy-on-write, every page of them.
    gc.freeze()
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(segmenter.spec,))
    finally:
        gc.unfreeze()
    pending: deque = deque()
    with pool:
        it = _chunks(docs, chunk_docs)
        exhausted = False
        while True:
            while not exhausted and len(pending) < max_inflight:
                chunk = next(it, None)
                if chunk is None:
                    exhausted = True
                    break
                pending.append((chunk, pool.apply_async(_work, ([(d.title, d.text) for d in chunk],))))
            if not pending:
                break
            chunk, result = pending.popleft()
            spans, title_lens = result.get()
            yield from zip(chunk, spans, title_lens)
