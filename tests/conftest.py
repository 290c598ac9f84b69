"""Shared fixtures: a tiny random LLaMA (GQA, explicit head_dim) with the embedded SmolLM2 tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from configs.models import resolve_lm_path

    tok = AutoTokenizer.from_pretrained(resolve_lm_path("embedded:smollm2-135m"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def make_tiny_llama(vocab_size: int, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 24,
                    hidden: int = 64, seed: int = 0, initializer_range: float = 0.02):
    """A random LLaMA whose head_dim (24) is not hidden / heads (16) and whose KV heads are fewer than heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_llama(smol_tokenizer):
    return make_tiny_llama(len(smol_tokenizer))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU two spinning threads are 10x slower.

    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
