"""The backbone registry: every registered backbone trains, saves and reloads to the same prefix; a new backbone
is one class (this file adds a toy one) and its registry decorator."""

from __future__ import annotations

import pytest
import torch

from configs.schema import Config
from knowledge_encoder.backbones import BACKBONES, build_backbone, register_backbone
from knowledge_encoder.features import SegmentFeatures
from lm.forward import forward_with_prefix
from lm.prompting import PromptTemplate, TextSegment
from qa.checkpoint import load_models, new_model, save_checkpoint
from qa.systems import parse_system
from retriever.testing import make_tiny_encoder, words_of

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENTS = [TextSegment("Kaive", "Kaive is a city on the river Ostra."),
            TextSegment("Velmora Works", "Velmora Works was founded in 1873 by Ada Quill.")]


@register_backbone("toy_bag_of_ids")
class ToyBackbone:
    """A backbone of this test only: each token id's fixed random vector (no model at all)."""

    feature_dim = 12
    name = "toy_bag_of_ids"

    def __init__(self, template, max_tokens):
        self.template, self.max_tokens = template, max_tokens
        self.table = torch.randn(len(template.tokenizer), self.feature_dim, generator=torch.Generator().manual_seed(0))

    @classmethod
    def from_config(cls, kcfg, lm, template, retriever_model, device):
        return cls(template, kcfg.max_segment_tokens)

    def features(self, segments):
        rows = [self.template.segment_ids(s, self.max_tokens) for s in segments]
        n = max(len(r) for r in rows)
        mask = torch.tensor([[j < len(r) for j in range(n)] for r in rows])
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        return SegmentFeatures(mask=mask, hidden=self.table[ids])


@pytest.mark.parametrize("backbone", ["lm_kv", "lm_layers", "retriever", "toy_bag_of_ids"])
def test_every_registered_backbone_trains_saves_and_reloads(tmp_path, smol_tokenizer, tiny_llama, backbone):
    assert backbone in BACKBONES
    encoder_dir = tmp_path / "encoder"
    make_tiny_encoder(encoder_dir, words_of(s.title + " " + s.text for s in SEGMENTS))
    cfg = Config()
    cfg.retriever.model = str(encoder_dir)
    cfg.knowledge_encoder.backbone = backbone
    cfg.knowledge_encoder.format_slots = 2
    cfg.knowledge_encoder.lm_layers = 1
    template = PromptTemplate(smol_tokenizer)
    reader = build_backbone(cfg.knowledge_encoder, tiny_llama, template, cfg.retriever.model, "cpu")
    model = new_model(parse_system("dynamic_prefix@p3"), cfg, tiny_llama, template, reader.feature_dim)
    feats = reader.features(SEGMENTS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([[5, 17, 300], [9, 8, 7]])
    out = forward_with_prefix(tiny_llama, ids, torch.ones_like(ids), model.encoder.build_prefix(feats, k=1))
    out.logits.float().pow(2).mean().backward()
    opt.step()
    save_checkpoint(tmp_path / "ck", {"dynamic_prefix@p3": model}, cfg, tiny_llama.config)
    loaded = load_models(tmp_path / "ck", ["dynamic_prefix@p3"], tiny_llama)["dynamic_prefix@p3"]
    with torch.no_grad():
        a, b = model.encoder(feats), loaded.encoder(feats)
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        torch.testing.assert_close(x, y)
