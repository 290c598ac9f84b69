"""Fill the prefix store: the prefix of every segment of the index, for each trained dynamic system.

    python -m qa.precompute --config configs/default.yaml [--systems dynamic_prefix@p32]

Reads the checkpoint (`qa.checkpoint` or run_dir/checkpoints/final) and run_dir/store; writes
run_dir/prefixes/<system>/ (safetensors shards + manifest fingerprinted by the encoder weights and the
segment store). Resumes an interrupted run; a finished, matching store is left as it is. `compute.engine=ray`
computes the batches' prefixes on Ray Data actors (qa/precompute_ray.py) and writes the same shards.

The command lives in qa/ because it reads checkpoints (`qa.checkpoint`); the store's format and writer stay
in `knowledge_encoder.prefix_store`, which knows nothing of checkpoints. (It was `knowledge_encoder.precompute`,
which now only says where the command went.)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.errors import UserError
from configs.cli import build_parser, parse, run_main
from configs.models import load_lm
from data_prep.store import SegmentStore
from knowledge_encoder.backbones import build_backbone
from knowledge_encoder.prefix_store import PrefixStoreWriter, prefix_dir
from lm.prefix import Prefix
from lm.prompting import PromptTemplate, TextSegment
from qa.checkpoint import encoder_sha256, load_models, read_manifest
from qa.system import default_checkpoint

log = logging.getLogger("qa.precompute")

# Re-exported for callers of the command's module (where these two lived): the store's path, the weights' hash.
__all__ = ["encode_prefixes", "encoder_sha256", "main", "precompute", "prefix_dir"]


@torch.no_grad()
def precompute(cfg, systems: list[str] | None = None, progress: bool = True) -> dict[str, dict]:
    checkpoint = default_checkpoint(cfg)
    held = read_manifest(checkpoint)["systems"]
    names = systems or [n for n, info in held.items() if "knowledge_encoder" in info]
    if not names:
        raise UserError(f"checkpoint {checkpoint} holds no dynamic_prefix system to precompute")
    lm, tokenizer = load_lm(cfg.lm.model, cfg.cache_dir, cfg.device, cfg.lm.dtype)
    template = PromptTemplate(tokenizer, cfg.lm.system_prompt, cfg.lm.max_question_chars)
    store = SegmentStore.open(Path(cfg.run_dir) / "store")
    models = load_models(checkpoint, names, lm, {"lm_layers": lm.config.hidden_size}, cfg.lm.model,
                         tokenizer=tokenizer)
    device = next(lm.parameters()).device
    report = {}
    for name, model in models.items():
        if model.encoder is None:
            raise UserError(f"`{name}` has no knowledge encoder; only dynamic systems have prefixes to precompute")
        # The dtype is a serving choice (this command's config), not the checkpoint's.
        dtype = cfg.knowledge_encoder.store_dtype
        meta = {"system": name, "encoder_sha256": encoder_sha256(checkpoint, name),
                "store_fingerprint": store.fingerprint, "next_position": model.encoder.next_position,
                "prefix_slots": model.encoder.slots, "dtype": dtype}
        out = prefix_dir(cfg.run_dir, name)
        writer = PrefixStoreWriter(out, meta, dtype)
        if writer.manifest.get("complete"):
            log.info("%s: prefix store %s is complete and current", name, out)
            report[name] = {"segments": writer.manifest["count"], "seconds": 0.0, "skipped": True}
            continue
        t0 = time.perf_counter()
        plan = _plan(store, writer.done_ids(), cfg.knowledge_encoder.batch_size)
        batches = [ids for _, ids in plan if ids]
        if cfg.compute.engine == "ray":
            from qa.precompute_ray import ray_prefixes

            prefixes = ray_prefixes(cfg, checkpoint, name, store, batches)
        else:
            backbone = build_backbone(model.encoder.cfg, lm, template, cfg.retriever.model, device)
            prefixes = (encode_prefixes(store, backbone, model.encoder, device, ids) for ids in batches)
        shard_rows = cfg.knowledge_encoder.store_shard_rows or (256 if model.encoder.slots else 32)
        try:
            _fill(writer, plan, prefixes, shard_rows, progress, name)
        finally:
            prefixes.close()  # a Ray run stops its actors here, also on an error
        writer.finish()
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.glob("shard-*.safetensors"))
        report[name] = {"segments": writer.manifest["count"], "seconds": round(seconds, 1),
                        "bytes": size, "bytes_per_segment": size / max(1, writer.manifest["count"])}
        log.info("%s: %s", name, report[name])
    return report


def _plan(store: SegmentStore, done: set[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """The store's batches in segment-id order, `batch_size` at a time: (segments in the batch, the ids of those
    not in the store yet). Both engines encode exactly these batches, so their prefixes are the same."""
    ids = store.segment_ids()
    plan = []
    for off in range(0, len(ids), batch_size):
        batch = ids[off : off + batch_size]
        plan.append((len(batch), [int(i) for i in batch if int(i) not in done]))
    return plan


def encode_prefixes(store: SegmentStore, backbone, encoder, device, ids: list[int]) -> Prefix:
    """The prefixes of segments `ids` (N, H, P, D per layer): backbone features, then the knowledge encoder."""
    segments = store.get_many(ids)
    feats = backbone.features([TextSegment(s.title, s.text) for s in segments]).to(device, torch.float32)
    return encoder(feats)


def _fill(writer: PrefixStoreWriter, plan: list[tuple[int, list[int]]], prefixes: Iterator[Prefix],
          shard_rows: int, progress: bool, name: str) -> None:
    """Write the prefixes of the planned batches (one from `prefixes` per batch with ids to do, in order) in
    shards of ~`shard_rows` (`knowledge_encoder.store_shard_rows`: ~256 compressed or 32 full-length prefixes),
    cut at batch boundaries, so a resumed run makes the same shards."""
    done = sum(size - len(ids) for size, ids in plan)
    pending_ids: list[int] = []
    pending: list[Prefix] = []
    bar = tqdm(total=done + sum(len(ids) for _, ids in plan), initial=done, desc=f"prefixes {name}", unit="seg",
               disable=not progress)
    for size, todo in plan:
        if todo:
            prefix = next(prefixes)
            if pending and prefix.length != pending[0].length:
                # Full-length prefixes differ in width from batch to batch: one shard per width.
                writer.add(pending_ids, Prefix.cat_batch(pending))
                pending_ids, pending = [], []
            pending_ids.extend(todo)
            pending.append(prefix)
            if len(pending_ids) >= shard_rows:
                writer.add(pending_ids, Prefix.cat_batch(pending))
                pending_ids, pending = [], []
        bar.update(size)
    if pending_ids:
        writer.add(pending_ids, Prefix.cat_batch(pending))
    bar.close()


def main(argv=None) -> int:
    parser = build_parser("python -m qa.precompute", __doc__)
    parser.add_argument("--systems", default=None, help="comma list of checkpoint systems (default: every dynamic one)")
    cfg, ns = parse(parser, argv)
    systems = [s.strip() for s in ns.systems.split(",")] if ns.systems else None
    print(json.dumps(precompute(cfg, systems), indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)

