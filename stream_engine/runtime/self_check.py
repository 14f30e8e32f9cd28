"""What the engine checks at load on a GPU before it serves: attention kernels, decode graphs.

A user's first run must not be where we learn that a kernel misbehaves on their GPU, so
:meth:`Engine.load <stream_engine.engine.Engine.load>` (``EngineConfig.gpu_self_check``) runs:

* :func:`probe_sdpa`: which kernel ``scaled_dot_product_attention`` picks for each kind of call
  the models make (decode and prefill-last: one query row with a key mask; prefill: causal; the
  fine model: full), and whether it agrees with the plain arithmetic. cuDNN attention is turned
  off first: it builds an execution plan for every new shape, and eager decode steps and coarse
  prefills see new shapes all the time. A kernel that fails or disagrees is turned off too and
  the kind probed again. The flags are the process's (torch keeps them globally, not per
  thread or per call), so they are set once, here.
* :func:`check_graphs`: the captured decode graphs of a stage against its eager step on the
  same padded shapes, from the same fixed prompts, for every batch bucket and both variants
  (greedy; sampled with fixed seeds, top-k and top-p), the runs spread over the kv buckets:
  the same tokens over ``steps`` steps, logits within :data:`GRAPH_TOLERANCE` of each other
  (a replay runs the eager step's kernels, so they should be equal), everything finite.

What to do about a failure (fall back, or raise under ``strict_gpu``) is the engine's. One
failure no fallback undoes: a capture that raises partway can leave torch's allocator
believing a capture is under way (so :class:`~.cuda.StepGraphs` first runs each step with
host syncs made errors, which catches the usual cause before any capture begins, and the
engine captures nothing after a failed capture).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

from .stages import DecodeStage

# graphs against eager: max |logit difference| <= GRAPH_TOLERANCE * max(1, max |logit|)
GRAPH_TOLERANCE = 1e-3
GRAPH_CHECK_STEPS = 16
# an SDPA kernel against the plain arithmetic in float32: max |difference| of the outputs
SDPA_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# torch's switch for each kernel (torch.backends.cuda); every one of them is process-wide
_SWITCHES: dict[SDPBackend, Callable[[bool], None]] = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.enable_flash_sdp,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.enable_mem_efficient_sdp,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.enable_cudnn_sdp,
    SDPBackend.MATH: torch.backends.cuda.enable_math_sdp,
}


class CheckFailed(Exception):
    """A load-time check found a problem; the message says which."""


# -- attention kernels ------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCall:
    """One kind of attention call the models make, on a representative shape."""

    kind: str
    q: Tensor  # (B, nh, T, hs)
    k: Tensor  # (B, nh, S, hs)
    v: Tensor
    mask: Tensor | None  # (B, 1, T, S) bool: True attends
    causal: bool

    def reference(self) -> Tensor:
        """The plain arithmetic in float32: scores, mask, softmax, weighted sum."""
        q, k, v = self.q.float(), self.k.float(), self.v.float()
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if self.causal:
            T, S = q.size(-2), k.size(-2)
            tri = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            att = att.masked_fill(~tri, float("-inf"))
        if self.mask is not None:
            att = att.masked_fill(~self.mask, float("-inf"))
        return att.softmax(dim=-1) @ v

    def run(self) -> Tensor:
        return F.scaled_dot_product_attention(
            self.q, self.k, self.v, attn_mask=self.mask, is_causal=self.causal
        )

    def choice(self) -> SDPBackend:
        """The kernel torch picks for this call under the current flags."""
        return SDPBackend(
            torch._fused_sdp_choice(self.q, self.k, self.v, self.mask, 0.0, self.causal)
        )


def attention_calls(
    device: torch.device, dtype: torch.dtype, n_head: int, head_dim: int, seed: int = 0
) -> list[AttentionCall]:
    """The models' kinds of attention call: decode/prefill-last (``masked``), prefill
    (``causal``), the fine model (``full``), on shapes like Bark's."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    S = 300
    lens = torch.tensor([300, 41], device=device)  # rows at their own positions
    keys = torch.arange(S, device=device)
    mask = (keys[None, :] < lens[:, None])[:, None, None, :]  # (2, 1, 1, S)
    q1, kv = rand(2, n_head, 1, head_dim), rand(2, n_head, S, head_dim)
    prompt = rand(2, n_head, 257, head_dim)
    window = rand(1, n_head, 1024, head_dim)
    return [
        AttentionCall("masked", q1, kv, kv.flip(0), mask, causal=False),
        AttentionCall("causal", prompt, prompt.flip(0), prompt.flip(1), None, causal=True),
        AttentionCall("full", window, window.flip(1), window.flip(2), None, causal=False),
    ]


@dataclass(frozen=True)
class SdpaChoice:
    """What :func:`probe_sdpa` found: kind -> kernel name, and what it turned off, why."""

    kernels: dict[str, str]
    disabled: dict[str, str]

    def as_dict(self) -> dict[str, dict[str, str]]:
        return asdict(self)


def _problem(call: AttentionCall, tolerance: float) -> str | None:
    try:
        got = call.run()
    except RuntimeError as exc:
        return f"fails on the {call.kind} call ({exc})"
    diff = (got.float() - call.reference()).abs().max().item()
    if not math.isfinite(diff) or diff > tolerance:
        return f"differs from the plain arithmetic by {diff:.3g} on the {call.kind} call"
    return None


def _flags() -> dict[SDPBackend, bool]:
    b = torch.backends.cuda
    return {
        SDPBackend.FLASH_ATTENTION: b.flash_sdp_enabled(),
        SDPBackend.EFFICIENT_ATTENTION: b.mem_efficient_sdp_enabled(),
        SDPBackend.CUDNN_ATTENTION: b.cudnn_sdp_enabled(),
        SDPBackend.MATH: b.math_sdp_enabled(),
    }


CUDNN_WHY = "builds an execution plan for every new shape"


def turn_off_cudnn_attention() -> None:
    """cuDNN attention off, process-wide (see the module docstring)."""
    _SWITCHES[SDPBackend.CUDNN_ATTENTION](False)


def probe_sdpa(calls: list[AttentionCall], tolerance: float) -> SdpaChoice:
    """Choose the kernel of every kind of call by turning off those that must not serve.

    cuDNN attention goes first (a plan per shape); then, while some kind's chosen kernel fails
    or disagrees with the plain arithmetic, that kernel is turned off and the kinds probed
    again. Kernels that were off before the probe are recorded as such. Raises
    :class:`CheckFailed` if some kind has no kernel left; the switches are then as they were
    before the probe, cuDNN attention off.
    """
    before = _flags()
    disabled = {b.name: "off before the probe" for b, on in before.items() if not on}
    disabled["CUDNN_ATTENTION"] = CUDNN_WHY
    turn_off_cudnn_attention()
    try:
        while True:
            kernels: dict[str, str] = {}
            for call in calls:
                backend = call.choice()
                if backend not in _SWITCHES:
                    raise CheckFailed(f"no attention kernel serves the {call.kind} call")
                problem = _problem(call, tolerance)
                if problem is not None:
                    if backend == SDPBackend.MATH:
                        raise CheckFailed(f"attention's MATH kernel {problem}")
                    disabled[backend.name] = problem
                    _SWITCHES[backend](False)
                    break
                kernels[call.kind] = backend.name
            else:
                return SdpaChoice(kernels, disabled)
    except Exception:
        for backend, on in before.items():
            _SWITCHES[backend](on)
        turn_off_cudnn_attention()
        raise


# -- decode graphs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphCheck:
    """Graph replays against the eager step: the comparison's figures and verdict."""

    stage: str
    trials: int  # (batch, variant) runs compared
    steps: int  # decode steps of each run
    keys: tuple[str, ...]  # the graphs replayed: "b{batch}/kv{keys}/{greedy|sampled}"
    tokens_equal: bool
    max_abs_diff: float  # of the logits
    scale: float  # max |logit| of the eager runs
    finite: bool  # every logit of every run finite
    tolerance: float = GRAPH_TOLERANCE

    @property
    def problem(self) -> str | None:
        if not self.finite:
            return f"{self.stage}: non-finite logits in {self.trials} runs of {self.steps} steps"
        if not self.tokens_equal:
            return f"{self.stage}: graph replays chose other tokens than eager decode"
        if not self.max_abs_diff <= self.tolerance * max(1.0, self.scale):
            return (
                f"{self.stage}: graph logits differ from eager by {self.max_abs_diff:.3g} "
                f"(allowed {self.tolerance:g} x {max(1.0, self.scale):.3g})"
            )
        return None

    def as_dict(self) -> dict[str, object]:
        """For JSON (/healthz): a figure that is not finite is None."""
        out: dict[str, object] = {**asdict(self), "keys": list(self.keys)}
        for name in ("max_abs_diff", "scale"):
            if not math.isfinite(getattr(self, name)):
                out[name] = None
        return {**out, "ok": self.problem is None}


def compare(
    stage: str,
    eager: tuple[Tensor, Tensor],
    graphed: tuple[Tensor, Tensor],
    tolerance: float = GRAPH_TOLERANCE,
    keys: tuple[str, ...] = (),
) -> GraphCheck:
    """Compare two trial runs, each (tokens (steps, B), logits (steps, B, V))."""
    (et, el), (gt, gl) = eager, graphed
    finite = bool(torch.isfinite(el).all()) and bool(torch.isfinite(gl).all())
    diff = (el - gl).abs().nan_to_num(nan=float("inf")).max().item() if el.numel() else 0.0
    scale = el.abs().nan_to_num(nan=float("inf")).max().item() if el.numel() else 0.0
    return GraphCheck(
        stage=stage,
        trials=1,
        steps=et.size(0),
        keys=keys,
        tokens_equal=bool(torch.equal(et, gt)),
        max_abs_diff=diff,
        scale=scale,
        finite=finite,
        tolerance=tolerance,
    )


def merge(checks: list[GraphCheck]) -> GraphCheck:
    """One verdict over several runs of the same stage."""
    first = checks[0]
    return GraphCheck(
        stage=first.stage,
        trials=sum(c.trials for c in checks),
        steps=first.steps,
        keys=tuple(k for c in checks for k in c.keys),
        tokens_equal=all(c.tokens_equal for c in checks),
        max_abs_diff=max(c.max_abs_diff for c in checks),
        scale=max(c.scale for c in checks),
        finite=all(c.finite for c in checks),
        tolerance=first.tolerance,
    )


def trial_lengths(rows: int, longest: int) -> list[int]:
    """Prompt lengths of a trial's rows: the first ``longest`` (it picks the kv bucket), the
    others each at their own shorter position."""
    return [longest] + [1 + (37 * i) % longest for i in range(1, rows)]


def check_graphs(stage: DecodeStage, steps: int = GRAPH_CHECK_STEPS) -> GraphCheck:
    """:meth:`DecodeStage.trial` eagerly and from the graphs, compared (see module doc).

    One run per batch bucket and variant (greedy; sampled with top-k and top-p), the runs'
    longest rows placed so that they go through the kv buckets in turn: every batch bucket
    and both variants are checked, and as many kv buckets as there are runs.
    """
    graphs = stage.graphs
    assert graphs is not None
    runs = [(b, v) for b in graphs.batch_sizes for v in (False, True)]
    results = []
    for i, (b, variant) in enumerate(runs):
        k = i % len(graphs.kv_lens)
        lower = graphs.kv_lens[k - 1] if k else 0  # kv_len = longest + 1 .. longest + steps
        longest = max(1, min(lower, graphs.max_len - steps))
        lens = trial_lengths(b, longest)
        eager = stage.trial(lens, steps, graphs=False, variant=variant)
        graphed = stage.trial(lens, steps, graphs=True, variant=variant)
        s = graphs.key(b, longest + 1, variant)[1]
        key = f"b{b}/kv{s}/{'sampled' if variant else 'greedy'}"
        results.append(compare(stage.name, eager, graphed, keys=(key,)))
    return merge(results)
