"""Fill the prefix store: the prefix of every segment of the index, for each trained dynamic system.

    python -m qa.precompute --config configs/default.yaml [--systems dynamic_prefix@p32]

Reads the checkpoint (`qa.checkpoint` or run_dir/checkpoints/final) and run_dir/store; writes
run_dir/prefixes/<system>/ (safetensors shards + manifest fingerprinted by the encoder weights and the
segment store). Resumes an interrupted run; a finished, matching store is left as it is.

The command lives in qa/ because it reads checkpoints (`qa.checkpoint`); the store's format and writer stay
in `knowledge_encoder.prefix_store`, which knows nothing of checkpoints. (It was `knowledge_encoder.precompute`,
which now only says where the command went.)
"""

from __future__ import annotations

import json
import logging
import time
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
__all__ = ["encoder_sha256", "main", "precompute", "prefix_dir"]


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
    models = load_models(checkpoint, names, lm, {"lm_layers": lm.config.hidden_size}, cfg.lm.model)
    device = next(lm.parameters()).device
    report = {}
    for name, model in models.items():
        if model.encoder is None:
            raise UserError(f"`{name}` has no knowledge encoder; only dynamic systems have prefixes to precompute")
        kcfg = model.encoder.cfg
        backbone = build_backbone(kcfg, lm, template, cfg.retriever.model, device)
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
        _fill(writer, store, backbone, model.encoder, cfg.knowledge_encoder, device, progress, name)
        writer.finish()
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.glob("shard-*.safetensors"))
        report[name] = {"segments": writer.manifest["count"], "seconds": round(seconds, 1),
                        "bytes": size, "bytes_per_segment": size / max(1, writer.manifest["count"])}
        log.info("%s: %s", name, report[name])
    return report


def _fill(writer: PrefixStoreWriter, store: SegmentStore, backbone, encoder, kcfg, device,
          progress: bool, name: str) -> None:
    """Encode every segment not yet in the store, in shards of ~256 compressed (32 full-length) prefixes
    (`knowledge_encoder.store_shard_rows`), cut at batch boundaries, so a resumed run makes the same shards."""
    done = writer.done_ids()
    batch_size = kcfg.batch_size
    shard_rows = kcfg.store_shard_rows or (256 if encoder.slots else 32)
    pending_ids: list[int] = []
    pending: list[Prefix] = []
    bar = tqdm(total=len(store), initial=len(done), desc=f"prefixes {name}", unit="seg", disable=not progress)
    for segments in store.iter_batches(batch_size):
        todo = [s for s in segments if s.segment_id not in done]
        if todo:
            feats = backbone.features([TextSegment(s.title, s.text) for s in todo]).to(device, torch.float32)
            prefix = encoder(feats)
            if pending and prefix.length != pending[0].length:
                # Full-length prefixes differ in width from batch to batch: one shard per width.
                writer.add(pending_ids, Prefix.cat_batch(pending))
                pending_ids, pending = [], []
            pending_ids.extend(s.segment_id for s in todo)
            pending.append(prefix)
            if len(pending_ids) >= shard_rows:
                writer.add(pending_ids, Prefix.cat_batch(pending))
                pending_ids, pending = [], []
        bar.update(len(segments))
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

