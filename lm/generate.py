"""Greedy decoding with a prefix: batched with left padding, stops at EOS or a newline, streams tokens.

It is exactly the step-by-step argmax of the full forward pass (a test checks this): the first step
runs the prompt after the prefix cache, later steps feed one token with the grown cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lm.forward import forward_with_prefix, prompt_positions, slot_bias
from lm.prefix import Prefix


@dataclass
class StopTokens:
    """Token ids that end an answer: EOS ids and every token whose text contains a newline."""

    ids: frozenset[int]

    @classmethod
    def for_tokenizer(cls, tokenizer) -> StopTokens:
        ids = set()
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, name, None)
            if isinstance(value, int):
                ids.add(value)
        for token in ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"):
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
        vocab = tokenizer.get_vocab()
        newline_ids = [i for i in vocab.values() if "\n" in tokenizer.decode([i])]
        ids.update(newline_ids)
        return cls(frozenset(ids))


@torch.no_grad()
def greedy_generate(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix: Prefix | None,
    stop: StopTokens,
    max_new_tokens: int,
    on_token: Callable[[int, int], None] | None = None,
    choose: Callable[[int, torch.Tensor, list[int]], int] | None = None,
    logprobs: list[list[float]] | None = None,
) -> list[list[int]]:
    """Generate for a left-padded batch (B, T). Returns the new token ids per row, stop token excluded.

    `on_token(row, token_id)` is called for every kept token as it is produced (for streaming).
    `choose(row, logits (V,), tokens_so_far) -> token_id` replaces the argmax (e.g. `lm.span.SpanConstraint`).
    `logprobs`, an empty list, receives per row the LM's log-probability of each chosen token, the stop token
    included (its log-probability says how sure the LM is that the answer ends there): the sum of a row is
    log p(answer + stop | prompt, prefix) under the unconstrained distribution.
    """
    batch = input_ids.shape[0]
    out = forward_with_prefix(lm, input_ids, attention_mask, prefix, logits_to_keep=1)
    cache = out.past_key_values
    mask = attention_mask if prefix is None else torch.cat([prefix.mask.to(attention_mask.dtype), attention_mask], 1)
    start = 0 if prefix is None else prefix.next_position
    position = prompt_positions(attention_mask, start)[:, -1:]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    results: list[list[int]] = [[] for _ in range(batch)]
    if logprobs is not None:
        logprobs[:] = [[] for _ in range(batch)]
    logits = out.logits[:, -1]
    for _ in range(max_new_tokens):
        next_ids = logits.argmax(-1)
        if choose is not None:
            for row in range(batch):
                if not done[row]:
                    next_ids[row] = choose(row, logits[row], results[row])
        if logprobs is not None:
            chosen = torch.log_softmax(logits.float(), -1).gather(1, next_ids[:, None])[:, 0].tolist()
        for row, tid in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if logprobs is not None:
                logprobs[row].append(chosen[row])
            if tid in stop.ids:
                done[row] = True
                continue
            results[row].append(tid)
            if on_token is not None:
                on_token(row, tid)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        bias = slot_bias(lm, prefix, mask.shape[1], cache.layers[0].keys.dtype)
        out = lm(
            input_ids=next_ids[:, None],
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
            **({} if bias is None else {"position_bias": bias}),
        )
        cache = out.past_key_values
        logits = out.logits[:, -1]
    return results
