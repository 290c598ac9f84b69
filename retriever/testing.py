"""Tiny fixtures for tests and smoke runs: a random word-level BERT encoder and a toy fact store.

`make_tiny_encoder(path, words)` writes a sentence-transformers-loadable folder (BERT, mean pooling,
a WordPiece vocabulary of exactly `words`) in well under a second; `toy_documents()` and
`write_toy_store()` make a store of invented countries whose questions can only be answered by
finding the right country's segment. Nothing here touches the network or the embedded models.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from data_prep.records import Document, QAExample
from data_prep.segment import Segmenter, gold_positions
from data_prep.split import split_of
from data_prep.store import write_store

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SYLLABLES = ["ka", "lo", "mi", "ren", "tus", "vo", "zar", "pel"]
_SYLLABLES += ["qui", "dor", "bex", "ny", "sha", "tor", "ul", "fen"]
RELATIONS = {
    "capital": "What is the capital of {e}?",
    "leader": "Who leads {e}?",
    "river": "Which river flows through {e}?",
}


def words_of(texts) -> list[str]:
    """Lower-cased word and punctuation tokens of `texts` (what BERT's pre-tokenizer splits off)."""
    vocab: dict[str, None] = {}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]", t.lower()):
            vocab.setdefault(w, None)
    return list(vocab)


def make_tiny_encoder(
    path: Path | str, words, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0
) -> Path:
    """Write a random BERT + word-level tokenizer that SentenceTransformer(path) loads with mean pooling."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = Path(path)
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIAL, *words]))}
    tokenizer = BertTokenizer(vocab=vocab)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    model = BertModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _name(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4))))
        if name not in used:
            used.add(name)
            return name


def toy_documents(n: int = 40, seed: int = 0) -> tuple[list[Document], list[tuple[str, str, str]]]:
    """`n` invented countries: documents plus (doc_id, question, answer) triples, 3 per country."""
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    docs, questions = [], []
    for i in range(n):
        country, capital, leader, river = (_name(rng, used) for _ in range(4))
        title = country.capitalize()
        text = (
            f"{title} is a small country. The capital of {title} is {capital.capitalize()}. "
            f"{title} is led by {leader.capitalize()}. The {river.capitalize()} river flows through {title}."
        )
        doc_id = f"doc{i}"
        docs.append(Document(doc_id, title, text))
        for rel, answer in (("capital", capital), ("leader", leader), ("river", river)):
            questions.append((doc_id, RELATIONS[rel].format(e=title), answer.capitalize()))
    return docs, questions


def write_toy_store(
    store_dir: Path | str,
    docs: list[Document],
    questions: list[tuple[str, str, str]],
    tokenizer,
    window: int = 288,
    stride: int = 64,
    seed: int = 0,
    splits: dict[str, str] | None = None,
) -> Path:
    """Segment `docs` with `tokenizer` (a `tokenizers.Tokenizer`) and write a store with gold segments.

    Splits come from `splits` (doc_id → split) or else the project's split rule on the title.
    """
    segmenter = Segmenter(tokenizer, window, stride)
    segments, by_doc = [], {}
    for doc in docs:
        segs = segmenter.segment(doc, first_id=len(segments))
        by_doc[doc.id] = (doc, segs)
        segments.extend(segs)
    qa = []
    for j, (doc_id, question, answer) in enumerate(questions):
        doc, segs = by_doc[doc_id]
        split = (splits or {}).get(doc_id) or split_of(doc.title, seed)
        gold = [segs[p].segment_id for p in gold_positions([s.text for s in segs], [answer])]
        qa.append(QAExample(f"q{j}", question, [answer], doc_id, doc.title, gold, split))
    return write_store(store_dir, segments, qa, manifest_extra={"source": "retriever.testing"})


def build_toy_index(root: Path, extra_texts: tuple[str, ...] = (), overrides: tuple[str, ...] = (), n_docs: int = 30):
    """A tiny encoder (root/enc), a toy store and its index (root/run) through `python -m retriever.index`.

    The encoder's vocabulary covers the toy documents, their questions and `extra_texts`. Returns
    (cfg, overrides, encoder, docs, questions); `overrides` are the config overrides that open the run.
    """
    from configs.loader import load_config
    from retriever import index as index_cli
    from retriever.encoder import Encoder
    from retriever.search import tokenizer_backend

    docs, questions = toy_documents(n_docs)
    words = words_of([d.title + " " + d.text for d in docs] + [q for _, q, _ in questions] + list(extra_texts))
    make_tiny_encoder(root / "enc", words)
    args = [f"run_dir={root / 'run'}", f"retriever.model={root / 'enc'}", "index.shard_size=8",
            "retriever.batch_size=8", "device=cpu", *overrides]
    cfg = load_config(None, args)
    encoder = Encoder.from_config(cfg)
    write_toy_store(root / "run" / "store", docs, questions, tokenizer_backend(encoder))
    if index_cli.main(args) != 0:
        raise RuntimeError("python -m retriever.index failed on the toy store")
    return cfg, args, encoder, docs, questions
