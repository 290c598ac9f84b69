"""The on-disk tier of the frozen-feature cache: a second process reads what the first computed, and only
features of the same backbone, LM weights and segment format."""

from __future__ import annotations

import pytest
import torch

from knowledge_encoder.backbones import LMBackbone
from knowledge_encoder.feature_disk import FeatureDisk
from knowledge_encoder.features import SegmentFeatures
from lm.prompting import PromptTemplate, TextSegment
from qa.batching import FeatureCache
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENTS = [TextSegment(f"Town {i}", f"Town {i} stands on hill number {i}. " * (1 + i % 3)) for i in range(4)]


class CountingBackbone(LMBackbone):
    """An LMBackbone that counts the segments it computes."""

    computed = 0

    def features(self, segments):
        self.computed += len(segments)
        return super().features(segments)


def _cache(lm, tokenizer, directory, scores=None) -> FeatureCache:
    backbone = CountingBackbone(lm, PromptTemplate(tokenizer), 64, scores=scores)
    return FeatureCache(backbone, disk=FeatureDisk(directory, backbone, 1 << 30))


def test_features_round_trip_through_tensors_with_scores_and_ids(smol_tokenizer, tiny_llama):
    backbone = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 64, scores="kvzip")
    feats = backbone.features(SEGMENTS[:1])
    back = SegmentFeatures.from_tensors(feats.to_tensors())
    assert len(back.keys) == len(back.values) == len(back.scores) == tiny_llama.config.num_hidden_layers
    for a, b in zip(feats.keys + feats.values + feats.scores, back.keys + back.values + back.scores):
        assert torch.equal(a, b)
    assert torch.equal(back.mask, feats.mask) and torch.equal(back.ids, feats.ids) and back.hidden is None


def test_a_new_process_reads_the_features_from_disk_instead_of_computing_them(tmp_path, smol_tokenizer, tiny_llama):
    first = _cache(tiny_llama, smol_tokenizer, tmp_path / "fc")
    want = first.get(SEGMENTS, "cpu")
    assert first.backbone.computed == 4 and len(first.disk) == 4
    again = _cache(tiny_llama, smol_tokenizer, tmp_path / "fc")  # fresh RAM, as after a restart
    got = again.get(SEGMENTS[::-1], "cpu")
    assert again.backbone.computed == 0 and again.disk.hits == 4
    for layer in range(len(want.keys)):
        assert torch.equal(got.keys[layer][0], want.keys[layer][3])  # the same bf16 values, in the asked order
        assert torch.equal(got.values[layer][1], want.values[layer][2])
    assert torch.equal(got.mask[0], want.mask[3])


def test_features_of_another_lm_are_not_served(tmp_path, smol_tokenizer, tiny_llama):
    _cache(tiny_llama, smol_tokenizer, tmp_path / "fc").get(SEGMENTS, "cpu")
    other_lm = make_tiny_llama(len(smol_tokenizer), seed=1)  # same shapes, other weights
    other = _cache(other_lm, smol_tokenizer, tmp_path / "fc")
    assert len(other.disk) == 0  # emptied: only a cache
    other.get(SEGMENTS[:2], "cpu")
    assert other.backbone.computed == 2


def test_features_with_scores_live_apart_from_plain_ones(tmp_path, smol_tokenizer, tiny_llama):
    _cache(tiny_llama, smol_tokenizer, tmp_path / "fc").get(SEGMENTS, "cpu")
    scored = _cache(tiny_llama, smol_tokenizer, tmp_path / "fc", scores="kvzip")
    feats = scored.get(SEGMENTS[:1], "cpu")
    assert scored.backbone.computed == 1 and feats.scores is not None
    assert len(_cache(tiny_llama, smol_tokenizer, tmp_path / "fc").disk) == 4  # the plain entries stay


def test_broken_feature_entry_is_recomputed(tmp_path, smol_tokenizer, tiny_llama):
    _cache(tiny_llama, smol_tokenizer, tmp_path / "fc").get(SEGMENTS[:1], "cpu")
    path = next((tmp_path / "fc").rglob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:50])
    again = _cache(tiny_llama, smol_tokenizer, tmp_path / "fc")
    again.get(SEGMENTS[:1], "cpu")
    assert again.backbone.computed == 1 and path.exists()  # dropped, recomputed and written again


def test_feature_disk_is_off_with_zero_gigabytes(tmp_path, smol_tokenizer, tiny_llama):
    from configs.loader import load_config

    backbone = LMBackbone(tiny_llama, PromptTemplate(smol_tokenizer), 64)
    on = FeatureCache.from_config(backbone, load_config(None, [f"run_dir={tmp_path}"]))
    assert on.disk is not None and on.disk.dir.parent == tmp_path / "feature_cache"
    off = FeatureCache.from_config(backbone, load_config(None, [f"run_dir={tmp_path}", "train.feature_disk_gb=0"]))
    assert off.disk is None


def test_flipped_byte_in_a_feature_entry_is_recomputed_not_served(tmp_path, smol_tokenizer, tiny_llama):
    first = _cache(tiny_llama, smol_tokenizer, tmp_path / "fc")
    want = first.get(SEGMENTS[:1], "cpu")
    path = next((tmp_path / "fc").rglob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a value byte of the last tensor: the file still parses
    path.write_bytes(bytes(data))
    again = _cache(tiny_llama, smol_tokenizer, tmp_path / "fc")
    got = again.get(SEGMENTS[:1], "cpu")
    assert again.backbone.computed == 1  # the hash in the entry's metadata caught it
    assert all(torch.equal(a, b) for a, b in zip(got.values, want.values))
