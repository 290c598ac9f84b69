"""Section 5, size: bytes per segment of the segment store, the embeddings, the faiss index and the prefix store.

Measured on disk in the configured run_dir (store, embeddings, index) and in the bench's prefix store
(`bench.work_dir/prefixes/<system>`, built by the QA-latency section over a subset of segments);
per-segment figures divide by the number of segments each holds. The prefix store's size follows from
the LM's shape, so it is also computed for P = 10, 32 and P = segment length (the mean LM-token length
of the store's segments) at `knowledge_encoder.store_dtype`, int8 and int4:
    L layers x {K, V} x H_kv heads x P slots x head_dim x bytes + P mask bytes + an 8-byte id,
    plus, for int8, float16 scales: L x H_kv x head_dim (keys, per channel) + L x H_kv x P (values, per slot);
    int4 has half a byte per code and a float16 minimum beside each scale.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from data_prep.store import SegmentStore

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1, "int4": 0.5}
SCALES_PER_GROUP = {"int8": 1, "int4": 2}  # float16 scale (+ minimum for int4) per quantisation group


def _files_bytes(directory: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in directory.glob(pattern) if f.is_file())


def prefix_bytes_per_segment(layers: int, kv_heads: int, head_dim: int, slots: float, dtype: str) -> float:
    """Bytes of one segment's prefix in the store (see the module docstring)."""
    scales = layers * kv_heads * (head_dim + slots) * 2 * SCALES_PER_GROUP.get(dtype, 0)
    return layers * 2 * kv_heads * slots * head_dim * DTYPE_BYTES[dtype] + scales + slots + 8


def mean_segment_tokens(store: SegmentStore, tokenizer, limit: int = 2000) -> float:
    """Mean LM-token length of the first `limit` segments (title line included, as the LM reads them)."""
    from lm.prompting import PromptTemplate, TextSegment

    template = PromptTemplate(tokenizer)
    lengths = []
    for batch in store.iter_batches(256):
        lengths.extend(len(template.segment_ids(TextSegment(s.title, s.text), 10**9)) for s in batch)
        if len(lengths) >= limit:
            break
    return sum(lengths[:limit]) / max(1, len(lengths[:limit]))


def run(cfg) -> dict:
    """The section's numbers (JSON-ready); see the module docstring."""
    from transformers import AutoConfig, AutoTokenizer

    from configs.models import resolve_lm_path
    from knowledge_encoder.encoder import lm_dims

    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    store = SegmentStore.open(run_dir / "store")
    n = len(store)
    out: dict = {"segments": n, "run_dir": str(run_dir)}
    out["segment_store"] = {
        "bytes": _files_bytes(run_dir / "store", "segments.arrow"),
        "bytes_per_segment": round(_files_bytes(run_dir / "store", "segments.arrow") / n, 1),
    }
    emb_dir = run_dir / "embeddings"
    if (emb_dir / "manifest.json").is_file():
        m = json.loads((emb_dir / "manifest.json").read_text())
        total = _files_bytes(emb_dir, "shard-*.npy") + _files_bytes(emb_dir, "ids-*.npy")
        out["embeddings"] = {
            "bytes": total,
            "bytes_per_segment": round(total / max(1, m["n"]), 1),
            "dim": m["dim"],
            "dtype": m["dtype"],
            "vectors": m["n"],
        }
    index_dir = run_dir / "index"
    if (index_dir / "manifest.json").is_file():
        m = json.loads((index_dir / "manifest.json").read_text())
        size = (index_dir / m.get("index_file", "index.faiss")).stat().st_size
        out["index"] = {
            "bytes": size,
            "bytes_per_segment": round(size / max(1, m["ntotal"]), 1),
            "factory": m["factory"],
            "vectors": m["ntotal"],
        }
    prefixes = []
    prefix_root = Path(cfg.bench.work_dir) / "prefixes"
    for manifest_path in sorted(prefix_root.glob("*/manifest.json")):
        m = json.loads(manifest_path.read_text())
        if not m.get("complete") or not m.get("count"):
            continue
        total = _files_bytes(manifest_path.parent, "shard-*.safetensors")
        prefixes.append(
            {
                "system": m["system"],
                "segments": m["count"],
                "bytes": total,
                "bytes_per_segment": round(total / m["count"], 1),
                "prefix_slots": m["prefix_slots"] or "segment length",
                "dtype": m["dtype"],
            }
        )
    out["prefix_store_measured"] = prefixes
    lm_path = resolve_lm_path(cfg.lm.model, cfg.cache_dir)
    layers, kv_heads, head_dim = lm_dims(AutoConfig.from_pretrained(lm_path))
    tokens = mean_segment_tokens(store, AutoTokenizer.from_pretrained(lm_path))
    dtype = cfg.knowledge_encoder.store_dtype

    def sizes(dt: str) -> dict:
        return {
            "P=8": round(prefix_bytes_per_segment(layers, kv_heads, head_dim, 8, dt)),
            "P=32": round(prefix_bytes_per_segment(layers, kv_heads, head_dim, 32, dt)),
            "P=64": round(prefix_bytes_per_segment(layers, kv_heads, head_dim, 64, dt)),
            f"P=n ({tokens:.0f})": round(prefix_bytes_per_segment(layers, kv_heads, head_dim, tokens, dt)),
        }

    out["prefix_store_computed"] = {
        "lm": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim},
        "dtype": dtype,
        "mean_segment_tokens": round(tokens, 1),
        "bytes_per_segment": sizes(dtype),
        "bytes_per_segment_by_dtype": {dt: sizes(dt) for dt in dict.fromkeys([dtype, "bfloat16", "int8", "int4"])},
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def to_markdown(r: dict) -> str:
    n = r["segments"]
    lines = [
        f"`{r['run_dir']}`: {n:,} segments.",
        "",
        "| artifact | bytes / segment | total bytes | notes |",
        "| --- | --- | --- | --- |",
        f"| segment store (segments.arrow) | {r['segment_store']['bytes_per_segment']:,} | "
        f"{r['segment_store']['bytes']:,} | text + spans |",
    ]
    if "embeddings" in r:
        e = r["embeddings"]
        lines.append(
            f"| embeddings | {e['bytes_per_segment']:,} | {e['bytes']:,} | {e['dim']}-d {e['dtype']} + int64 ids |"
        )
    if "index" in r:
        i = r["index"]
        lines.append(f"| faiss index | {i['bytes_per_segment']:,} | {i['bytes']:,} | {i['factory']} |")
    for p in r["prefix_store_measured"]:
        lines.append(
            f"| prefix store `{p['system']}` (measured, {p['segments']} segments) | "
            f"{p['bytes_per_segment']:,} | {p['bytes']:,} | P = {p['prefix_slots']}, {p['dtype']} |"
        )
    c = r["prefix_store_computed"]
    lm = c["lm"]
    for dtype, table in c.get("bytes_per_segment_by_dtype", {c["dtype"]: c["bytes_per_segment"]}).items():
        for name, size in table.items():
            lines.append(
                f"| prefix store {name} (computed) | {size:,} | {size * n:,} for this store | "
                f"{lm['layers']} layers × K,V × {lm['kv_heads']} heads × {lm['head_dim']} × {dtype} |"
            )
    return "\n".join(lines)
