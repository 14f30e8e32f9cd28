"""Work the models skip: outputs nobody reads are not computed, and what is read is unchanged."""

import numpy as np
import pytest
import torch

from stream_engine.bark import cpu_kernels
from stream_engine.bark.model import CausalGPT, FineGPT, GPTConfig, Linear

CAUSAL = GPTConfig(
    block_size=256, input_vocab_size=300, output_vocab_size=200, n_layer=3, n_head=2, n_embd=32
)
FINE = GPTConfig(
    block_size=256,
    input_vocab_size=70,
    output_vocab_size=66,
    n_layer=3,
    n_head=2,
    n_embd=32,
    n_codes_total=8,
    n_codes_given=1,
)


def _random(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.eval()


@pytest.mark.parametrize("avx2", [False, True])
def test_forward_rows_is_the_tail_of_forward(avx2):
    lin = _random(Linear(48, 40))
    if avx2:
        kernels, why = cpu_kernels.build()
        if kernels is None:
            pytest.skip(why)
        lin.kernels = kernels
    x = torch.randn(3, 48)
    full = lin(x)
    for start in (0, 1, 17, 39):
        tail = lin.forward_rows(x, start)
        assert tail.shape == (3, 40 - start)
        if avx2:  # each output is the same dot product, bit for bit
            assert torch.equal(tail, full[:, start:])
        else:
            torch.testing.assert_close(tail, full[:, start:], atol=1e-6, rtol=0)


def test_prefill_logits_and_cache_of_padded_rows():
    """The last layer attends from each row's last token only; the cache is still complete."""
    m = _random(CausalGPT(CAUSAL))
    m.setup_cache(3)
    lengths = [9, 23, 16]
    seqs = [torch.randint(0, 300, (n + 1,)) for n in lengths]  # n prompt tokens + 1 more
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        ids[b, :n] = s[:n]
    with torch.inference_mode():
        first = m.prefill(m.embed(ids), torch.arange(3), torch.tensor(lengths) - 1)
        nxt = torch.stack([s[n] for s, n in zip(seqs, lengths, strict=True)])
        second = m.decode(nxt, torch.tensor(lengths), T + 1)  # reads the prefill's cache
        for b, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
            want = m.forward_full(s[None])[0]  # (n + 1, V), no cache
            torch.testing.assert_close(first[b], want[n - 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(second[b], want[n], atol=1e-5, rtol=0)
    # and the top layer's keys really were written for every prompt position
    top = m.layers[-1].attn.cache.k
    assert all(top[b, :, : lengths[b]].abs().sum() > 0 for b in range(3))


def test_restricted_head_returns_the_tail_of_the_logits():
    m = _random(CausalGPT(CAUSAL))
    m.setup_cache(2)
    ids = torch.randint(0, 300, (2, 12))
    with torch.inference_mode():
        m.prefill(m.embed(ids), torch.arange(2), torch.tensor([11, 11]))
        step = (torch.tensor([5, 7]), torch.tensor([12, 12]), 13)
        full = m.decode(*step)
        m.restrict_head(150)
        assert m.decode_vocab == 50
        tail = m.decode(*step)  # the same step again: it rewrites the same K/V
    torch.testing.assert_close(tail, full[:, 150:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        m.restrict_head(200)


@pytest.mark.parametrize("keep", [0, 5, 31])
def test_fine_body_keeps_the_positions_asked_for(keep):
    m = _random(FineGPT(FINE))
    x = torch.randn(2, 32, 32)
    with torch.inference_mode():
        full = m.body(x)
        part = m.body(x, keep_from=keep)
    assert part.shape == (2, 32 - keep, 32)
    torch.testing.assert_close(part, full[:, keep:], atol=1e-5, rtol=0)


def test_coarse_tokens_do_not_depend_on_the_head_restriction(tiny):
    """Sampled coarse tokens with the restricted head (the stage's default) equal those with
    the whole head: the skipped ids can never be picked, and the noise is indexed the same."""
    model = tiny.coarse_model
    start = model.head_start
    assert start == 10_000  # set by the coarse stage
    kwargs = dict(voice="v2/en_speaker_1", seed=4, max_semantic_tokens=40)
    restricted = tiny.generate("Sampled, not greedy.", **kwargs)[0]
    model.restrict_head(0)
    try:
        whole = tiny.generate("Sampled, not greedy.", **kwargs)[0]
    finally:
        model.restrict_head(start)
    np.testing.assert_array_equal(restricted.coarse, whole.coarse)
    np.testing.assert_array_equal(restricted.fine, whole.fine)
    assert restricted.coarse.shape[1] > 40  # several coarse steps ran
