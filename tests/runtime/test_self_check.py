"""The load-time checks' own logic, on the CPU: the graph comparison and the kernel probe.

The probe runs here on the CPU's kernels (torch's CPU flash attention and the math kernel obey
the same process-wide switches); the ``sdpa_flags`` fixture (conftest) puts them back.
"""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend

from stream_engine.bark.model import from_hf
from stream_engine.runtime import self_check
from stream_engine.runtime.cuda import StepGraphs
from stream_engine.runtime.self_check import (
    CheckFailed,
    attention_calls,
    check_graphs,
    compare,
    probe_sdpa,
    trial_lengths,
)
from stream_engine.runtime.stages import CoarseStage, DecodeStage, SemanticStage


def _run(steps=4, rows=3, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, rows, vocab, generator=g) * 10
    return logits.argmax(-1), logits


def test_identical_runs_pass():
    tokens, logits = _run()
    check = compare("semantic", (tokens, logits), (tokens.clone(), logits.clone()))
    assert check.problem is None and check.as_dict()["ok"]
    assert (check.steps, check.trials, check.max_abs_diff) == (4, 1, 0.0)
    assert check.scale == logits.abs().max().item()


def test_rounding_within_the_tolerance_passes_and_beyond_fails():
    tokens, logits = _run()
    scale = logits.abs().max().item()
    near = logits + 0.5 * self_check.GRAPH_TOLERANCE * scale
    assert compare("coarse", (tokens, logits), (tokens, near)).problem is None
    far = logits.clone()
    far[2, 1, 7] += 2 * self_check.GRAPH_TOLERANCE * scale
    check = compare("coarse", (tokens, logits), (tokens, far))
    assert "differ from eager" in check.problem and not check.as_dict()["ok"]


def test_other_tokens_fail():
    tokens, logits = _run()
    other = tokens.clone()
    other[3, 0] += 1
    check = compare("semantic", (tokens, logits), (other, logits))
    assert not check.tokens_equal and "other tokens" in check.problem


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_fail(bad):
    tokens, logits = _run()
    broken = logits.clone()
    broken[0, 0, 0] = bad
    for eager, graphed in [(broken, logits), (logits, broken)]:
        check = compare("semantic", (tokens, eager), (tokens, graphed))
        assert not check.finite and "non-finite" in check.problem


def test_trial_lengths_put_rows_at_their_own_positions():
    assert trial_lengths(1, 384) == [384]
    lens = trial_lengths(8, 384)
    assert lens[0] == max(lens) == 384 and len(set(lens)) == 8 and min(lens) >= 1
    assert trial_lengths(4, 1) == [1, 1, 1, 1]


def test_a_failed_check_serialises_as_strict_json():
    tokens, logits = _run()
    broken = logits.clone()
    broken[1, 2, 3] = float("nan")
    d = compare("coarse", (tokens, broken), (tokens, logits)).as_dict()
    assert d["ok"] is False and d["max_abs_diff"] is None and d["scale"] is None
    json.dumps(d, allow_nan=False)  # what Starlette's JSONResponse requires of /healthz


def _emulated(tiny, kind=SemanticStage, slots=4) -> DecodeStage:
    hf = tiny.loaded.model
    model = from_hf(hf.semantic if kind is SemanticStage else hf.coarse_acoustics)
    stage = kind(model, tiny.consts, slots, cuda_graphs=True)
    stage.capture_graphs()
    return stage


def test_the_graph_check_covers_every_batch_bucket_and_both_variants(tiny):
    stage = _emulated(tiny, CoarseStage)
    check = check_graphs(stage, steps=6)
    assert check.problem is None and check.trials == 6  # buckets 1, 2, 4 x two variants
    assert check.keys == (
        "b1/kv128/greedy",
        "b1/kv256/sampled",
        "b2/kv384/greedy",
        "b2/kv512/sampled",
        "b4/kv640/greedy",
        "b4/kv768/sampled",
    )


@pytest.mark.parametrize(
    ("wrong", "where"),
    [(lambda key: key[2], "sampled"), (lambda key: key[0] == 2, "b2/")],
    ids=["sampled-only", "batch-2-only"],
)
def test_a_mismatch_in_any_checked_graph_fails_the_check(tiny, monkeypatch, wrong, where):
    stage = _emulated(tiny)
    real = StepGraphs.replay

    def replay(self, key):
        real(self, key)
        if wrong(key):
            stage.ids[0] += 1

    monkeypatch.setattr(StepGraphs, "replay", replay)
    check = check_graphs(stage, steps=4)
    assert "other tokens" in check.problem
    assert any(where in k for k in check.keys)


def test_probe_turns_cudnn_off_and_names_each_kind(sdpa_flags):
    calls = attention_calls(torch.device("cpu"), torch.float32, 4, 16)
    assert [c.kind for c in calls] == ["masked", "causal", "full"]
    choice = probe_sdpa(calls, 1e-4)
    assert set(choice.kernels) == {"masked", "causal", "full"}
    assert "CUDNN_ATTENTION" in choice.disabled and not torch.backends.cuda.cudnn_sdp_enabled()
    for call in calls:  # what it names is what torch now picks, and it is right
        assert call.choice().name == choice.kernels[call.kind]
        torch.testing.assert_close(call.run(), call.reference(), atol=1e-4, rtol=0)


def test_a_kernel_that_disagrees_is_turned_off(sdpa_flags, monkeypatch):
    """The CPU's flash kernel made wrong on purpose: the probe turns it off, math serves."""
    calls = attention_calls(torch.device("cpu"), torch.float32, 4, 16)
    assert calls[0].choice() == SDPBackend.FLASH_ATTENTION
    real = self_check.AttentionCall.run

    def run(call):
        out = real(call)
        return out + 1 if call.choice() == SDPBackend.FLASH_ATTENTION else out

    monkeypatch.setattr(self_check.AttentionCall, "run", run)
    choice = probe_sdpa(calls, 1e-4)
    assert choice.kernels == {"masked": "MATH", "causal": "MATH", "full": "MATH"}
    assert "differs from the plain arithmetic" in choice.disabled["FLASH_ATTENTION"]
    assert not torch.backends.cuda.flash_sdp_enabled()


def test_no_kernel_left_raises(sdpa_flags, monkeypatch):
    def fails(call):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(self_check.AttentionCall, "run", fails)
    assert torch.backends.cuda.flash_sdp_enabled()
    with pytest.raises(CheckFailed, match="MATH kernel fails on the masked call"):
        probe_sdpa(attention_calls(torch.device("cpu"), torch.float32, 4, 16), 1e-4)
    # the switches as they were (the probe had turned flash off on the way), cuDNN off
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_kernels_off_before_the_probe_are_recorded(sdpa_flags):
    torch.backends.cuda.enable_flash_sdp(False)
    choice = probe_sdpa(attention_calls(torch.device("cpu"), torch.float32, 4, 16), 1e-4)
    assert choice.disabled["FLASH_ATTENTION"] == "off before the probe"
    assert set(choice.kernels.values()) == {"MATH"}
