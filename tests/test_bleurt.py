"""BLEURT through bleurt-pytorch 0.0.1 + eval.bleurt_compat, on tiny random checkpoints made in tmp_path.

A random model's scores mean nothing, so these tests check what can be checked: the package imports and
runs under transformers 5, the weights that are loaded are the ones saved (safetensors and .bin), inputs
are laid out as BLEURT lays them out, scores are one float per pair, deterministic and independent of
batching, and bad checkpoints fail with a clear message.
"""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import UserError
from eval.bleurt_compat import (
    BleurtScorer,
    find_pruneable_heads_and_indices,
    install_shims,
    load_bleurt,
)
from eval.metrics import Bleurt

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park", "paris", "is", "capital", "."]
WORDPIECE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ed"]


def _tiny_config(vocab_size: int, **extra):
    install_shims()
    from bleurt_pytorch import BleurtConfig

    return BleurtConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        **extra,
    )


def _tiny_model(config, seed: int = 0):
    from bleurt_pytorch import BleurtForSequenceClassification

    torch.manual_seed(seed)
    model = BleurtForSequenceClassification(config).eval()
    # The default init (std 0.02) squeezes every score to ~0; wider weights make input differences visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return model


@pytest.fixture()
def wordpiece_ckpt(tmp_path):
    """A bleurt-base style checkpoint: WordPiece vocab.txt + safetensors weights."""
    path = tmp_path / "bleurt-tiny"
    model = _tiny_model(_tiny_config(len(WORDPIECE_VOCAB)))
    model.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(WORDPIECE_VOCAB) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return path, model


def test_shims_make_the_package_import_and_restore_the_removed_helper():
    import transformers.pytorch_utils as pu

    pkg = install_shims()
    assert pkg.BleurtForSequenceClassification is not None
    assert install_shims() is pkg  # idempotent
    assert callable(pu.find_pruneable_heads_and_indices)
    # 3 heads of size 2, drop head 1 → keep rows 0,1 and 4,5
    heads, index = find_pruneable_heads_and_indices([1], 3, 2, set())
    assert heads == {1} and index.tolist() == [0, 1, 4, 5]
    # head 0 was pruned before (2 heads left); dropping original head 2 = current head 1 → rows 0,1
    heads, index = find_pruneable_heads_and_indices([0, 2], 2, 2, {0})
    assert heads == {2} and index.tolist() == [0, 1]


def test_round_trip_scores_and_layout(wordpiece_ckpt):
    path, saved = wordpiece_ckpt
    model, encoder = load_bleurt(path)
    saved_state = saved.state_dict()
    loaded_state = model.state_dict()
    assert loaded_state.keys() == saved_state.keys()
    for key, value in saved_state.items():
        assert torch.equal(loaded_state[key], value), key
    assert not model.training

    # [CLS] reference [SEP] candidate [SEP]; token types 0 for the reference part, 1 for the candidate
    batch = encoder(["the cat sat"], ["a dogs"], max_length=64)
    ids = batch["input_ids"][0].tolist()
    tokens = [WORDPIECE_VOCAB[i] for i in ids]
    assert tokens == ["[CLS]", "the", "cat", "sat", "[SEP]", "a", "dog", "##s", "[SEP]"]
    assert batch["token_type_ids"][0].tolist() == [0] * 5 + [1] * 4
    assert batch["attention_mask"][0].tolist() == [1] * 9

    refs = ["the cat sat on the mat", "a dog ran", "paris is the capital", "the cat", ""]
    cands = ["the cat sat on the mat", "the dog ran in the park", "paris", "a dog", "the mat"]
    scorer = BleurtScorer(path, batch_size=2)
    scores = scorer.score(refs, cands)
    assert len(scores) == len(refs) and all(isinstance(s, float) for s in scores)
    assert scorer.score(refs, cands) == scores  # deterministic (eval mode: no dropout)
    one_batch = BleurtScorer(path, batch_size=16).score(refs, cands)
    assert one_batch == pytest.approx(scores, abs=1e-5)  # padding does not change a score
    assert len({round(s, 6) for s in scores}) == len(scores)  # the score depends on the input

    # the same number as a direct forward of the model that was saved
    with torch.no_grad():
        direct = saved(**encoder(refs[1:2], cands[1:2], max_length=64)).logits[0, 0].item()
    assert scores[1] == pytest.approx(direct, abs=1e-5)


def test_bin_weights_load_without_pickle(tmp_path, wordpiece_ckpt):
    path, saved = wordpiece_ckpt
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    (bin_dir / "vocab.txt").write_text((path / "vocab.txt").read_text())
    torch.save(saved.state_dict(), bin_dir / "pytorch_model.bin")
    model, _ = load_bleurt(bin_dir)
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_truncation_and_position_cap(wordpiece_ckpt):
    path, _ = wordpiece_ckpt
    scorer = BleurtScorer(path, max_length=512)  # longer than the tiny model's 40 positions
    long_ref = " ".join(WORDS * 10)
    scores = scorer.score([long_ref, "the cat"], ["paris " * 50, long_ref])
    assert scorer.max_length == 40 and len(scores) == 2
    batch = scorer._encoder([long_ref], ["paris " * 50], max_length=16)
    assert batch["input_ids"].shape == (1, 16)


def test_pruning_heads_works_through_the_restored_helper(wordpiece_ckpt):
    path, _ = wordpiece_ckpt
    model, encoder = load_bleurt(path)
    attention = model.bleurt.encoder.layer[0].attention
    attention.prune_heads([1])
    assert attention.self.num_attention_heads == 1 and attention.self.query.out_features == 8
    out = model(**encoder(["the cat"], ["a dog"], max_length=32)).logits
    assert out.shape == (1, 1)


def test_sentencepiece_checkpoint_matches_sentencepiece(tmp_path):
    """BLEURT-20 style: spm.model tokenizer and a factorised embedding (embedding_size < hidden_size)."""
    spm = pytest.importorskip("sentencepiece", reason="BLEURT-20 checkpoints need sentencepiece")
    path = tmp_path / "bleurt20-tiny"
    path.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(["the cat sat on the mat", "a dog ran in the park", "Paris is a capital"] * 30)
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=40, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece="[PAD]", unk_piece="[UNK]",
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"], minloglevel=2,
    )  # fmt: skip
    (tmp_path / "spm.model").rename(path / "spm.model")
    sp = spm.SentencePieceProcessor(model_file=str(path / "spm.model"))
    model = _tiny_model(_tiny_config(sp.get_piece_size(), embedding_size=8))
    model.save_pretrained(path)

    loaded, encoder = load_bleurt(path)
    assert type(encoder).__name__ == "SentencePiecePairEncoder"
    assert hasattr(loaded.bleurt.encoder, "embedding_projection")
    ref, cand = "The cat sat in Paris.", "ﬁne ＡＢＣ dog"  # NFKC cases the transformers 5 fallback gets wrong
    batch = encoder([ref], [cand], max_length=64)
    cls, sep = sp.piece_to_id("[CLS]"), sp.piece_to_id("[SEP]")
    expected = [cls, *sp.encode(ref), sep, *sp.encode(cand), sep]
    assert batch["input_ids"][0].tolist() == expected
    assert batch["token_type_ids"][0].tolist() == [0] * (len(sp.encode(ref)) + 2) + [1] * (
        len(sp.encode(cand)) + 1
    )

    # truncation drops from the longer side first, as BLEURT's _truncate_seq_pair
    short = encoder(["the cat sat on the mat " * 5], ["dog"], max_length=12)
    row = short["input_ids"][0].tolist()
    assert len(row) == 12 and row[-3:] == [sep, *sp.encode("dog"), sep][-3:]

    scores = BleurtScorer(path, batch_size=2).score(["the cat", "a dog", ""], ["the cat", "Paris", "x"])
    # Batching changes padding and so matmul shapes: equal up to float rounding (bit-exact only on some CPUs;
    # an AVX2-only EPYC differed in the 7th digit).
    assert len(scores) == 3 and scores == pytest.approx(
        BleurtScorer(path, batch_size=3).score(["the cat", "a dog", ""], ["the cat", "Paris", "x"]), rel=1e-5
    )


def test_bad_checkpoints_fail_clearly(tmp_path, wordpiece_ckpt):
    path, saved = wordpiece_ckpt
    with pytest.raises(UserError, match="not a directory"):
        load_bleurt(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_bleurt(empty)
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(UserError, match="no weights"):
        load_bleurt(empty)

    # weights without the regression head must not be "completed" with random values
    from safetensors.torch import save_file

    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "config.json").write_text((path / "config.json").read_text())
    (headless / "vocab.txt").write_text((path / "vocab.txt").read_text())
    state = {k: v.contiguous() for k, v in saved.state_dict().items() if not k.startswith("classifier")}
    save_file(state, headless / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks weights: classifier"):
        load_bleurt(headless)

    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((path / name).read_bytes())
    with pytest.raises(UserError, match="no tokenizer"):
        load_bleurt(no_tok)

    # a vocabulary larger than the embedding table belongs to another model
    big = tmp_path / "big_vocab"
    big.mkdir()
    for name in ("config.json", "model.safetensors"):
        (big / name).write_bytes((path / name).read_bytes())
    (big / "vocab.txt").write_text("\n".join(WORDPIECE_VOCAB + [f"w{i}" for i in range(50)]) + "\n")
    with pytest.raises(UserError, match="do not belong together"):
        load_bleurt(big)

    bert_like = tmp_path / "bert"
    bert_like.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "bert"
    (bert_like / "config.json").write_text(json.dumps(cfg))
    (bert_like / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="not a BLEURT config"):
        load_bleurt(bert_like)


def test_bleurt_metric(wordpiece_ckpt):
    path, _ = wordpiece_ckpt
    skipped = Bleurt(checkpoint=None).compute(["a"], [["b"]])
    assert skipped.score is None and skipped.per_example is None
    assert "no BLEURT checkpoint" in skipped.skipped_reason

    metric = Bleurt(checkpoint=str(path), batch_size=4)
    preds = ["the cat sat", "paris", "a dog"]
    refs = [["the cat sat"], ["the capital", "paris is the capital", "park"], []]
    r = metric.compute(preds, refs)
    assert r.skipped_reason is None and len(r.per_example) == 3
    assert r.score == pytest.approx(sum(r.per_example) / 3)
    # several golds: the best pair counts; no gold: scored against ""
    single = [metric.scorer.score([g], ["paris"])[0] for g in refs[1]]
    assert r.per_example[1] == pytest.approx(max(single), abs=1e-5)
    assert r.per_example[2] == pytest.approx(metric.scorer.score([""], ["a dog"])[0], abs=1e-5)
