"""A complete tiny run_dir for tests: synthetic world -> store -> index (tiny random encoder) + a tiny LM."""

from __future__ import annotations

import json
from pathlib import Path

from configs.loader import load_config
from tests.conftest import make_tiny_llama


def tiny_overrides(root: Path, n_entities: int = 30, overrides: tuple[str, ...] = ()) -> list[str]:
    """The config overrides of a tiny run under `root` (also what tests pass to the commands as subprocesses)."""
    root = Path(root)
    return [
        f"run_dir={root / 'run'}",
        f"data.synthetic.n_entities={n_entities}",
        "data.num_workers=1",
        f"lm.model={root / 'tiny-llama'}",
        "lm.max_new_tokens=4",
        "index.factory=Flat",
        "knowledge_encoder.max_segment_tokens=96",
        "knowledge_encoder.format_slots=2",
        "train.static_slots=3",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.eval_every=0",
        "train.save_every=0",
        "train.dev_limit=4",
        "train.warmup_steps=1",
        "eval.batch_size=4",
        *overrides,
    ]


def make_tiny_run(root: Path, tokenizer, n_entities: int = 30, overrides: tuple[str, ...] = ()):
    """Returns a Config whose run_dir holds store/ and index/, with lm.model a saved tiny random LLaMA."""
    from data_prep.build import build_store
    from retriever.index import build_index
    from retriever.testing import make_tiny_encoder, words_of

    root = Path(root)
    lm_dir = root / "tiny-llama"
    if not (lm_dir / "config.json").is_file():
        # A wider init than the default 0.02 gives logits a prefix can move (near-uniform logits cannot learn).
        make_tiny_llama(len(tokenizer), initializer_range=0.2).save_pretrained(lm_dir)
        tokenizer.save_pretrained(lm_dir)
    cfg = load_config(None, tiny_overrides(root, n_entities, overrides))
    build_store(cfg, progress=False)
    enc_dir = root / "tiny-encoder"
    if not enc_dir.is_dir():
        corpus = Path(cfg.run_dir) / "data" / "corpus.jsonl"
        qa = Path(cfg.run_dir) / "data" / "qa.jsonl"
        texts = [json.loads(line)["title"] + " " + json.loads(line)["text"] for line in corpus.open()]
        texts += [json.loads(line)["question"] for line in qa.open()]
        make_tiny_encoder(enc_dir, words_of(texts))
    cfg.retriever.model = str(enc_dir)
    build_index(cfg, progress=False)
    return cfg
