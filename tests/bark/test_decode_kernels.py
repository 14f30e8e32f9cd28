"""The CPU kernels of decode steps (``EngineConfig.cpu_decode_kernel``).

The AVX2 kernels (linear with optional GELU, attention over each slot's cache) and oneDNN's
packed weights must agree with ``F.linear`` and sdpa to float rounding, serve only small
inputs (decode steps; a prefill takes the default GEMM), reject bad tensors with an error
rather than a crash, and be off where they can't or shouldn't run.
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from stream_engine import Engine
from stream_engine.bark import cpu_kernels
from stream_engine.bark.model import DECODE_MAX_ROWS, CausalGPT, Linear, can_pack
from stream_engine.config import EngineConfig
from stream_engine.errors import InvalidOption, ModelLoadError

needs_avx2 = pytest.mark.skipif(not cpu_kernels.cpu_has_avx2(), reason="the CPU has no AVX2")
needs_onednn = pytest.mark.skipif(
    not can_pack(torch.zeros(1)), reason="this torch build has no oneDNN linear"
)


@pytest.fixture(scope="module")
def avx2():
    kernels, why = cpu_kernels.build()
    # on an AVX2 machine the build must work (a compiler and ninja are part of the setup)
    assert kernels is not None, why
    return kernels


# -- linear ------------------------------------------------------------------------------


@needs_avx2
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("features", [96, 100])  # 100: not a multiple of the 8-float vector
def test_avx2_linear_matches_plain(avx2, rows, bias, features):
    torch.manual_seed(rows)
    lin = Linear(features, 200, bias=bias)
    x = torch.randn(rows, 1, features)
    want = F.linear(x, lin.weight, lin.bias)
    got = avx2.linear(x, lin.weight, lin.bias, False)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(avx2.linear(x, lin.weight, lin.bias, True), F.gelu(want))


@needs_avx2
def test_avx2_linear_reads_a_strided_input(avx2):
    lin = Linear(64, 32)
    x = torch.randn(4, 128)[:, ::2]  # not contiguous
    torch.testing.assert_close(avx2.linear(x, lin.weight, lin.bias, False), lin(x.contiguous()))


@needs_avx2
def test_avx2_linear_rejects_bad_tensors_with_an_error(avx2):
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="float32"):
        avx2.linear(torch.randn(1, 16, dtype=torch.float64), w, None, False)
    with pytest.raises(RuntimeError, match="features"):
        avx2.linear(torch.randn(1, 15), w, None, False)
    with pytest.raises(RuntimeError, match="bias"):
        avx2.linear(torch.randn(1, 16), w, torch.zeros(7), False)


# -- attention ---------------------------------------------------------------------------


def _attention_by_hand(qkv, cache_k, cache_v, pos):
    """What a decode step's attention means, in plain torch (on copies of the caches)."""
    B = qkv.size(0)
    nh, hs = cache_k.size(1), cache_k.size(3)
    q, k, v = qkv.view(B, 3, nh, hs).unbind(1)
    cache_k, cache_v = cache_k.clone(), cache_v.clone()
    out = torch.empty(B, nh, hs)
    for b in range(B):
        p = int(pos[b])
        cache_k[b, :, p], cache_v[b, :, p] = k[b], v[b]
        att = (q[b][:, None] @ cache_k[b, :, : p + 1].transpose(-1, -2)) / math.sqrt(hs)
        out[b] = (att.softmax(-1) @ cache_v[b, :, : p + 1])[:, 0]
    return out.reshape(B, nh * hs), cache_k, cache_v


@needs_avx2
@pytest.mark.parametrize("head_dim", [64, 12])
def test_avx2_attention_matches_plain_attention(avx2, head_dim):
    torch.manual_seed(head_dim)
    slots, nh, L = 5, 3, 40
    cache_k, cache_v = torch.randn(slots, nh, L, head_dim), torch.randn(slots, nh, L, head_dim)
    pos = torch.tensor([0, 7, 39, 20])  # 4 rows of 5 slots, each at its own position
    qkv = torch.randn(4, 3 * nh * head_dim)
    want, want_k, want_v = _attention_by_hand(qkv, cache_k, cache_v, pos)
    got = avx2.attention(qkv, cache_k, cache_v, pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache_k, want_k, rtol=0, atol=0)  # the step's keys were written
    torch.testing.assert_close(cache_v, want_v, rtol=0, atol=0)


@needs_avx2
def test_avx2_attention_rejects_bad_positions_and_shapes(avx2):
    cache = torch.zeros(2, 2, 8, 4)
    with pytest.raises(RuntimeError, match="outside the cache"):
        avx2.attention(torch.zeros(1, 24), cache, cache.clone(), torch.tensor([8]))
    with pytest.raises(RuntimeError, match="one position per row"):
        avx2.attention(torch.zeros(2, 24), cache, cache.clone(), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="slots"):
        avx2.attention(torch.zeros(3, 24), cache, cache.clone(), torch.tensor([1, 1, 1]))


# -- the Linear module and the engine ------------------------------------------------------


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 8, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_plain(rows, bias):
    torch.manual_seed(rows)
    lin = Linear(96, 200, bias=bias)
    x = torch.randn(rows, 1, 96)
    want = F.linear(x, lin.weight, lin.bias)
    lin.pack(batch_hint=8)
    got = lin(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.forward_gelu(x), F.gelu(want), rtol=1e-5, atol=1e-5)


class _Spy:
    """Kernels that record the inputs they are given and compute the plain result."""

    def __init__(self):
        self.calls = []

    def linear(self, x, weight, bias, gelu):
        self.calls.append((tuple(x.shape), gelu))
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y

    def attention(self, qkv, cache_k, cache_v, pos):  # pragma: no cover - not used here
        raise AssertionError


def test_decode_kernel_serves_small_inputs_only():
    lin = Linear(16, 16)
    spy = _Spy()
    lin.kernels = spy
    lin(torch.randn(2, 1, 16))
    lin.forward_gelu(torch.randn(3, 1, 16))
    assert spy.calls == [((2, 1, 16), False), ((3, 1, 16), True)]
    lin(torch.randn(1, DECODE_MAX_ROWS + 1, 16))  # a prefill: the default GEMM
    assert len(spy.calls) == 2
    lin.unpack()
    lin(torch.randn(2, 1, 16))
    assert len(spy.calls) == 2


def _kernels(model: CausalGPT) -> set[str]:
    found = set()
    for m in model.modules():
        if isinstance(m, Linear):
            found.add(
                "avx2" if m.kernels is not None else "onednn" if m.packed is not None else "mkl"
            )
    return found


@needs_avx2
def test_engine_uses_the_avx2_kernels_by_default_on_cpu_float32(tiny):
    assert tiny.decode_kernel == "avx2"
    for model in (tiny.semantic_model, tiny.coarse_model):
        assert _kernels(model) == {"avx2"}
        assert all(block.attn.kernels is not None for block in model.layers)
    assert all(  # the fine model's 1024-frame windows: the default GEMM is faster
        not isinstance(m, Linear) or m.kernels is None for m in tiny.fine_model.modules()
    )


@needs_onednn
def test_engine_kernel_by_config_and_none_for_bfloat16():
    onednn = Engine.load("random:tiny", config=EngineConfig(cpu_decode_kernel="onednn"))
    assert onednn.decode_kernel == "onednn" and _kernels(onednn.semantic_model) == {"onednn"}
    mkl = Engine.load("random:tiny", config=EngineConfig(cpu_decode_kernel="mkl"))
    assert mkl.decode_kernel == "mkl" and _kernels(mkl.coarse_model) == {"mkl"}
    bf16 = Engine.load("random:tiny", dtype="bfloat16")
    assert bf16.decode_kernel == "default" and _kernels(bf16.semantic_model) == {"mkl"}


def test_unknown_kernel_is_a_clear_error():
    with pytest.raises(InvalidOption, match="cpu_decode_kernel"):
        EngineConfig(cpu_decode_kernel="fast")


def test_a_failed_build_falls_back_under_auto_and_fails_when_asked_for(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "build", lambda: (None, "no compiler"))
    weight = torch.zeros(4, 4)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        name, kernels = cpu_kernels.resolve("auto", weight)
    assert name in ("onednn", "mkl") and kernels is None
    assert "no compiler" in caplog.text
    with pytest.raises(ModelLoadError, match="no compiler"):
        cpu_kernels.resolve("avx2", weight)


@pytest.mark.parametrize("kernel", ["onednn", "mkl"])
def test_every_kernel_generates_the_same_tokens(tiny, kernel):
    if kernel == "onednn" and not can_pack(torch.zeros(1)):
        pytest.skip("this torch build has no oneDNN linear")
    other = Engine.load("random:tiny", config=EngineConfig(cpu_decode_kernel=kernel))
    texts = ["A first sentence to speak.", "And a second, rather longer one, to speak."]
    opts = dict(voice="v2/en_speaker_1", greedy=True, max_semantic_tokens=40)
    for a, b in zip(tiny.generate(texts, **opts), other.generate(texts, **opts), strict=True):
        assert a.semantic.tolist() == b.semantic.tolist()
        assert a.coarse.tolist() == b.coarse.tolist()
        assert a.fine.tolist() == b.fine.tolist()
