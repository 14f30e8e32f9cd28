"""What of :mod:`stream_engine.runtime.cuda` runs without a GPU: buckets, padding, the gate.

``DecodeGraphs(capture=False)`` runs the padded static-buffer step eagerly, so the bookkeeping
that the CUDA graphs rely on (padding rows, kv buckets, static buffers, cache reallocation) is
tested here on every machine; tests/gpu/test_cuda.py tests the capture itself on a GPU.
"""

import pytest
import torch

from stream_engine.bark.model import CausalGPT, GPTConfig
from stream_engine.runtime.cuda import (
    DecodeGraphs,
    batch_buckets,
    bucket_for,
    kv_buckets,
    make_decoder,
    to_device,
)

CFG = GPTConfig(
    block_size=512, input_vocab_size=300, output_vocab_size=200, n_layer=2, n_head=2, n_embd=32
)


def _model(slots: int) -> CausalGPT:
    torch.manual_seed(0)
    m = CausalGPT(CFG).eval().requires_grad_(False)
    m.setup_cache(slots)
    return m


def _prefill(m: CausalGPT, lens: list[int]) -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG.input_vocab_size, (len(lens), max(lens)), generator=g)
    m.prefill(m.embed(ids), torch.arange(len(lens)), torch.tensor(lens) - 1)


def test_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert kv_buckets(1024) == (128, 256, 384, 512, 640, 768, 896, 1024)
    assert kv_buckets(300, 128) == (128, 256, 300)
    assert bucket_for(3, (1, 2, 4, 8)) == 4
    assert bucket_for(4, (1, 2, 4, 8)) == 4
    assert bucket_for(129, kv_buckets(1024)) == 256
    with pytest.raises(ValueError):
        bucket_for(9, (1, 2, 4, 8))
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_make_decoder_is_model_decode_off_cuda():
    m = _model(4)
    assert make_decoder(m, 4, "cpu", enabled=True) == m.decode
    assert make_decoder(m, 4, torch.device("cpu"), enabled=False) == m.decode


def test_capture_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(_model(2))


@torch.inference_mode()
def test_padded_step_equals_decode():
    """Rows at different positions, n not a bucket, kv_len not a bucket: same logits."""
    m = _model(8)
    lens = [40, 7, 130, 1, 300, 64, 255, 128]
    _prefill(m, lens)
    graphs = DecodeGraphs(m, kv_step=64, capture=False)
    pos = torch.tensor(lens)
    for n in (3, 5, 8, 1):
        for _ in range(3):
            ids = torch.randint(0, CFG.input_vocab_size, (n,))
            p = pos[:n].clone()
            kv_len = int(p.max()) + 1
            want = m.decode(ids, p, kv_len)  # (n, V)
            # the padded call by hand: what a graph replays
            b, s = bucket_for(n, graphs.batch_sizes), bucket_for(kv_len, graphs.kv_lens)
            zeros = torch.zeros(b - n, dtype=torch.long)
            padded = m.decode(torch.cat([ids, zeros]), torch.cat([p, zeros]), s)[:n]
            got = graphs(ids, p, kv_len)
            assert got.shape == (n, CFG.output_vocab_size) and got.dtype == torch.float32
            assert torch.equal(got, padded.float())
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            pos[:n] += 1


@torch.inference_mode()
def test_follows_cache_reallocation_and_attention_change():
    m = _model(4)
    graphs = DecodeGraphs(m, capture=False)
    ids, pos = torch.tensor([5, 6]), torch.tensor([0, 0])
    graphs(ids, pos, 1)
    m.setup_cache(2)  # new buffers, fewer slots
    _prefill(m, [10, 20])
    pos = torch.tensor([10, 20])
    torch.testing.assert_close(graphs(ids, pos, 21), m.decode(ids, pos, 21), atol=1e-5, rtol=0)
    assert graphs.slots == 2 and graphs.batch_sizes == (1, 2)
    m.set_attn("eager")
    got = graphs(ids, pos + 1, 22)
    assert graphs._impl == "eager"
    torch.testing.assert_close(got, m.decode(ids, pos + 1, 22), atol=1e-5, rtol=0)


@torch.inference_mode()
def test_follows_the_head_restriction():
    m = _model(2)
    _prefill(m, [10, 20])
    graphs = DecodeGraphs(m, capture=False)
    ids, pos = torch.tensor([5, 6]), torch.tensor([10, 20])
    full = graphs(ids, pos, 21).clone()
    assert full.shape == (2, CFG.output_vocab_size)
    m.restrict_head(120)  # as the coarse stage does: new output buffers
    tail = graphs(ids, pos, 21)
    assert tail.shape == (2, 80)
    torch.testing.assert_close(tail, full[:, 120:], atol=1e-6, rtol=0)
    torch.testing.assert_close(tail, m.decode(ids, pos, 21), atol=1e-6, rtol=0)


def test_too_many_rows_or_keys():
    m = _model(2)
    graphs = DecodeGraphs(m, capture=False)
    with pytest.raises(ValueError):
        graphs(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError):
        graphs(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 513)


def test_to_device_on_cpu():
    t = to_device([3, 1, 2], torch.device("cpu"))
    assert t.dtype == torch.long and t.tolist() == [3, 1, 2]
