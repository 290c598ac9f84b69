"""Shared by the encode-side tests (encode adapter, memory tokens): two short segments, their LM features, and a
few optimizer steps of an encoder through the frozen LM."""

from __future__ import annotations

import torch

from knowledge_encoder.backbones import LMBackbone
from knowledge_encoder.features import SegmentFeatures
from lm.forward import forward_with_prefix
from lm.prompting import PromptTemplate, TextSegment

SEGMENTS = [
    TextSegment("Velmora Works", "Velmora Works is a company founded in 1873 by Ada Quill in Old Ridelis."),
    TextSegment("Kaive", "Kaive is a city on the river Ostra."),
]

QUESTIONS = torch.tensor([[5, 17, 300], [9, 8, 7]])


def segment_features(lm, tokenizer) -> SegmentFeatures:
    return LMBackbone(lm, PromptTemplate(tokenizer), max_tokens=64).features(SEGMENTS)


def train_steps(lm, encoder, features: SegmentFeatures, steps: int = 3) -> None:
    """`steps` AdamW steps of `encoder` on a made-up loss (mean squared logits of QUESTIONS after its prefix)."""
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-2)
    for _ in range(steps):
        out = forward_with_prefix(lm, QUESTIONS, torch.ones_like(QUESTIONS), encoder(features))
        out.logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
