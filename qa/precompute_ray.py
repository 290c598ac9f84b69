"""Prefix precomputation on Ray Data (`compute.engine=ray`): `qa.precompute`'s batches encoded by Ray actors.

Each actor loads the frozen LM, the system's knowledge encoder from the checkpoint and its backbone once, then
runs `qa.precompute.encode_prefixes` (the local path's function) on the batches of segment ids it gets. A
prefix crosses Ray as float32 arrays plus the name of its dtype (a bf16/fp16 value is exact in float32, so the
driver gets the very tensors back) and `qa.precompute` writes it through the same `PrefixStoreWriter`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.ray_engine import BatchFn, RayOptions, run_batches
from data_prep.store import SegmentStore
from lm.prefix import Prefix


def prefix_arrays(prefix: Prefix) -> dict[str, np.ndarray]:
    """A Prefix (N, H, P, D per layer; mask (N, P); bias (N, H, P) or none) as numpy arrays, dtypes named."""
    out = {
        "layers": np.array(prefix.num_layers),
        "next_position": np.array(prefix.next_position),
        "dtype": np.array(str(prefix.keys[0].dtype).removeprefix("torch.")),
        "mask": prefix.mask.detach().cpu().numpy(),
    }
    for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        out[f"k{layer}"] = k.detach().float().cpu().numpy()
        out[f"v{layer}"] = v.detach().float().cpu().numpy()
    if prefix.bias is not None:
        out["bias"] = prefix.bias.detach().float().cpu().numpy()
        out["bias_dtype"] = np.array(str(prefix.bias.dtype).removeprefix("torch."))
    return out


def prefix_from_arrays(arrays: dict[str, np.ndarray]) -> Prefix:
    """The inverse of `prefix_arrays`, on the CPU."""
    dtype = getattr(torch, str(arrays["dtype"]))
    layers = int(arrays["layers"])
    bias = None
    if "bias" in arrays:
        bias = torch.from_numpy(arrays["bias"]).to(getattr(torch, str(arrays["bias_dtype"])))
    return Prefix(
        keys=[torch.from_numpy(arrays[f"k{i}"]).to(dtype) for i in range(layers)],
        values=[torch.from_numpy(arrays[f"v{i}"]).to(dtype) for i in range(layers)],
        mask=torch.from_numpy(arrays["mask"]),
        next_position=int(arrays["next_position"]),
        bias=bias,
    )


def _absolute(cfg):
    """A copy of `cfg` whose local model paths are absolute: actors do not run in the driver's directory."""
    cfg = copy.deepcopy(cfg)
    for section, key in (("lm", "model"), ("retriever", "model")):
        value = getattr(getattr(cfg, section), key)
        if Path(value).expanduser().exists():
            setattr(getattr(cfg, section), key, str(Path(value).expanduser().resolve()))
    if cfg.cache_dir:
        cfg.cache_dir = str(Path(cfg.cache_dir).expanduser().resolve())
    return cfg


def _prefix_worker(cfg, checkpoint: str, name: str, encoder_sha: str, store_path: str) -> BatchFn:
    """Run in each actor once: LM, knowledge encoder, backbone, store; then ids (n,) -> `prefix_arrays`."""
    from configs.models import load_lm
    from knowledge_encoder.backbones import build_backbone
    from lm.prompting import PromptTemplate
    from qa.checkpoint import encoder_sha256, load_models
    from qa.precompute import encode_prefixes

    if encoder_sha256(checkpoint, name) != encoder_sha:
        raise UserError(f"a Ray worker read other knowledge-encoder weights of `{name}` in {checkpoint} than the "
                        "driver: the checkpoint differs on that node or changed during the run")
    lm, tokenizer = load_lm(cfg.lm.model, cfg.cache_dir, cfg.device, cfg.lm.dtype)
    template = PromptTemplate(tokenizer, cfg.lm.system_prompt, cfg.lm.max_question_chars)
    model = load_models(Path(checkpoint), [name], lm, {"lm_layers": lm.config.hidden_size}, cfg.lm.model,
                        tokenizer=tokenizer)[name]
    device = next(lm.parameters()).device
    backbone = build_backbone(model.encoder.cfg, lm, template, cfg.retriever.model, device)
    store = SegmentStore.open(store_path)

    @torch.no_grad()
    def encode(ids: np.ndarray) -> dict[str, np.ndarray]:
        return prefix_arrays(encode_prefixes(store, backbone, model.encoder, device, [int(i) for i in ids]))

    return encode


def ray_prefixes(cfg, checkpoint: Path, name: str, store: SegmentStore, batches: list[list[int]]) -> Iterator[Prefix]:
    """The prefixes of `batches` (lists of segment ids) in order, computed by `compute.ray_workers` actors
    (Ray Data's progress bars off: precompute's bar counts the prefixes as they arrive)."""
    from qa.checkpoint import encoder_sha256

    checkpoint = Path(checkpoint).resolve()
    make_worker = functools.partial(_prefix_worker, _absolute(cfg), str(checkpoint), name,
                                    encoder_sha256(checkpoint, name), str(Path(store.path).resolve()))
    outputs = run_batches([np.asarray(b, dtype=np.int64) for b in batches], make_worker,
                          RayOptions.from_config(cfg.compute))
    try:
        for out in outputs:
            yield prefix_from_arrays(out)
    finally:
        outputs.close()
