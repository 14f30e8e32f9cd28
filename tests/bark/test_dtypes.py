"""Half precision on the CPU: bfloat16 runs end to end and stays close to float32.

bfloat16 keeps 8 bits of mantissa, so logits move by a few percent of their range (measured on
random:tiny against float32: at most 3.2 % for the causal models, 5.8 % for the fine model over
1024 frames; cosine >= 0.997 per row) and a near-tie may pick another token. The tolerances
below are two to three times that. tests/gpu/test_cuda.py checks float16 and bfloat16 on
CUDA.
"""

import copy

import numpy as np
import pytest
import torch

from stream_engine import Engine


@pytest.fixture(scope="module")
def bf16():
    return Engine.load("random:tiny", device="cpu", dtype="bfloat16")


def test_bfloat16_generates_end_to_end(bf16):
    assert bf16.semantic_model.lm_head.weight.dtype == torch.bfloat16
    assert bf16.fine_model.lm_heads[0].weight.dtype == torch.bfloat16
    s = bf16.generate("Hello there.", greedy=True, max_semantic_tokens=8)[0]
    assert 1 <= len(s.semantic) <= 8
    T = s.coarse.shape[1]
    assert s.coarse.shape == (2, T) and s.fine.shape == (8, T) and T > 0
    assert s.fine.min() >= 0 and s.fine.max() < 1024
    assert s.audio.dtype == np.float32 and s.audio.shape == (T * 320,)
    assert np.isfinite(s.audio).all()


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 0.1) -> None:
    """bfloat16 logits ``got`` against float32 ``want``, both (..., V)."""
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all()
    scale = want.abs().max()
    assert (got - want).abs().max() <= rel * scale
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.99
    # the bfloat16 choice is a near-best float32 choice
    picked = want.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
    assert (want.amax(-1) - picked).max() <= rel * scale


@pytest.mark.parametrize("name", ["semantic_model", "coarse_model"])
@torch.inference_mode()
def test_bfloat16_teacher_forced_logits_close_to_float32(tiny, bf16, name):
    """Prefill then decode steps on a fixed sequence, against float32's logits without cache."""
    ref_model = getattr(tiny, name)  # float32; forward_full leaves its cache alone
    model = copy.deepcopy(getattr(bf16, name))  # own cache: the engine's stages keep theirs
    ids = torch.randint(0, 10_000, (2, 272), generator=torch.Generator().manual_seed(0))
    want = ref_model.forward_full(ids)  # (2, 272, V)
    model.setup_cache(2)
    # row 1 ends its prompt early: a right-padded prefill row, as the coarse stage makes
    last = torch.tensor([256, 200])
    got = [model.prefill(model.embed(ids[:, :257]), torch.arange(2), last)]
    for p in range(257, 272):
        pos = torch.tensor([p, p])
        got.append(model.decode(ids[:, p], pos, p + 1))
    _close(got[0], want[torch.arange(2), last])
    # decode steps: the logits from head_start (the coarse stage's restriction)
    _close(torch.stack(got[1:], 1), want[:, 257:272, model.head_start :])  # (2, 15, V')


@torch.inference_mode()
def test_bfloat16_fine_logits_close_to_float32(tiny, bf16):
    codes = torch.randint(0, 1024, (1, 1024, 8), generator=torch.Generator().manual_seed(1))
    _close(bf16.fine_model(codes, 3), tiny.fine_model(codes, 3), rel=0.15)
