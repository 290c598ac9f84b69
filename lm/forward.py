"""Running the frozen LM with a prefix: the one injection path used by training, generation and the teacher.

The prefix enters as a fresh `DynamicCache` (transformers builds the causal mask from the cache length and
the 2-D attention mask, and uses `position_ids` only for RoPE), so no modeling file is forked. A prefix's
slot bias (`Prefix.bias`) enters through SDPA attention's public `position_bias` argument, an additive logit
that every layer adds to its attention scores.
"""

from __future__ import annotations

import torch

from lm.prefix import Prefix


def prompt_positions(attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """RoPE positions of (left-padded) prompt tokens: the first real token of every row sits at `start`.

    attention_mask: (B, T) of 0/1 -> (B, T) long; padding positions get `start` (they are masked anyway).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0) + start


def slot_bias(lm, prefix: Prefix | None, key_length: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The prefix's slot bias as SDPA's additive `position_bias`: (B, H_q, 1, key_length), the bias on the prefix's
    S columns and 0 on the key_length - S prompt/answer columns. None when the prefix has no bias.

    Prefix.bias is per KV head (B, H_kv, S); each query head of a GQA group gets its KV head's bias.
    """
    if prefix is None or prefix.bias is None:
        return None
    implementation = getattr(lm.config, "_attn_implementation", None)
    if implementation != "sdpa":
        raise ValueError(f"a prefix with slot biases needs the LM's sdpa attention (it adds them as position_bias); "
                         f"this LM runs `{implementation}`: load it with attn_implementation='sdpa'")
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    groups = text.num_attention_heads // prefix.bias.shape[1]
    bias = prefix.bias.to(dtype).repeat_interleave(groups, dim=1)  # (B, H_q, S)
    tail = bias.new_zeros(bias.shape[0], bias.shape[1], key_length - bias.shape[2])
    return torch.cat([bias, tail], dim=2)[:, :, None, :]


def forward_with_prefix(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix: Prefix | None,
    *,
    position_start: int | None = None,
    output_hidden_states: bool = False,
    logits_to_keep: int | torch.Tensor = 0,
):
    """One forward pass of `lm` over `input_ids` (B, T) after `prefix` (B, H_kv, S, D per layer).

    Returns the model output (logits (B, T, V); `past_key_values` holds prefix + prompt for decoding).
    """
    if prefix is None:
        start = 0 if position_start is None else position_start
        return lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=prompt_positions(attention_mask, start),
            use_cache=True,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
        )
    if prefix.batch_size != input_ids.shape[0]:
        raise ValueError(f"prefix batch {prefix.batch_size} != prompt batch {input_ids.shape[0]}")
    dtype = next(lm.parameters()).dtype
    if torch.is_autocast_enabled(input_ids.device.type):
        dtype = torch.get_autocast_dtype(input_ids.device.type)
    prefix = prefix.to(device=input_ids.device, dtype=dtype)
    full_mask = torch.cat([prefix.mask.to(attention_mask.dtype), attention_mask], dim=1)
    start = prefix.next_position if position_start is None else position_start
    extra = {}
    if prefix.bias is not None:
        extra["position_bias"] = slot_bias(lm, prefix, full_mask.shape[1], dtype)
    return lm(
        input_ids=input_ids,
        attention_mask=full_mask,
        position_ids=prompt_positions(attention_mask, start),
        past_key_values=prefix.to_cache(lm.config),
        use_cache=True,
        output_hidden_states=output_hidden_states,
        logits_to_keep=logits_to_keep,
        **extra,
    )
