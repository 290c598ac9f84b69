"""configs.precision: the bf16 speed probe and the warning every bf16-on-CPU option gives."""

from __future__ import annotations

import logging

import torch

from configs import precision


def test_slowdown_is_a_positive_ratio_measured_once():
    precision.cpu_half_slowdown.cache_clear()
    first = precision.cpu_bf16_slowdown()
    assert first > 0
    assert precision.cpu_bf16_slowdown() == first  # cached: the probe runs once per process
    assert precision.cpu_half_slowdown.cache_info().hits >= 1


def test_warns_only_on_a_slow_cpu(monkeypatch, caplog):
    """Regression: retriever.finetune.precision=bf16 on an AVX2-only CPU ran 11 min without one step."""
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: 70.0)
    with caplog.at_level(logging.WARNING, logger="configs.precision"):
        assert precision.warn_if_slow_bf16("retriever.finetune.precision=bf16") is True
    assert "70x slower than fp32" in caplog.text and "retriever.finetune.precision=bf16" in caplog.text
    caplog.clear()
    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: 0.6)
    with caplog.at_level(logging.WARNING, logger="configs.precision"):
        assert precision.warn_if_slow_bf16("lm.autocast_bf16=true") is False
    assert caplog.text == ""


def test_gpu_device_never_probes_the_cpu(monkeypatch):
    def boom():
        raise AssertionError("probed the CPU for a GPU run")

    monkeypatch.setattr(precision, "cpu_bf16_slowdown", boom)
    assert precision.warn_if_slow_bf16("lm.dtype=bfloat16", torch.device("cuda")) is False


def test_bf16_options_warn_on_a_slow_cpu(monkeypatch, caplog):
    from configs.models import resolve_dtype
    from retriever.encoder import resolve_encoder_dtype

    monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda: 70.0)
    with caplog.at_level(logging.WARNING, logger="configs.precision"):
        assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
        assert resolve_encoder_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
        assert resolve_dtype("auto", torch.device("cpu")) is torch.float32  # the default never warns
    assert caplog.text.count("slower than fp32") == 2
    assert "lm.dtype=bfloat16" in caplog.text and "retriever.dtype=bfloat16" in caplog.text
