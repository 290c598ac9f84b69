"""KVzip importance scores: which of a segment's cached K,V the LM needs to reconstruct the segment.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (2025): with the
segment's KV cache in place, the LM is teacher-forced through a repeat prompt followed by the segment again;
a KV pair's importance is the highest attention it receives from any of those reconstruction queries (maximum
over the query heads of its GQA group and over positions). Pairs the LM never looks at to restate the text
can go, whatever the question will be. Scores are computed once per segment, like the K,V themselves.

Shapes: ids (N, n) right-padded with mask (N, n); scores: one (N, H_kv, n) tensor per layer, padding 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"


@contextmanager
def eager_attention(lm):
    """Run `lm` with eager attention (the implementation that can return attention weights), then restore."""
    previous = lm.config._attn_implementation
    if previous == "eager":
        yield
        return
    lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.set_attn_implementation(previous)


@torch.no_grad()
def kvzip_scores(lm, ids: torch.Tensor, mask: torch.Tensor, cache, prompt_ids: Sequence[int],
                 chunk: int = 2) -> list[torch.Tensor]:
    """Scores of the segments' cached K,V (`cache`: the DynamicCache of the LM over `ids`).

    Segments are scored `chunk` at a time: the attention weights of every layer are (chunk, H_q, T, n + T).
    """
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    groups = text.num_attention_heads // (getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    n_seg, n = ids.shape
    lengths = mask.sum(1).tolist()
    per_layer: list[list[torch.Tensor]] = [[] for _ in cache.layers]
    for start in range(0, n_seg, chunk):
        rows = range(start, min(n_seg, start + chunk))
        # Repeat prompt + the segment's own tokens, right-padded; positions continue after each segment.
        recon = [list(prompt_ids) + ids[i, : lengths[i]].tolist() for i in rows]
        width = max(len(r) for r in recon)
        r_ids = torch.zeros(len(recon), width, dtype=torch.long, device=ids.device)
        r_mask = torch.zeros(len(recon), width, dtype=torch.long, device=ids.device)
        for j, r in enumerate(recon):
            r_ids[j, : len(r)] = torch.tensor(r, device=ids.device)
            r_mask[j, : len(r)] = 1
        sub = _sub_cache(cache, list(rows), lm.config)
        positions = torch.tensor([lengths[i] for i in rows], device=ids.device)[:, None] + torch.arange(
            width, device=ids.device)[None, :]
        with eager_attention(lm):
            out = lm.model(input_ids=r_ids, attention_mask=torch.cat([mask[list(rows)].long(), r_mask], 1),
                           position_ids=positions, past_key_values=sub, use_cache=True, output_attentions=True)
        for layer, attn in enumerate(out.attentions):
            # attn (c, H_q, T, n + T): the reconstruction queries' weights on the segment's n cached keys.
            on_segment = attn[:, :, :, :n].float() * r_mask[:, None, :, None]
            score = on_segment.amax(dim=2)  # (c, H_q, n): over reconstruction positions
            score = score.view(score.shape[0], -1, groups, n).amax(dim=2)  # (c, H_kv, n): over the GQA group
            per_layer[layer].append(score * mask[list(rows)][:, None, :])
    return [torch.cat(chunks) for chunks in per_layer]


def _sub_cache(cache, rows: list[int], config):
    """A fresh DynamicCache with the given batch rows of `cache` (the full cache must stay untouched)."""
    from transformers import DynamicCache

    sub = DynamicCache(config=config)
    index = torch.tensor(rows, device=cache.layers[0].keys.device)
    for layer, entry in enumerate(cache.layers):
        sub.update(entry.keys.index_select(0, index), entry.values.index_select(0, index), layer)
    return sub
