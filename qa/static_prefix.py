"""The static prefix of `static_prefix` and `rag_text_tuned`: peft PrefixTuning, read through our Prefix path.

The trainable module is peft's own `PrefixEncoder` (no reparameterisation), saved in peft's adapter format
(`adapter_config.json` + `adapter_model.safetensors` with `prompt_embeddings`), so
`PeftModel.from_pretrained(lm, dir)` loads the same adapter (a test checks both give the same logits).
The slot layout follows peft: (S, L*2*H*D) viewed as (S, 2L, H, D) with K at 2l and V at 2l+1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PrefixEncoder, PrefixTuningConfig
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import UserError
from knowledge_encoder.encoder import lm_dims
from lm.prefix import Prefix

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def prefix_tuning_config(lm_config, num_virtual_tokens: int, base_model: str = "") -> PrefixTuningConfig:
    layers, kv_heads, head_dim = lm_dims(lm_config)
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        num_layers=layers,
        token_dim=kv_heads * head_dim,
        num_attention_heads=kv_heads,
        num_transformer_submodules=1,
        prefix_projection=False,
        base_model_name_or_path=base_model or None,
    )


class StaticPrefix(nn.Module):
    """S learned virtual tokens of per-layer K,V, the same for every question."""

    def __init__(self, lm_config, num_virtual_tokens: int, init: Prefix | None = None, base_model: str = ""):
        super().__init__()
        self.peft_config = prefix_tuning_config(lm_config, num_virtual_tokens, base_model)
        self.encoder = PrefixEncoder(self.peft_config)
        self.layers, self.kv_heads, self.head_dim = lm_dims(lm_config)
        self.slots = num_virtual_tokens
        if init is not None:
            self.load_from_prefix(init)

    @torch.no_grad()
    def load_from_prefix(self, init: Prefix) -> None:
        """Start from real K,V (e.g. the LM's own K,V of a short text): trains faster than random slots."""
        if init.length < self.slots:
            raise ValueError(f"init prefix has {init.length} slots, need {self.slots}")
        kv = torch.stack(
            [t[0, :, : self.slots] for pair in zip(init.keys, init.values) for t in pair]
        )  # (2L, H, S, D)
        self.encoder.embedding.weight.copy_(kv.permute(2, 0, 1, 3).reshape(self.slots, -1))

    def forward(self, batch: int) -> Prefix:
        weight = self.encoder.embedding.weight  # (S, 2L*H*D)
        kv = weight.view(self.slots, 2 * self.layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, H, S, D)
        return Prefix(
            keys=[kv[2 * layer] for layer in range(self.layers)],
            values=[kv[2 * layer + 1] for layer in range(self.layers)],
            mask=torch.ones(batch, self.slots, dtype=torch.bool, device=weight.device),
            next_position=self.slots,
        )

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = self.peft_config.to_dict()
        config["peft_type"] = "PREFIX_TUNING"
        config["task_type"] = "CAUSAL_LM"
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))
        save_file({"prompt_embeddings": self.encoder.embedding.weight.detach().cpu().contiguous()},
                  str(directory / ADAPTER_WEIGHTS))

    @classmethod
    def load(cls, directory: Path, lm_config) -> StaticPrefix:
        config_path = directory / ADAPTER_CONFIG
        if not config_path.is_file():
            raise UserError(f"{directory} holds no peft adapter ({ADAPTER_CONFIG} missing)")
        saved = json.loads(config_path.read_text())
        module = cls(lm_config, int(saved["num_virtual_tokens"]))
        if saved.get("token_dim") != module.peft_config.token_dim or saved.get("num_layers") != module.layers:
            raise UserError(
                f"the adapter in {directory} was trained for another LM (token_dim {saved.get('token_dim')}, "
                f"{saved.get('num_layers')} layers; this LM needs {module.peft_config.token_dim}, {module.layers})"
            )
        weights = load_file(str(directory / ADAPTER_WEIGHTS))
        module.encoder.embedding.weight.data.copy_(weights["prompt_embeddings"])
        return module
