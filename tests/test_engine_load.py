"""Engine.load's checks and fallbacks that a CPU can run (the CUDA half is in tests/gpu)."""

from __future__ import annotations

import logging
import sys

import pytest

from stream_engine import Engine
from stream_engine.config import EngineConfig
from stream_engine.errors import InvalidOption


def test_float32_with_flash_attention_is_refused_with_a_clear_error():
    with pytest.raises(InvalidOption, match="float32"):
        Engine.load("random:tiny", device="cpu", dtype="float32", attn="flash_attention_2")


def test_flash_attention_that_does_not_import_falls_back_to_sdpa(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises
    with caplog.at_level(logging.WARNING, logger="stream_engine.engine"):
        engine = Engine.load(
            "random:tiny", device="cpu", dtype="bfloat16", attn="flash_attention_2"
        )
    mode = engine.decode_mode()
    assert mode["attn"] == "sdpa" and mode["dtype"] == "bfloat16"
    assert len(mode["fallbacks"]) == 1 and "flash_attn does not import" in mode["fallbacks"][0]
    assert any("attention runs on sdpa" in r.getMessage() for r in caplog.records)
    assert engine.generate("Still speaks.", greedy=True, max_semantic_tokens=25)[0].audio.size
    strict = EngineConfig(attn="flash_attention_2", strict_gpu=True)
    with pytest.raises(InvalidOption, match="not usable"):
        Engine.load("random:tiny", device="cpu", dtype="bfloat16", config=strict)


def test_decode_mode_of_a_cpu_engine(tiny):
    mode = tiny.decode_mode()
    assert mode == {
        "attn": "sdpa",
        "cuda_graphs": False,
        "decode_kernel": tiny.decode_kernel,
        "dtype": "float32",
        "fallbacks": [],
    }
