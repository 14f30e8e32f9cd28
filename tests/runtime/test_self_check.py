"""The load-time checks' own logic, on the CPU: the graph comparison and the kernel probe.

The probe runs here on the CPU's kernels (torch's CPU flash attention and the math kernel obey
the same process-wide switches); the ``sdpa_flags`` fixture (conftest) puts them back.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend

from stream_engine.runtime import self_check
from stream_engine.runtime.self_check import (
    CheckFailed,
    attention_calls,
    compare,
    probe_sdpa,
    trial_lengths,
)


def _run(steps=4, rows=3, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, rows, vocab, generator=g) * 10
    return logits.argmax(-1), logits


def test_identical_runs_pass():
    tokens, logits = _run()
    check = compare("semantic", (tokens, logits), (tokens.clone(), logits.clone()))
    assert check.problem is None and check.as_dict()["ok"]
    assert (check.steps, check.rows, check.max_abs_diff) == (4, 3, 0.0)
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
    lens = trial_lengths(8, 1024, 16)
    assert lens[0] == 120 and lens[0] < 128 < lens[0] + 16  # crosses a kv bucket
    assert len(set(lens)) == 8 and all(1 <= n <= 1024 - 17 for n in lens)
    assert all(1 <= n <= 100 - 17 for n in trial_lengths(32, 100, 16))


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
    with pytest.raises(CheckFailed, match="MATH kernel fails on the masked call"):
        probe_sdpa(attention_calls(torch.device("cpu"), torch.float32, 4, 16), 1e-4)
