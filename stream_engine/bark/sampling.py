"""Choosing the next token, for a batch where every row has its own options.

The processing is transformers' for Bark, in its order (``GenerationMixin._get_logits_processor``
with Bark's custom processors first):

1. token masks: Bark's suppressed semantic ids, or the coarse model's alternating codebooks;
2. ``min_eos_p`` (semantic only): when EOS is likelier than ``min_eos_p``, only EOS remains;
3. sampling rows only: temperature, then top-k, then top-p (``TopKLogitsWarper``,
   ``TopPLogitsWarper`` semantics, ``min_tokens_to_keep=1``);
4. greedy rows take the argmax; sampling rows draw from ``softmax(scores)``.

The draw is the Gumbel-max trick with noise from a counter-based hash of
``(seed, counter, token)``: a row's sample depends on its own seed and step alone, not on the
batch it is in, on the device, or on a generator's hidden state, and it needs no host sync
(so decode steps stay capturable in CUDA graphs). ``argmax(scores + Gumbel)`` is an exact sample
of ``softmax(scores)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**31, so a 32-bit value times it never leaves int64


@dataclass
class RowParams:
    """Per-row sampling options as device tensors, each of shape (B,)."""

    temperature: Tensor  # float32; 1.0 means unscaled
    top_k: Tensor  # int64; 0 means off
    top_p: Tensor  # float32; 1.0 means off
    greedy: Tensor  # bool; True takes the argmax
    seed: Tensor  # int64 in [0, 2**31)

    @classmethod
    def build(
        cls,
        temperature: list[float],
        top_k: list[int],
        top_p: list[float],
        greedy: list[bool],
        seed: list[int],
        device: torch.device,
    ) -> RowParams:
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            seed=torch.tensor(seed, dtype=torch.int64, device=device),
        )


def _mix32(x: Tensor) -> Tensor:
    # a well-known 32-bit integer finaliser (xor-shift, multiply, twice), kept inside 32 bits
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seed: Tensor, counter: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Uniform floats in (0, 1) of ``shape`` = (B, ..., V): a pure function of (seed, counter, index).

    ``seed`` and ``counter`` are (B,) int64 tensors; the index runs over the trailing dims.
    """
    B = shape[0]
    n = 1
    for dim in shape[1:]:
        n *= dim
    idx = torch.arange(n, device=seed.device, dtype=torch.int64).view(1, *shape[1:])
    lead = (B,) + (1,) * (len(shape) - 1)
    s = _mix32((seed & _MASK32).view(lead) ^ 0x5BD1E995)
    c = _mix32(((counter & _MASK32).view(lead) + s) & _MASK32)
    x = _mix32((idx + c * 0x9E37) & _MASK32 ^ s)
    x = _mix32(x ^ c)
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel_noise(seed: Tensor, counter: Tensor, shape: tuple[int, ...]) -> Tensor:
    return -torch.log(-torch.log(uniform_noise(seed, counter, shape)))


def apply_min_eos_p(scores: Tensor, eos: int, min_eos_p: Tensor) -> Tensor:
    """Bark's EOS prioritiser: rows whose P(EOS) > ``min_eos_p`` (B,) keep EOS alone.

    A row with ``min_eos_p`` = +inf is left alone (the option is off).
    """
    probs = torch.softmax(scores.float(), dim=-1)
    stop = probs[:, eos] > min_eos_p  # (B,)
    only_eos = torch.full_like(scores, float("-inf"))
    only_eos[:, eos] = scores[:, eos]
    return torch.where(stop[:, None], only_eos, scores)


def apply_top_k(scores: Tensor, top_k: Tensor) -> Tensor:
    """Keep each row's ``top_k`` best scores (ties at the k-th kept, as in transformers)."""
    V = scores.size(-1)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    kth = torch.sort(scores, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus filtering with transformers' rule: drop the low tail whose mass is <= 1 - top_p."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - top_p)[:, None]
    drop_sorted[:, -1] = False  # keep at least one token
    drop_sorted &= (top_p < 1.0)[:, None]  # top_p == 1 is off, exactly
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def choose(
    scores: Tensor,
    params: RowParams,
    counter: Tensor,
    use_top_k: bool = True,
    use_top_p: bool = True,
) -> Tensor:
    """Next token (B,) from masked ``scores`` (B, V): argmax for greedy rows, a sample otherwise.

    ``counter`` (B,) identifies the draw within each row's stream (its step); ``use_top_k`` /
    ``use_top_p`` let the caller skip a sort when no row asked for it.
    """
    scores = scores.float()
    greedy_tok = scores.argmax(dim=-1)
    warped = scores / params.temperature[:, None]
    if use_top_k:
        warped = apply_top_k(warped, params.top_k)
    if use_top_p:
        warped = apply_top_p(warped, params.top_p)
    noise = gumbel_noise(params.seed, counter, tuple(warped.shape))
    sampled = (warped + noise).argmax(dim=-1)
    return torch.where(params.greedy, greedy_tok, sampled)


def choose_fine(logits: Tensor, temperature: Tensor, seed: Tensor, counter: Tensor) -> Tensor:
    """Fine-model codes (B, T) from ``logits`` (B, T, V) restricted to the codebook.

    As in transformers' ``BarkFineModel.generate``, a temperature of 1.0 (or none) means argmax;
    other rows sample from ``softmax(logits / temperature)`` at every position.

    Sampling inverts each position's CDF with one counter-hashed uniform per (row, position):
    B*T random numbers instead of the B*T*V a Gumbel-max draw needs (a 1024-frame window has
    a million logits per row and codebook).
    """
    logits = logits.float()
    greedy = temperature == 1.0  # (B,)
    greedy_tok = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return greedy_tok
    cdf = torch.softmax(logits / temperature[:, None, None], dim=-1).cumsum(dim=-1)  # (B,T,V)
    u = uniform_noise(seed, counter, tuple(logits.shape[:2]))[..., None]  # (B, T, 1)
    sampled = torch.searchsorted(cdf, u * cdf[..., -1:]).squeeze(-1)  # first cdf >= u
    sampled = sampled.clamp(max=logits.size(-1) - 1)
    return torch.where(greedy[:, None], greedy_tok, sampled)
