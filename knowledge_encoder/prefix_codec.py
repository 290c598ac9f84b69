"""How a segment's prefix is written to disk: the dtype of its K,V and, for int8 / int4, its scales.

    encode(prefix, dtype) -> tensors      decode(tensors) -> Prefix

Rows: keys/values (N, L, H, P, D), mask (N, P), bias (N, H, P) when the prefix has slot biases. `int8` stores
keys quantised per channel (one scale per layer, head and dimension over the P slots: keys have outlier
channels) and values per slot (one scale per layer, head and slot over the D dimensions), as KIVI does, with
float16 scales: a P = 32 prefix of SmolLM2-135M is 369 KB of codes + 17 KB of scales, against 737 KB in bf16.
`int4` groups the same way but asymmetrically (a float16 scale and minimum per group, 16 levels between them, as
KIVI does at 4 bits) and packs two codes per byte along D: a P = 64 prefix is 369 KB of codes + 46 KB of
scales and minima, a P = 32 one 184 + 35 KB.
"""

from __future__ import annotations

import torch

from lm.prefix import Prefix

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STORE_DTYPES = (*DTYPES, "int8", "int4")


def _quantise(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over `dim`: codes (int8, like x) and float16 scales (x's shape with `dim` of size 1)."""
    scale = x.abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-8) / 127.0
    scale = scale.to(torch.float16)
    codes = (x.float() / scale.float()).round().clamp(-127, 127).to(torch.int8)
    return codes, scale


def _quantise4(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit over `dim`: codes packed two per byte along the last dimension (uint8, last size halved),
    float16 scales and minima (x's shape with `dim` of size 1). x's last dimension must be even."""
    if x.shape[-1] % 2:
        raise ValueError(f"int4 packs two codes per byte along the head dimension; {x.shape[-1]} is odd")
    x = x.float()
    low = x.amin(dim=dim, keepdim=True).to(torch.float16)
    scale = ((x.amax(dim=dim, keepdim=True) - low.float()) / 15.0).clamp(min=1e-8).to(torch.float16)
    codes = ((x - low.float()) / scale.float()).round().clamp(0, 15).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale, low


def _dequantise4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The inverse of `_quantise4`: (..., D/2) uint8 -> (..., D) float32."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)  # even, odd codes back in place
    return codes.float() * scale.float() + low.float()


def encode(prefix: Prefix, dtype: str) -> dict[str, torch.Tensor]:
    """A batch of per-segment prefixes (N, H, P, D per layer) -> the tensors of N stored rows (on the CPU)."""
    keys = torch.stack(prefix.keys, dim=1).detach().cpu()  # (N, L, H, P, D)
    values = torch.stack(prefix.values, dim=1).detach().cpu()
    out = {"mask": prefix.mask.detach().cpu().contiguous()}
    if prefix.bias is not None:
        out["bias"] = prefix.bias.detach().float().cpu().contiguous()
    if dtype == "int8":
        out["keys"], out["key_scales"] = _quantise(keys, dim=3)  # per (layer, head, channel)
        out["values"], out["value_scales"] = _quantise(values, dim=4)  # per (layer, head, slot)
    elif dtype == "int4":
        out["keys"], out["key_scales"], out["key_mins"] = _quantise4(keys, dim=3)
        out["values"], out["value_scales"], out["value_mins"] = _quantise4(values, dim=4)
    elif dtype in DTYPES:
        out["keys"] = keys.to(DTYPES[dtype])
        out["values"] = values.to(DTYPES[dtype])
    else:
        raise ValueError(f"unknown prefix store dtype {dtype!r}; one of {', '.join(STORE_DTYPES)}")
    return {k: v.contiguous() for k, v in out.items()}


def decode(rows: dict[str, torch.Tensor], next_position: int, device=None) -> Prefix:
    """Stored rows (N, L, H, P, D) -> a float32 Prefix (N, H, P, D per layer) on `device`."""
    keys, values = rows["keys"], rows["values"]
    if keys.dtype == torch.uint8:
        keys = _dequantise4(keys, rows["key_scales"], rows["key_mins"])
        values = _dequantise4(values, rows["value_scales"], rows["value_mins"])
    elif keys.dtype == torch.int8:
        keys = keys.float() * rows["key_scales"].float()
        values = values.float() * rows["value_scales"].float()
    keys = keys.to(device=device, dtype=torch.float32)
    values = values.to(device=device, dtype=torch.float32)
    bias = rows.get("bias")
    return Prefix(keys=list(keys.unbind(1)), values=list(values.unbind(1)), mask=rows["mask"].to(device),
                  next_position=next_position, bias=None if bias is None else bias.to(device))


def row_bytes(rows: dict[str, torch.Tensor]) -> int:
    """Bytes of the stored tensors (all rows)."""
    return sum(t.numel() * t.element_size() for t in rows.values())


def stack_segments(parts: list[Prefix]) -> Prefix:
    """Single-segment prefixes of possibly different slot counts -> one (N, H, P_max, D) batch, padding masked."""
    width = max(p.length for p in parts)

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        extra = width - t.shape[dim]
        if not extra:
            return t
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t, t.new_zeros(shape)], dim=dim)

    has_bias = any(p.bias is not None for p in parts)
    return Prefix(
        keys=[torch.cat([pad(p.keys[i], 2) for p in parts]) for i in range(parts[0].num_layers)],
        values=[torch.cat([pad(p.values[i], 2) for p in parts]) for i in range(parts[0].num_layers)],
        mask=torch.cat([pad(p.mask, 1) for p in parts]),
        next_position=max(p.next_position for p in parts),
        bias=torch.cat([pad(p.bias if p.bias is not None else p.keys[0].new_zeros(p.batch_size, p.keys[0].shape[1],
                                                                                    p.length), 2)
                        for p in parts]) if has_bias else None,
    )
