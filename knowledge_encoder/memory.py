"""`MemoryTokens` (`knowledge_encoder.compressor=memory`): P learned tokens that the LM reads after a segment.

The ICAE / 500xCompressor recipe: append P learned memory embeddings to the context, let the LM (with an
encode-time LoRA adapter, `knowledge_encoder.encode_lora_rank`) read context + memory, and keep the per-layer
K,V of the memory tokens as the compressed context. Unlike attention pooling, a memory slot at layer l is
the LM's own K,V of a token that has read the whole segment through l layers of attention and MLPs, so it
can hold a mixture the pooling of fixed K,V cannot.

Here the segment's K,V are the frozen LM's (the cached `lm_kv` features): only the P memory tokens run
through the LM, as a continuation of the segment's cache. That keeps a training step cheap (P tokens per
segment through the LM and back, not n + P) and the features cache as they are; the adapter, when there is
one, acts on the memory tokens' pass only.

Positions: memory token j of a segment of n tokens sits at min(n, max_tokens - P) + j, so every slot lies
before the prompt, which starts at max_segment_tokens whatever P is (a longer segment's last tokens and the
first slots then share positions; attention order, not position, keeps the slots after the segment).

Shapes: N segments right-padded to n tokens (`mask` (N, n)); K,V (N, H_kv, n, D) per layer in;
slots (N, H_kv, P, D) per layer out; embeddings (P, d_model).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from knowledge_encoder.compress import CompressedKV, slot_mask


def chunk_means(embeds: torch.Tensor, mask: torch.Tensor, slots: int) -> torch.Tensor:
    """Mean of each of P equal chunks of every segment's real tokens: (N, n, d), mask (N, n) -> (N, P, d).

    Token i of a segment of length m belongs to chunk floor(i P / m); a chunk without tokens (P > m) is zero."""
    n = mask.shape[1]
    lengths = mask.sum(1, keepdim=True).clamp(min=1)  # (N, 1)
    chunk = (torch.arange(n, device=mask.device)[None, :] * slots // lengths).clamp(max=slots - 1)  # (N, n)
    member = nn.functional.one_hot(chunk, slots).to(embeds.dtype) * mask[..., None].to(embeds.dtype)  # (N, n, P)
    sums = member.transpose(1, 2) @ embeds  # (N, P, d)
    return sums / member.sum(1)[..., None].clamp(min=1)


class MemoryTokens(nn.Module):
    def __init__(self, lm, slots: int, max_tokens: int, inputs: str = "learned", seed: int = 0):
        """`inputs`: what memory token j reads in at the embedding layer.

        `learned`: a learned embedding, started as that of one of P distinct random vocabulary tokens (in the
        LM's input distribution, and different from each other, so the slots do not start identical);
        `chunk_mean`: the mean token embedding of the segment's j-th of P equal chunks plus a learned offset
        that starts at zero, so each slot starts as a bag of words of its part of the segment that then reads
        the whole segment in context."""
        super().__init__()
        if slots > max_tokens:
            raise ValueError(f"{slots} memory tokens do not fit before position {max_tokens}")
        if inputs not in ("learned", "chunk_mean"):
            raise ValueError(f"unknown memory token inputs {inputs!r} (learned, chunk_mean)")
        self.slots, self.max_tokens, self.inputs = slots, max_tokens, inputs
        table = lm.get_input_embeddings().weight
        if inputs == "chunk_mean":
            self.embeddings = nn.Parameter(torch.zeros(slots, table.shape[1]))
        else:
            generator = torch.Generator().manual_seed(seed)
            rows = torch.randperm(table.shape[0], generator=generator)[:slots]
            self.embeddings = nn.Parameter(table.detach()[rows].float().clone())

    def positions(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, n) segment mask -> (N, P) RoPE positions of the memory tokens."""
        start = mask.sum(1).clamp(max=self.max_tokens - self.slots)  # (N,)
        return start[:, None] + torch.arange(self.slots, device=mask.device)[None, :]

    def forward(self, lm, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor,
                adapter=None, ids: torch.Tensor | None = None) -> CompressedKV:
        """The memory tokens' per-layer K,V after the segment's cached K,V; `adapter` (an EncodeAdapter) runs
        the LM under its LoRA weights; `ids` (N, n), the segments' token ids, are needed by `chunk_mean`."""
        n, batch = mask.shape[1], mask.shape[0]
        dtype = lm.get_input_embeddings().weight.dtype
        embeds = self.embeddings.to(dtype).expand(batch, -1, -1)  # (N, P, d)
        if self.inputs == "chunk_mean":
            if ids is None:
                raise ValueError("chunk_mean memory tokens need the segments' token ids (SegmentFeatures.ids)")
            with torch.no_grad():
                tokens = lm.get_input_embeddings()(ids)  # (N, n, d)
            embeds = embeds + chunk_means(tokens, mask, self.slots)
        cache = DynamicCache(config=lm.config)
        for layer, (k, v) in enumerate(zip(keys, values)):
            cache.update(k.to(dtype), v.to(dtype), layer)
        attention = torch.cat([mask, mask.new_ones(batch, self.slots)], dim=1).long()  # (N, n + P)
        inputs = dict(inputs_embeds=embeds, attention_mask=attention,
                      position_ids=self.positions(mask), past_key_values=cache, use_cache=True)
        out = adapter.run(lm, **inputs) if adapter is not None else lm.get_decoder()(**inputs)
        layers = out.past_key_values.layers
        return CompressedKV([layer.keys[:, :, n:] for layer in layers], [layer.values[:, :, n:] for layer in layers],
                            slot_mask(mask, self.slots))
