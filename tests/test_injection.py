"""Prefix injection and generation on a tiny random LLaMA with GQA and an explicit head_dim."""

from __future__ import annotations

import torch

from knowledge_encoder.encoder import lm_dims
from lm.forward import forward_with_prefix, prompt_positions
from lm.generate import StopTokens, greedy_generate
from lm.prefix import Prefix
from tests.conftest import make_tiny_llama


def random_prefix(lm, batch: int, slots: int, seed: int = 1, next_position: int = 40) -> Prefix:
    layers, heads, dim = lm_dims(lm.config)
    g = torch.Generator().manual_seed(seed)
    return Prefix(
        keys=[torch.randn(batch, heads, slots, dim, generator=g) for _ in range(layers)],
        values=[torch.randn(batch, heads, slots, dim, generator=g) for _ in range(layers)],
        mask=torch.ones(batch, slots, dtype=torch.bool),
        next_position=next_position,
    )


def left_pad(rows, pad_id):
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    return ids, mask


def test_prompt_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert prompt_positions(mask, 10).tolist() == [[10, 10, 10, 11], [10, 11, 12, 13]]


def test_all_masked_prefix_gives_plain_lm_logits(tiny_llama):
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    mask = torch.ones_like(ids)
    plain = tiny_llama(input_ids=ids).logits
    prefix = random_prefix(tiny_llama, 1, 7)
    prefix.mask[:] = False
    with_prefix = forward_with_prefix(tiny_llama, ids, mask, prefix).logits
    # RoPE is relative, so starting the prompt at next_position instead of 0 changes nothing.
    torch.testing.assert_close(with_prefix, plain, atol=1e-4, rtol=1e-4)


def test_prefix_changes_logits_and_padding_slots_are_ignored(tiny_llama):
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    mask = torch.ones_like(ids)
    prefix = random_prefix(tiny_llama, 1, 6)
    out = forward_with_prefix(tiny_llama, ids, mask, prefix).logits
    assert not torch.allclose(out, tiny_llama(input_ids=ids).logits, atol=1e-3)
    # Hide the last 3 slots, then fill them with garbage: the output must not move.
    prefix.mask[:, 3:] = False
    ref = forward_with_prefix(tiny_llama, ids, mask, prefix).logits
    for k in prefix.keys:
        k[:, :, 3:] = 1e3
    torch.testing.assert_close(forward_with_prefix(tiny_llama, ids, mask, prefix).logits, ref)


def test_gradients_reach_prefix_not_lm(tiny_llama):
    prefix = random_prefix(tiny_llama, 2, 4)
    for t in prefix.keys + prefix.values:
        t.requires_grad_(True)
    ids = torch.tensor([[5, 17, 300], [8, 9, 10]])
    out = forward_with_prefix(tiny_llama, ids, torch.ones_like(ids), prefix)
    out.logits.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in prefix.keys + prefix.values)
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_generation_equals_stepwise_argmax(smol_tokenizer):
    lm = make_tiny_llama(len(smol_tokenizer), seed=3)
    stop = StopTokens(frozenset())  # never stop early, to compare full sequences
    prefix = random_prefix(lm, 1, 5)
    ids = torch.tensor([[11, 12, 13, 14]])
    got = greedy_generate(lm, ids, torch.ones_like(ids), prefix, stop, max_new_tokens=6)[0]
    seq = ids
    for _ in range(6):
        logits = forward_with_prefix(lm, seq, torch.ones_like(seq), prefix).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got == seq[0, 4:].tolist()


def test_left_padded_batch_matches_single_questions(smol_tokenizer):
    lm = make_tiny_llama(len(smol_tokenizer), seed=4)
    stop = StopTokens(frozenset())
    rows = [[11, 12, 13, 14, 15, 16], [21, 22], [31, 32, 33]]
    prefix = random_prefix(lm, 3, 5)
    prefix.mask[1, 3:] = False  # uneven segments: row 1 has only 3 real slots
    ids, mask = left_pad(rows, smol_tokenizer.pad_token_id)
    batched = greedy_generate(lm, ids, mask, prefix, stop, max_new_tokens=5)
    for i, row in enumerate(rows):
        one = torch.tensor([row])
        single = greedy_generate(lm, one, torch.ones_like(one), prefix.select([i]), stop, max_new_tokens=5)
        assert batched[i] == single[0]


def test_stop_tokens_include_eos_and_newlines(smol_tokenizer):
    stop = StopTokens.for_tokenizer(smol_tokenizer)
    assert smol_tokenizer.eos_token_id in stop.ids
    assert smol_tokenizer("\n", add_special_tokens=False)["input_ids"][0] in stop.ids
    assert smol_tokenizer("Paris", add_special_tokens=False)["input_ids"][0] not in stop.ids
