"""Prefix store dtypes (bf16, int8, int4), the on-disk LRU prefix cache, and serving from store + cache + encoder."""

from __future__ import annotations

import pytest
import torch

from configs.schema import KnowledgeEncoderConfig
from knowledge_encoder import prefix_codec
from knowledge_encoder.backbones import LMBackbone
from knowledge_encoder.encoder import KnowledgeEncoder
from knowledge_encoder.prefix_cache import PrefixCache
from knowledge_encoder.prefix_store import PrefixStore, PrefixStoreWriter
from lm.prefix import Prefix
from lm.prompting import PromptTemplate, TextSegment
from qa.batching import Batcher, Example, FeatureCache
from qa.model import PrefixQAModel
from qa.prefix_source import PrefixSource
from qa.systems import parse_system

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENTS = [TextSegment(f"Place {i}", f"Place {i} lies on river number {i}. " * (1 + i % 3)) for i in range(6)]


def _encoder(lm, slots=4, bias=True):
    torch.manual_seed(0)
    cfg = KnowledgeEncoderConfig(prefix_slots=slots, format_slots=2, pool_rope="pre", slot_bias=bias)
    enc = KnowledgeEncoder(cfg, lm.config).eval()
    with torch.no_grad():
        enc.pool.queries.normal_()
        if bias:
            enc.pool.bias_offset.normal_()
    return enc


def _features(lm, tokenizer, segments=SEGMENTS):
    return LMBackbone(lm, PromptTemplate(tokenizer), 64).features(segments)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 2e-2), ("int8", 3e-2), ("int4", 8e-2)])
def test_codec_round_trip_within_tolerance(smol_tokenizer, tiny_llama, dtype, tol):
    with torch.no_grad():
        prefix = _encoder(tiny_llama)(_features(tiny_llama, smol_tokenizer))
    back = prefix_codec.decode(prefix_codec.encode(prefix, dtype), prefix.next_position)
    for a, b in zip(prefix.keys + prefix.values, back.keys + back.values):
        # relative to each tensor's scale: int8 keeps ~1/254 of a channel's range, int4 1/15 of a group's
        assert (a - b).abs().max() <= tol * a.abs().max()
    torch.testing.assert_close(back.bias, prefix.bias)
    assert torch.equal(back.mask, prefix.mask)


def test_int8_halves_bf16_bytes_per_segment(smol_tokenizer, tiny_llama):
    with torch.no_grad():
        prefix = _encoder(tiny_llama, slots=32, bias=False)(_features(tiny_llama, smol_tokenizer))
    bf16 = prefix_codec.row_bytes(prefix_codec.encode(prefix, "bfloat16"))
    int8 = prefix_codec.row_bytes(prefix_codec.encode(prefix, "int8"))
    assert int8 < 0.62 * bf16


def test_int4_packs_two_codes_a_byte_and_restores_values_on_its_grid_exactly():
    # Each (layer, head, slot) row of values spans 0..15 in steps of 1 in a shuffled order, and each key channel
    # spans 0..15 over the slots: 4 bits hold them exactly, so any mix-up of the nibbles or groups shows.
    torch.manual_seed(0)
    grid = torch.stack([torch.randperm(16).float() for _ in range(2 * 3 * 16)]).view(2, 3, 16, 16)  # (N, H, P, D)
    keys = [grid.transpose(2, 3).contiguous(), grid.transpose(2, 3).contiguous() * 0.5 - 2.0]
    values = [grid, grid * 3.0 + 1.0]
    prefix = Prefix(keys=keys, values=values, mask=torch.ones(2, 16, dtype=torch.bool), next_position=64)
    rows = prefix_codec.encode(prefix, "int4")
    assert rows["keys"].dtype == torch.uint8 and rows["keys"].shape == (2, 2, 3, 16, 8)
    back = prefix_codec.decode(rows, prefix.next_position)
    for a, b in zip(prefix.keys + prefix.values, back.keys + back.values):
        torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-3)  # float16 scales and minima are exact here


def test_int4_quarters_bf16_bytes_per_segment(smol_tokenizer, tiny_llama):
    with torch.no_grad():
        prefix = _encoder(tiny_llama, slots=32, bias=False)(_features(tiny_llama, smol_tokenizer))
    bf16 = prefix_codec.row_bytes(prefix_codec.encode(prefix, "bfloat16"))
    assert prefix_codec.row_bytes(prefix_codec.encode(prefix, "int4")) < 0.36 * bf16


def test_lru_cache_evicts_the_least_recently_used_and_recomputes(tmp_path, smol_tokenizer, tiny_llama):
    with torch.no_grad():
        prefix = _encoder(tiny_llama)(_features(tiny_llama, smol_tokenizer))
    meta = {"encoder_sha256": "e", "dtype": "int8", "next_position": 320}
    one = prefix_codec.row_bytes(prefix_codec.encode(prefix.select([0]), "int8"))
    cache = PrefixCache(tmp_path / "c", meta, max_bytes=int(3.5 * (one + 400)))  # room for three entries
    for i in range(3):
        cache.put(f"k{i}", prefix.select([i]))
    assert cache.get("k0") is not None  # k0 is now the most recent; k1 the least
    cache.put("k3", prefix.select([3]))
    assert cache.evictions == 1 and cache.get("k1") is None
    assert all(cache.get(f"k{i}") is not None for i in (0, 2, 3))
    got = cache.get("k3")
    assert (got.keys[0] - prefix.select([3]).keys[0]).abs().max() <= 3e-2 * prefix.keys[0].abs().max()
    # A new process sees the same entries and order; another encoder empties it.
    again = PrefixCache(tmp_path / "c", meta, max_bytes=cache.max_bytes)
    assert len(again) == 3 and again.bytes == cache.bytes
    other = PrefixCache(tmp_path / "c", {**meta, "encoder_sha256": "f"}, max_bytes=cache.max_bytes)
    assert len(other) == 0


def test_broken_cache_entry_is_dropped_and_recomputed(tmp_path, smol_tokenizer, tiny_llama):
    with torch.no_grad():
        prefix = _encoder(tiny_llama)(_features(tiny_llama, smol_tokenizer))
    cache = PrefixCache(tmp_path / "c", {"encoder_sha256": "e", "dtype": "bfloat16", "next_position": 320}, 1 << 30)
    cache.put("k0", prefix.select([0]))
    path = next((tmp_path / "c").glob("*/*.safetensors"))
    path.write_bytes(path.read_bytes()[:40])
    assert cache.get("k0") is None and not path.exists() and len(cache) == 0


def test_serving_from_store_cache_and_encoder_gives_the_encoders_prefix(tmp_path, smol_tokenizer, tiny_llama):
    template = PromptTemplate(smol_tokenizer)
    enc = _encoder(tiny_llama)
    model = PrefixQAModel(parse_system("dynamic_prefix@p4"), tiny_llama, enc)
    batcher = Batcher(template, FeatureCache(LMBackbone(tiny_llama, template, 64)), "cpu")
    examples = [Example("Where?", SEGMENTS[0:2], [0, 1]), Example("What?", SEGMENTS[2:4], [2, 3])]
    system = parse_system("dynamic_prefix@p4")
    with torch.no_grad():
        want = model.prefix(batcher.build(examples, system, with_labels=False))
        # the store holds segments 0 and 2 only; the cache fills with 1 and 3 on first use
        writer = PrefixStoreWriter(tmp_path / "p", {"encoder_sha256": "e", "store_fingerprint": "s",
                                                    "next_position": enc.next_position}, "float32")
        writer.add([0, 2], enc(batcher.cache.get([SEGMENTS[0], SEGMENTS[2]], "cpu")))
        writer.finish()
        cache = PrefixCache(tmp_path / "c", {"dtype": "float32", "next_position": enc.next_position}, 1 << 30)
        source = PrefixSource(PrefixStore.open(tmp_path / "p", "e", "s"), cache)
        for _ in range(2):
            got = source.prefix(model, examples, batcher, "cpu")
            for a, b in zip(want.keys + want.values, got.keys + got.values):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(want.bias, got.bias)
    assert source.from_store == 4 and source.computed == 2
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 2


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_cold_and_warm_quantised_cache_read_the_same_prefix(tmp_path, smol_tokenizer, tiny_llama, dtype):
    # Regression: a cache miss used the fresh fp32 prefix while a hit read the quantised one, so the same question
    # could get another answer on a second run, and a one-pass evaluation measured the store dtype's effect on none.
    template = PromptTemplate(smol_tokenizer)
    enc = _encoder(tiny_llama)
    model = PrefixQAModel(parse_system("dynamic_prefix@p4"), tiny_llama, enc)
    batcher = Batcher(template, FeatureCache(LMBackbone(tiny_llama, template, 64)), "cpu")
    examples = [Example("Where?", SEGMENTS[0:2], [0, 1])]
    cache = PrefixCache(tmp_path / "c", {"dtype": dtype, "next_position": enc.next_position}, 1 << 30)
    source = PrefixSource(cache=cache)
    with torch.no_grad():
        fresh = model.prefix(batcher.build(examples, parse_system("dynamic_prefix@p4"), with_labels=False))
        cold = source.prefix(model, examples, batcher, "cpu")
        warm = source.prefix(model, examples, batcher, "cpu")
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 2
    for a, b in zip(cold.keys + cold.values, warm.keys + warm.values):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.values, cold.values))  # the dtype did change them


def test_store_dtype_lists_agree():
    """The store dtypes are named in three places that cannot import each other (configs may not import
    knowledge_encoder, the layering test says so): the config's choices, the codec and the size bench."""
    import dataclasses

    from bench.size import DTYPE_BYTES

    field = {f.name: f for f in dataclasses.fields(KnowledgeEncoderConfig)}["store_dtype"]
    assert set(field.metadata["choices"]) == set(prefix_codec.STORE_DTYPES) == set(DTYPE_BYTES)
