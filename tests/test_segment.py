"""Segmentation: window/stride arithmetic, spans that map back to the text, title budget, gold segments."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from data_prep.records import Document
from data_prep.segment import Segmenter, gold_positions, iter_segmented, normalize_for_match
from data_prep.store import segment_input_text


def word_tokenizer() -> Tokenizer:
    """A BERT-style pre-tokenizer with an empty vocabulary: every word or punctuation mark is one token."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def n_tokens(tok: Tokenizer, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize(
    ("n", "title_words", "window", "stride"),
    [(1, 1, 10, 3), (9, 1, 10, 3), (10, 1, 10, 3), (100, 2, 12, 4), (1000, 3, 288, 64), (57, 0, 20, 0)],
)
def test_window_stride_arithmetic(n, title_words, window, stride):
    seg = Segmenter(word_tokenizer(), window, stride)
    doc = Document("d", words(title_words, 10_000), words(n))
    segs = seg.segment(doc)
    budget = window - title_words
    step = budget - stride
    assert len(segs) == 1 + math.ceil(max(0, n - budget) / step)
    assert segs[0].token_start == 0 and segs[-1].token_end == n
    for a, b in zip(segs, segs[1:]):
        assert b.token_start == a.token_start + step  # consecutive windows overlap by exactly `stride` tokens
        assert a.token_end - b.token_start == stride
    for s in segs:
        assert 0 < s.token_end - s.token_start <= budget
        assert n_tokens(seg.tok, segment_input_text(s)) <= window  # title counts inside the window


def test_spans_map_back_to_the_document_text():
    tok = word_tokenizer()
    text = "  Ünïcode   café, naïve—東京 text.\n\nSecond   paragraph: 42 items; " * 20 + "  end.  "
    doc = Document("d", "A Title", text)
    segs = Segmenter(tok, 16, 5).segment(doc, first_id=7)
    doc_offsets = tok.encode(text, add_special_tokens=False).offsets
    assert [s.segment_id for s in segs] == list(range(7, 7 + len(segs)))
    for s in segs:
        assert s.text == text[s.char_start : s.char_end]
        # Whole tokens only: the window starts at a token's first character and ends at a token's last.
        assert s.char_start == doc_offsets[s.token_start][0]
        assert s.char_end == doc_offsets[s.token_end - 1][1]
        assert n_tokens(tok, s.text) == s.token_end - s.token_start
        assert s.text == s.text.strip()
        assert s.doc_id == "d" and s.title == "A Title"
    assert segs[-1].text.endswith("end.")


def test_short_and_empty_documents():
    seg = Segmenter(word_tokenizer(), 288, 64)
    (only,) = seg.segment(Document("d", "T", "  just a short text.  "))
    assert only.text == "just a short text." and (only.char_start, only.char_end) == (2, 20)
    assert seg.segment(Document("e", "T", "   \n\t ")) == []
    assert seg.spans(["T"], [""])[0].shape == (0, 4)


def test_long_title_keeps_half_the_window_for_text():
    seg = Segmenter(word_tokenizer(), 20, 4)
    segs = seg.segment(Document("d", words(50, 500), words(30)))
    assert segs[0].token_end - segs[0].token_start == 10  # window // 2, not 20 - 50
    assert segs[-1].token_end == 30


def test_invalid_window_is_rejected():
    with pytest.raises(ValueError):
        Segmenter(word_tokenizer(), 10, 10)


def test_gold_positions_find_the_answer_window():
    seg = Segmenter(word_tokenizer(), 12, 2)
    text = words(30) + " the Answer   Phrase " + words(30, 100)
    segs = seg.segment(Document("d", "T", text))
    texts = [s.text for s in segs]
    gold = gold_positions(texts, ["answer phrase"])  # case- and whitespace-insensitive
    assert gold and all("Answer   Phrase" in texts[i] for i in gold)
    assert all("Answer" not in texts[i] for i in range(len(texts)) if i not in gold)
    assert gold_positions(texts, ["not there", "  "]) == []
    assert gold_positions(texts, []) == []
    assert normalize_for_match("  A\u00a0B\n c ") == "a b c"


def test_pool_gives_the_same_segments_in_order():
    seg = Segmenter(word_tokenizer(), 16, 4)
    rng = np.random.default_rng(0)
    docs = [Document(f"d{i}", f"T{i}", words(int(rng.integers(0, 80)))) for i in range(60)]
    serial = [(d.id, s.tolist(), t) for d, s, t in iter_segmented(docs, seg, num_workers=1, chunk_docs=7)]
    pooled = [
        (d.id, s.tolist(), t)
        for d, s, t in iter_segmented(iter(docs), seg, num_workers=2, chunk_docs=7, max_inflight=2)
    ]
    assert pooled == serial
    assert [d for d, _, _ in serial] == [d.id for d in docs]


@pytest.mark.slow
def test_embedded_minilm_tokenizer_is_not_truncated():
    """The packaged MiniLM tokenizer.json pads/truncates to 128: the segmenter must switch that off."""
    seg = Segmenter.from_model("embedded:minilm-l6", 288, 64)
    text = "The Velmora heron nests on Mount Tovan, 1,820 m high; its eggs are pale-blue. " * 60
    segs = seg.segment(Document("d", "Velmora heron", text))
    n = n_tokens(seg.tok, text)
    assert n > 600 and segs[-1].token_end == n and len(segs) > 2
    for s in segs:
        assert s.text == text[s.char_start : s.char_end]
        enc = seg.tok.encode(segment_input_text(s), add_special_tokens=True)
        assert len(enc.ids) <= 288 + 2  # [CLS] title \n text [SEP]
    assert len(seg.tokenizer_fingerprint) == 16
