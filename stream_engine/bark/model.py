"""Bark's three transformers, written for serving.

The weights and the math are Bark's (and those of transformers' ``BarkModel``); what differs
is the shape of the computation:

* :class:`CausalGPT` (the semantic and coarse models) keeps a static KV cache with one *slot*
  per request. A prefill writes a group of rows into their slots; a decode step advances every
  slot in ``[0, n)`` by one token, each at its own position, so requests that started at
  different times share one forward pass. Nothing is allocated in the decode step, which is
  what CUDA graphs need.
* :class:`FineGPT` (the non-causal fine model) runs a batch of 1024-frame windows where every
  row may predict a different codebook.

Module and parameter names match transformers' Bark classes one for one, so that a
``state_dict`` moves across unchanged (see :mod:`stream_engine.bark.loading`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of one Bark transformer (the fields of transformers' ``BarkSubModelConfig``)."""

    block_size: int = 1024  # longest sequence (positions) the model has embeddings for
    input_vocab_size: int = 10_048
    output_vocab_size: int = 10_048
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True  # bias in linears (and, for the causal models, in layer norms)
    n_codes_total: int = 8  # fine model only: codebooks in a frame
    n_codes_given: int = 1  # fine model only: codebooks it never predicts

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# Rows up to which a decode kernel (AVX2 or packed oneDNN) serves a linear (decode steps);
# longer inputs (prefill, the fine model) go to the default GEMM, which is faster there.
DECODE_MAX_ROWS = 64


def can_pack(weight: Tensor) -> bool:
    """Whether oneDNN can serve ``weight``'s small-batch products on this build (CPU, fp32)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class DecodeKernels(Protocol):
    """Faster decode-step kernels (the CPU ones of :mod:`stream_engine.bark.cpu_kernels`)."""

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
        """``F.linear(x, weight, bias)``, then GELU (erf) if ``gelu``."""
        ...

    def attention(self, qkv: Tensor, cache_k: Tensor, cache_v: Tensor, pos: Tensor) -> Tensor:
        """Write row b's key and value into the caches at ``pos[b]``, then attend over keys
        ``[0, pos[b]]``: ``qkv`` (B, 3C) -> (B, C)."""
        ...


class Linear(nn.Linear):
    """``nn.Linear`` with an optional faster kernel for the few-row products of decode steps.

    On a CPU, MKL runs a decode step's skinny products (a handful of rows against a large
    weight) at a fraction of the memory bandwidth. Two replacements, used for inputs of at most
    :data:`DECODE_MAX_ROWS` rows (see :mod:`stream_engine.bark.cpu_kernels`):

    * ``kernels``: :class:`DecodeKernels` (the AVX2 kernel) on the plain weight;
    * ``packed``: a copy of the weight reordered once for oneDNN (extra memory).

    The plain weight stays the one in the ``state_dict``. Results agree with ``F.linear`` to
    float rounding.
    """

    packed: Tensor | None = None
    kernels: DecodeKernels | None = None

    def pack(self, batch_hint: int) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)

    def unpack(self) -> None:
        self.packed = None
        self.kernels = None

    def _small(self, x: Tensor) -> bool:
        return x.numel() <= DECODE_MAX_ROWS * x.size(-1)

    def forward(self, x: Tensor) -> Tensor:
        if self._small(x):
            if self.kernels is not None:
                return self.kernels.linear(x, self.weight, self.bias, False)
            if self.packed is not None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return super().forward(x)

    def forward_rows(self, x: Tensor, start: int) -> Tensor:
        """``self(x)[..., start:]``, computing only those outputs (the weight's rows from
        ``start``, a contiguous view). Each output is the same dot product as in ``self(x)``."""
        if start == 0:
            return self(x)
        weight = self.weight[start:]
        bias = None if self.bias is None else self.bias[start:]
        if self.kernels is not None and self._small(x):
            return self.kernels.linear(x, weight, bias, False)
        return F.linear(x, weight, bias)

    def forward_gelu(self, x: Tensor) -> Tensor:
        """``gelu(self(x))``, in one pass where the kernel can."""
        if self.kernels is not None and self._small(x):
            return self.kernels.linear(x, self.weight, self.bias, True)
        return F.gelu(self(x))


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer: one slot (row) per request."""

    def __init__(
        self, slots: int, n_head: int, max_len: int, head_dim: int, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        shape = (slots, n_head, max_len, head_dim)
        self.k: Tensor
        self.v: Tensor
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, causal: bool) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.causal = causal
        self.att_proj = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.out_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.cache: KVCache | None = None
        self.impl = "sdpa"
        self.kernels: DecodeKernels | None = None  # decode steps' attention (with sdpa)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        q, k, v = self.att_proj(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        if self.impl == "eager":
            # the reference's own arithmetic: scores, fill, softmax, weighted sum
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            if causal:
                T, S = q.size(-2), k.size(-2)
                tri = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
                att = att.masked_fill(~tri, torch.finfo(att.dtype).min)
            if mask is not None:
                att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
            return F.softmax(att, dim=-1).to(v.dtype) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def _merge(self, y: Tensor) -> Tensor:
        B, nh, T, hs = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, nh * hs))  # (B, T, C)

    def forward_full(self, x: Tensor, queries_from: int = 0) -> Tensor:
        """Attention over ``x`` alone, without a cache: (B, T, C) -> (B, T - queries_from, C).

        Only positions from ``queries_from`` attend (over all keys; non-causal models only).
        """
        q, k, v = self._heads(x)
        if queries_from:
            assert not self.causal, "queries_from is for non-causal attention"
            q = q[:, :, queries_from:]
        if self.impl == "flash_attention_2" and x.is_cuda:
            from flash_attn import flash_attn_func  # optional CUDA-only dependency

            y = flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=self.causal
            ).transpose(1, 2)
        else:
            y = self._attend(q, k, v, None, self.causal)
        return self._merge(y)

    def _write_prefill(self, k: Tensor, v: Tensor, rows: Tensor) -> None:
        assert self.cache is not None
        T = k.size(2)
        self.cache.k[rows, :, :T] = k
        self.cache.v[rows, :, :T] = v

    def forward_prefill_last(self, x: Tensor, rows: Tensor, last: Tensor) -> Tensor:
        """:meth:`forward_prefill` when only each row's output at ``last`` (B,) is needed.

        Writes every position's K/V into ``rows``' slots, as :meth:`forward_prefill` does, but
        attends from position ``last[b]`` only (over keys ``[0, last[b]]``): (B, T, C) ->
        (B, 1, C). The last layer of a prefill needs no more.
        """
        q, k, v = self._heads(x)
        self._write_prefill(k, v, rows)
        B, T = x.size(0), x.size(1)
        q = q[torch.arange(B, device=x.device), :, last][:, :, None]  # (B, nh, 1, hs)
        keys = torch.arange(T, device=x.device)
        mask = (keys[None, :] <= last[:, None])[:, None, None, :]  # (B, 1, 1, T)
        return self._merge(self._attend(q, k, v, mask, False))

    def forward_prefill(self, x: Tensor, rows: Tensor) -> Tensor:
        """Causal attention over ``x`` (B, T, C) from position 0; writes K/V into ``rows``' slots.

        Rows may be right-padded: a valid query never sees a later (padded) key, and the
        padded keys written to the cache are overwritten by decode steps before anyone reads
        them.
        """
        q, k, v = self._heads(x)
        self._write_prefill(k, v, rows)
        return self._merge(self._attend(q, k, v, None, True))

    @property
    def decode_kernel(self) -> bool:
        """Whether decode steps use ``kernels.attention`` (which needs no mask)."""
        return self.kernels is not None and self.impl == "sdpa"

    def forward_decode(self, x: Tensor, pos: Tensor, mask: Tensor | None, kv_len: int) -> Tensor:
        """One token per slot for slots ``[0, B)``: ``x`` (B, 1, C), ``pos`` (B,) its position.

        ``mask`` (B, 1, 1, kv_len) says which cached keys each slot attends to (keys up to its
        ``pos``); it may be None only where :attr:`decode_kernel` is true.
        """
        assert self.cache is not None
        B = x.size(0)
        if self.decode_kernel:
            assert self.kernels is not None  # decode_kernel says so
            # the same attention (keys up to each slot's pos), without the mask's zeros
            qkv = self.att_proj(x).view(B, -1)  # (B, 3C)
            y = self.kernels.attention(qkv, self.cache.k, self.cache.v, pos)  # (B, C)
            return self.out_proj(y.view(B, 1, -1))
        assert mask is not None
        q, k, v = self._heads(x)
        slot = torch.arange(B, device=x.device)
        self.cache.k[slot, :, pos] = k[:, :, 0]  # (B, nh, hs) at (slot, :, pos)
        self.cache.v[slot, :, pos] = v[:, :, 0]
        keys = self.cache.k[:B, :, :kv_len]  # (B, nh, S, hs)
        values = self.cache.v[:B, :, :kv_len]
        return self._merge(self._attend(q, keys, values, mask, False))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.in_proj = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.out_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.in_proj.forward_gelu(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, causal: bool) -> None:
        super().__init__()
        # Bark leaves the layer-norm bias out of its causal models when bias=False;
        # the fine model always has one.
        ln_bias = cfg.bias if causal else True
        self.layernorm_1 = nn.LayerNorm(cfg.n_embd, bias=ln_bias)
        self.attn = CausalSelfAttention(cfg, causal)
        self.layernorm_2 = nn.LayerNorm(cfg.n_embd, bias=ln_bias)
        self.mlp = MLP(cfg)

    def _residual(self, x: Tensor, attn_out: Tensor) -> Tensor:
        x = x + attn_out
        return x + self.mlp(self.layernorm_2(x))


class CausalGPT(nn.Module):
    """The semantic or the coarse model: a GPT-2-like decoder with a slot-based static cache."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embeds_layer = nn.Embedding(cfg.input_vocab_size, cfg.n_embd)
        self.position_embeds_layer = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = [Block(cfg, causal=True) for _ in range(cfg.n_layer)]
        self.layers = nn.ModuleList(self.blocks)  # the same blocks, registered (HF's names)
        self.layernorm_final = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = Linear(cfg.n_embd, cfg.output_vocab_size, bias=False)
        self.slots = 0
        # decode steps compute the logits of output ids [head_start, V) only (see restrict_head)
        self.head_start = 0

    def setup_cache(self, slots: int, max_len: int | None = None) -> None:
        """Allocate the KV cache for ``slots`` concurrent requests, once, up front."""
        max_len = max_len or self.cfg.block_size
        w = self.lm_head.weight
        for block in self.blocks:
            block.attn.cache = KVCache(
                slots, self.cfg.n_head, max_len, self.cfg.head_dim, w.dtype, w.device
            )
        self.slots = slots

    def clear_slot(self, slot: int) -> None:
        """Zero ``slot``'s keys and values in every layer (a new request takes the slot).

        A decode step's attention reads every cached position and masks the later ones; a
        masked position's weight is 0, but 0 times a NaN or inf left there by an earlier
        request (an fp16 overflow, say) is NaN, which would poison this request.
        """
        for block in self.blocks:
            cache = block.attn.cache
            assert cache is not None
            cache.k[slot].zero_()
            cache.v[slot].zero_()

    def set_attn(self, impl: str) -> None:
        for block in self.blocks:
            block.attn.impl = impl

    def use_decode_kernel(
        self, kernel: str, kernels: DecodeKernels | None = None, batch_hint: int = 8
    ) -> None:
        """Serve decode steps with ``kernel`` (see :mod:`~stream_engine.bark.cpu_kernels`).

        ``"avx2"`` uses ``kernels`` for the linears and (with sdpa) the attention; ``"onednn"``
        packs a copy of every weight for ``batch_hint`` rows (call again after changing the
        weights); anything else is the plain ``F.linear`` and sdpa.
        """
        if kernel == "avx2" and kernels is None:
            raise ValueError("the avx2 decode kernel needs its kernels")
        for module in self.modules():
            if isinstance(module, Linear):
                module.unpack()
                if kernel == "avx2":
                    module.kernels = kernels
                elif kernel == "onednn":
                    module.pack(batch_hint)
            elif isinstance(module, CausalSelfAttention):
                module.kernels = kernels if kernel == "avx2" else None

    def restrict_head(self, start: int) -> None:
        """Make :meth:`decode` return the logits of output ids ``[start, V)`` only.

        For a caller that never picks an id below ``start`` (the coarse stage picks codebook
        ids, all from 10000 up): the head's other rows are not read at all, which is most of
        the coarse head and ~8% of a coarse decode step's weights. Each logit is the same dot
        product as before.
        """
        if not 0 <= start < self.cfg.output_vocab_size:
            raise ValueError(f"head start {start} outside [0, {self.cfg.output_vocab_size})")
        self.head_start = start

    @property
    def decode_vocab(self) -> int:
        """Width of :meth:`decode`'s logits: ``V - head_start``."""
        return self.cfg.output_vocab_size - self.head_start

    def embed(self, ids: Tensor) -> Tensor:
        return self.input_embeds_layer(ids)

    def prefill(self, embeds: Tensor, rows: Tensor, last: Tensor) -> Tensor:
        """Run ``embeds`` (B, T, C) from position 0 into ``rows``' slots.

        ``last`` (B,) is the index of each row's last real token; returns its logits (B, V).
        Every layer writes K/V for all positions; the last one carries on from ``last`` alone
        (its attention output and MLP elsewhere would feed nothing).
        """
        T = embeds.size(1)
        pos = torch.arange(T, device=embeds.device)
        x = embeds + self.position_embeds_layer(pos)[None]
        *body, top = self.blocks
        for block in body:
            x = block._residual(x, block.attn.forward_prefill(block.layernorm_1(x), rows))
        y = top.attn.forward_prefill_last(top.layernorm_1(x), rows, last)  # (B, 1, C)
        x = x[torch.arange(x.size(0), device=x.device), last][:, None]  # (B, 1, C)
        x = top._residual(x, y)
        return self.lm_head(self.layernorm_final(x[:, 0]))

    def decode(self, ids: Tensor, pos: Tensor, kv_len: int) -> Tensor:
        """One step for slots ``[0, B)``: token ``ids`` (B,) at positions ``pos`` (B,).

        Keys up to ``kv_len`` (> max(pos)) are read; returns logits (B, :attr:`decode_vocab`):
        those of output ids from :attr:`head_start`.
        """
        x = self.input_embeds_layer(ids) + self.position_embeds_layer(pos)  # (B, C)
        x = x[:, None]  # (B, 1, C)
        mask = None
        if not all(block.attn.decode_kernel for block in self.blocks):
            keys = torch.arange(kv_len, device=ids.device)
            mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, S)
        for block in self.blocks:
            x = block._residual(
                x, block.attn.forward_decode(block.layernorm_1(x), pos, mask, kv_len)
            )
        return self.lm_head.forward_rows(self.layernorm_final(x[:, 0]), self.head_start)

    def forward_full(self, ids: Tensor) -> Tensor:
        """Logits at every position of ``ids`` (B, T), without the cache (for tests)."""
        T = ids.size(1)
        x = self.input_embeds_layer(ids) + self.position_embeds_layer(
            torch.arange(T, device=ids.device)
        )
        for block in self.blocks:
            x = block._residual(x, block.attn.forward_full(block.layernorm_1(x)))
        return self.lm_head(self.layernorm_final(x))


class FineGPT(nn.Module):
    """The fine model: non-causal, one embedding per codebook, one head per predicted codebook."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_embeds_layers = nn.ModuleList(
            [nn.Embedding(cfg.input_vocab_size, cfg.n_embd) for _ in range(cfg.n_codes_total)]
        )
        self.position_embeds_layer = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = [Block(cfg, causal=False) for _ in range(cfg.n_layer)]
        self.layers = nn.ModuleList(self.blocks)  # the same blocks, registered (HF's names)
        self.layernorm_final = nn.LayerNorm(cfg.n_embd)
        self.heads = [
            nn.Linear(cfg.n_embd, cfg.output_vocab_size, bias=False)
            for _ in range(cfg.n_codes_given, cfg.n_codes_total)
        ]
        self.lm_heads = nn.ModuleList(self.heads)  # the same heads, registered

    def set_attn(self, impl: str) -> None:
        for block in self.blocks:
            block.attn.impl = impl

    def embed(self, codes: Tensor, codebook: int) -> Tensor:
        """Sum of the embeddings of codebooks ``0..codebook`` of ``codes`` (B, T, n) -> (B, T, C)."""
        embs = torch.stack(
            [emb(codes[:, :, i]) for i, emb in enumerate(self.input_embeds_layers)], dim=-1
        )  # (B, T, C, n_codes)
        return embs[..., : codebook + 1].sum(dim=-1)

    def body(self, x: Tensor, keep_from: int = 0) -> Tensor:
        """Positions, the non-causal blocks and the final norm: (B, T, C) -> (B, T - keep_from, C).

        Only positions from ``keep_from`` come out: the last block attends from those alone
        and runs its MLP on them (every position still serves as a key and value).
        """
        x = x + self.position_embeds_layer(torch.arange(x.size(1), device=x.device))[None]
        *body, top = self.blocks
        for block in body:
            x = block._residual(x, block.attn.forward_full(block.layernorm_1(x)))
        y = top.attn.forward_full(top.layernorm_1(x), queries_from=keep_from)
        return self.layernorm_final(top._residual(x[:, keep_from:], y))

    def head(self, h: Tensor, codebook: int) -> Tensor:
        return self.heads[codebook - self.cfg.n_codes_given](h)  # (B, T, V)

    def forward(self, codes: Tensor, codebook: int) -> Tensor:
        """``codes`` (B, T, n_codes) -> logits (B, T, V) predicting codebook ``codebook``."""
        return self.head(self.body(self.embed(codes, codebook)), codebook)


def gpt_config_from_hf(hf_config) -> GPTConfig:
    """Our :class:`GPTConfig` from a transformers ``BarkSubModelConfig``."""
    return GPTConfig(
        block_size=hf_config.block_size,
        input_vocab_size=hf_config.input_vocab_size,
        output_vocab_size=hf_config.output_vocab_size,
        n_layer=hf_config.num_layers,
        n_head=hf_config.num_heads,
        n_embd=hf_config.hidden_size,
        bias=hf_config.bias,
        n_codes_total=getattr(hf_config, "n_codes_total", 8),
        n_codes_given=getattr(hf_config, "n_codes_given", 1),
    )


def from_hf(hf_model: nn.Module) -> CausalGPT | FineGPT:
    """Build our module around a transformers Bark sub-model's weights (shared, not copied)."""
    cfg = gpt_config_from_hf(hf_model.config)
    fine = hasattr(hf_model, "lm_heads")
    ours: CausalGPT | FineGPT = FineGPT(cfg) if fine else CausalGPT(cfg)
    # the causal mask buffers ("*.attn.bias") are transformers' own; we build masks per step
    state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith("attn.bias")}
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.eval().requires_grad_(False)
