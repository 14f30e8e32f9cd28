import torch
from transformers.generation.logits_process import (
    BarkEosPrioritizerLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from stream_engine.bark.sampling import (
    RowParams,
    apply_min_eos_p,
    apply_top_k,
    apply_top_p,
    choose,
    uniform_noise,
)


def test_top_k_and_top_p_match_transformers_per_row():
    torch.manual_seed(0)
    scores = torch.randn(3, 500) * 3
    ks = [5, 50, 500]
    ours = apply_top_k(scores, torch.tensor(ks))
    for i, k in enumerate(ks):
        assert torch.equal(ours[i], TopKLogitsWarper(k)(None, scores[i : i + 1])[0])
    ps = [0.3, 0.9, 0.99]
    ours = apply_top_p(scores, torch.tensor(ps))
    for i, p in enumerate(ps):
        assert torch.equal(ours[i], TopPLogitsWarper(p)(None, scores[i : i + 1])[0])
    assert torch.equal(apply_top_p(scores, torch.ones(3)), scores)  # 1.0 is off


def test_min_eos_p_matches_transformers():
    scores = torch.randn(2, 100)
    scores[0, 7] = 10.0  # row 0: EOS very likely
    ours = apply_min_eos_p(scores, 7, torch.tensor([0.2, 0.2]))
    ref = BarkEosPrioritizerLogitsProcessor(7, 0.2)(None, scores)
    assert torch.equal(ours, ref)
    assert torch.isinf(ours[0]).sum() == 99 and not torch.isinf(ours[1]).any()


def test_noise_is_uniform_and_depends_only_on_seed_and_counter():
    u = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), (2, 100_000))
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1])
    again = uniform_noise(torch.tensor([2]), torch.tensor([0]), (1, 100_000))
    assert torch.equal(again[0], u[1])


def test_sampling_follows_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 20_000
    params = RowParams.build(
        [1.0] * n, [0] * n, [1.0] * n, [False] * n, [7] * n, torch.device("cpu")
    )
    toks = choose(logits.expand(n, 4), params, torch.arange(n))
    freq = torch.bincount(toks, minlength=4).float() / n
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)
    greedy = RowParams.build([1.0], [0], [1.0], [True], [7], torch.device("cpu"))
    assert choose(logits, greedy, torch.zeros(1, dtype=torch.long)).item() == 0


def test_choose_fine_samples_softmax_and_argmax_at_temperature_one():
    from stream_engine.bark.sampling import choose_fine

    base = torch.tensor([0.0, 1.0, 2.0, -1.0])
    logits = base.expand(2, 20_000, 4).contiguous()
    temp = torch.tensor([1.5, 1.0])
    out = choose_fine(logits, temp, torch.tensor([7, 7]), torch.tensor([0, 0]))
    freq = torch.bincount(out[0], minlength=4) / 20_000
    assert torch.allclose(freq, torch.softmax(base / 1.5, -1), atol=0.015)
    assert (out[1] == 2).all()  # temperature 1.0 is argmax (transformers' rule)
    # batch-invariant, and a different counter gives different draws
    alone = choose_fine(logits[:1], temp[:1], torch.tensor([7]), torch.tensor([0]))
    assert torch.equal(alone, out[:1])
    other = choose_fine(logits[:1], temp[:1], torch.tensor([7]), torch.tensor([1]))
    assert not torch.equal(other, alone)
