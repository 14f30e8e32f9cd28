"""The oneDNN packed-weight path of decode steps on the CPU (``EngineConfig.cpu_packed_decode``).

It must agree with the plain ``F.linear`` to float rounding, serve only small inputs (decode
steps; a prefill takes the default GEMM) and be off where it can't or shouldn't run.
"""

import pytest
import torch
import torch.nn.functional as F

from stream_engine import Engine
from stream_engine.bark.model import PACKED_MAX_ROWS, CausalGPT, Linear, can_pack
from stream_engine.config import EngineConfig

pytestmark = pytest.mark.skipif(
    not can_pack(torch.zeros(1)), reason="this torch build has no oneDNN linear"
)


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


def test_packed_linear_is_used_for_small_inputs_only(monkeypatch):
    lin = Linear(16, 16)
    lin.pack(batch_hint=4)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    lin(torch.randn(2, 1, 16))
    assert calls == [torch.Size([2, 1, 16])]
    lin(torch.randn(1, PACKED_MAX_ROWS + 1, 16))  # a prefill: the default GEMM
    assert len(calls) == 1
    lin.unpack()
    lin(torch.randn(2, 1, 16))
    assert len(calls) == 1


def _packed(model: CausalGPT) -> list[bool]:
    return [m.packed is not None for m in model.modules() if isinstance(m, Linear)]


def test_engine_packs_causal_models_on_cpu_float32(tiny):
    for model in (tiny.semantic_model, tiny.coarse_model):
        flags = _packed(model)
        # per layer: attention in/out, MLP in/out; and the head
        assert len(flags) == 4 * model.cfg.n_layer + 1 and all(flags)
    assert not any(_packed(tiny.fine_model))  # 1024-row windows: the default GEMM is faster


def test_packing_off_by_config_and_for_bfloat16():
    off = Engine.load("random:tiny", config=EngineConfig(cpu_packed_decode=False))
    assert not any(_packed(off.semantic_model)) and not any(_packed(off.coarse_model))
    bf16 = Engine.load("random:tiny", dtype="bfloat16")
    assert not any(_packed(bf16.semantic_model))


def test_packed_and_plain_engines_generate_the_same_tokens(tiny):
    plain = Engine.load("random:tiny", config=EngineConfig(cpu_packed_decode=False))
    texts = ["A first sentence to speak.", "And a second, rather longer one, to speak."]
    opts = dict(voice="v2/en_speaker_1", greedy=True, max_semantic_tokens=40)
    for a, b in zip(tiny.generate(texts, **opts), plain.generate(texts, **opts), strict=True):
        assert a.semantic.tolist() == b.semantic.tolist()
        assert a.coarse.tolist() == b.coarse.tolist()
        assert a.fine.tolist() == b.fine.tolist()
