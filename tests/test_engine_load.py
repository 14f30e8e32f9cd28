"""Engine.load's checks and fallbacks that a CPU can run (the CUDA half is in tests/gpu)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from stream_engine import Engine
from stream_engine.config import EngineConfig
from stream_engine.errors import GpuCheckFailed, InvalidOption
from stream_engine.runtime import cuda, self_check
from stream_engine.runtime.cuda import StepGraphs, batch_buckets


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
    with pytest.raises(GpuCheckFailed, match="not usable"):
        Engine.load("random:tiny", device="cpu", dtype="bfloat16", config=strict)


def test_decode_mode_of_a_cpu_engine(tiny):
    mode = tiny.decode_mode()
    assert mode == {
        "attn": "sdpa",
        "cuda_graphs": "off",
        "decode_kernel": tiny.decode_kernel,
        "dtype": "float32",
        "sdpa": "default",
        "fallbacks": [],
        "checks": {},
    }
    assert tiny.eager_steps() == {}


# -- the GPU checks at load, on the CPU -------------------------------------------------------
# ``cuda.on_gpu`` says yes, so Engine.load runs its CUDA path: the attention probe on the CPU's
# kernels, the decode graphs emulated (StepGraphs without CUDA replays the padded step), the
# graph check, the fallbacks. Failures are injected where a GPU would fail.


@pytest.fixture
def as_if_gpu(monkeypatch, sdpa_flags):
    monkeypatch.setattr(cuda, "on_gpu", lambda device: True)


def _load(**config) -> Engine:
    return Engine.load("random:tiny", device="cpu", config=EngineConfig(**config))


def _same_speech(engine: Engine, tiny: Engine) -> None:
    text = "The checks passed or fell back."
    got = engine.generate(text, greedy=True, max_semantic_tokens=40)[0]
    want = tiny.generate(text, greedy=True, max_semantic_tokens=40)[0]
    for key in ("semantic", "coarse", "fine"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=key)


def test_checks_pass_the_graphs_serve_and_the_mode_says_so(as_if_gpu, tiny):
    engine = _load()
    mode = engine.decode_mode()
    assert mode["cuda_graphs"] == "semantic,coarse" and mode["fallbacks"] == []
    assert mode["sdpa"] == "masked=FLASH_ATTENTION,causal=FLASH_ATTENTION,full=FLASH_ATTENTION"
    checks = mode["checks"]
    assert "CUDNN_ATTENTION" in checks["sdpa"]["disabled"]
    for stage in ("semantic", "coarse"):
        assert checks["graphs"][stage]["ok"] and checks["graphs"][stage]["tokens_equal"]
        assert checks["graphs"][stage]["steps"] == self_check.GRAPH_CHECK_STEPS
        assert checks["graphs"][stage]["trials"] == 2 * len(batch_buckets(8))
        assert checks["capture_s"][stage] >= 0
    # the emulated graphs (padded steps, deferred readback) give the plain engine's tokens
    _same_speech(engine, tiny)
    assert engine.eager_steps() == {"semantic": 0, "coarse": 0}


def test_a_capture_that_raises_falls_back_to_eager(as_if_gpu, monkeypatch, caplog, tiny):
    def capture(self, b, s, variant):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraphs, "_capture", capture)
    with caplog.at_level(logging.WARNING, logger="stream_engine.engine"):
        engine = _load()
    mode = engine.decode_mode()
    assert mode["cuda_graphs"] == "off" and engine.eager_steps() == {}
    # nothing is captured after a capture failed (the allocator may not have recovered)
    assert mode["fallbacks"] == [
        "semantic decode graphs -> eager: capture failed (RuntimeError: operation not "
        "permitted when stream is capturing)",
        "coarse decode graphs -> eager: not captured after the semantic stage's capture failed",
    ]
    assert sum("capture failed" in r.getMessage() for r in caplog.records) == 2
    _same_speech(engine, tiny)
    with pytest.raises(GpuCheckFailed, match="capture failed"):
        _load(strict_gpu=True)


def test_a_replay_that_mismatches_falls_back_to_eager(as_if_gpu, monkeypatch, tiny):
    real = StepGraphs.replay

    def replay(self, key):  # the coarse graphs choose another token for row 0
        real(self, key)
        stage = self.step_fn.__self__
        if stage.name == "coarse":
            stage.ids[0] += 1

    monkeypatch.setattr(StepGraphs, "replay", replay)
    engine = _load()
    mode = engine.decode_mode()
    assert mode["cuda_graphs"] == "semantic"
    assert mode["fallbacks"] == [
        "coarse decode graphs -> eager: coarse: graph replays chose other tokens than eager decode"
    ]
    assert not mode["checks"]["graphs"]["coarse"]["ok"]
    assert mode["checks"]["graphs"]["semantic"]["ok"]
    _same_speech(engine, tiny)
    with pytest.raises(GpuCheckFailed, match="other tokens"):
        _load(strict_gpu=True)


def test_a_kernel_probe_that_fails_leaves_the_choice_to_torch(as_if_gpu, monkeypatch, tiny):
    def choice(call):
        raise RuntimeError("no kernel choice for these inputs")

    monkeypatch.setattr(self_check.AttentionCall, "choice", choice)
    engine = _load()
    mode = engine.decode_mode()
    assert mode["sdpa"] == "default" and "sdpa" not in mode["checks"]
    assert mode["fallbacks"] == [
        "attention kernel probe failed (RuntimeError: no kernel choice for these inputs); "
        "torch chooses"
    ]
    assert mode["cuda_graphs"] == "semantic,coarse"  # the rest of the checks still ran
    _same_speech(engine, tiny)
    with pytest.raises(GpuCheckFailed, match="probe failed"):
        _load(strict_gpu=True)


def test_one_batch_bucket_pads_every_step_to_all_slots(as_if_gpu, tiny):
    engine = _load(cuda_graph_batches="slots", semantic_slots=4, coarse_slots=4)
    for stage in (engine.semantic_stage, engine.coarse_stage):
        assert stage.graphs is not None and stage.graphs.batch_sizes == (4,)
        assert {b for b, _, _ in stage.graphs.graphs} == {4}
    assert engine.decode_mode()["fallbacks"] == []
    _same_speech(engine, tiny)
    assert engine.eager_steps() == {"semantic": 0, "coarse": 0}


def test_without_the_self_check_graphs_are_captured_unchecked(as_if_gpu):
    engine = _load(gpu_self_check=False)
    mode = engine.decode_mode()
    assert mode["cuda_graphs"] == "semantic,coarse" and mode["sdpa"] == "default"
    assert set(mode["checks"]) == {"capture_s", "sdpa"} and "graphs" not in mode["checks"]
    # cuDNN attention is off all the same: a policy, not a check
    assert mode["checks"]["sdpa"] == {
        "kernels": {},
        "disabled": {"CUDNN_ATTENTION": self_check.CUDNN_WHY},
    }
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_stale_graphs_are_not_reported_as_live(as_if_gpu):
    engine = _load()
    engine.coarse_model.setup_cache(2)  # new cache tensors: the coarse graphs are stale
    assert engine.decode_mode()["cuda_graphs"] == "semantic"
