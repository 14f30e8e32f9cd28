"""CUDA graphs for the decode steps of the semantic and coarse stages.

A decode step advances every busy slot by one token: the model's forward pass, then sampling
(token masks, temperature, top-k/top-p, ``min_eos_p``, the counter-hashed noise), then the
chosen tokens are written where the next step reads its inputs. On a GPU that is launch-bound:
a step of bark-small is a few hundred small kernels, most of them shorter than the few
microseconds it takes Python and the driver to launch one. :class:`StepGraphs` captures the
whole step (a stage's ``step_fn``) once per shape and replays it with one launch; a step is
then one replay plus, every few steps, the token readback.

Shapes. A graph has fixed shapes, so steps are padded up to buckets:

* batch: ``n`` (the highest busy slot + 1) rounds up to a power of two, or to ``slots``
  (``slots=6`` gives buckets 1, 2, 4, 6); or, with ``EngineConfig.cuda_graph_batches =
  "slots"``, always to ``slots`` (one batch bucket: a decode step reads every weight once
  whatever its batch, so on a GPU the smaller buckets may not pay for their capture; the GPU
  check measures both). The stage gives rows ``[n, b)`` token 0 at position 0, as its own
  rows for empty slots; they write K/V at position 0 of their slot, which the
  stage allows for every slot that is not decoding (it is empty, or it is prefilled, rewriting
  position 0, before anything reads it).
* keys: ``kv_len`` rounds up to a multiple of ``kv_step`` (default 128), or to the cache length.
  The decode masks every key after a row's own position, so the extra keys get zero weight.
* variant: whether the step filters with top-k/top-p (two sorts of the vocabulary per row),
  which only steps with a row that asked for it need.

Padding changes no result beyond rounding: the logits of a row equal those of the unpadded call
up to the order in which kernels sum (measured on CPU in float32: 4e-6 at most, the same size as
what ``kv_len = max(pos) + 1`` already does to rows behind the longest one). A replay runs the
kernels of the eager step on the padded shapes, so it equals that step bit for bit: the
engine's self-check at load compares the two (:mod:`.self_check`).

When. Every bucket is captured at load (:meth:`StepGraphs.capture_all`), before the pipeline's
threads exist: a capture synchronizes the device and runs in torch's global capture mode, which
another thread's work would break. Nothing is captured later. A step whose bucket has no graph
(a key that was not captured, or graphs gone stale because the model's cache, attention or
head changed) runs eagerly and is counted in :attr:`StepGraphs.eager_steps`.

Memory. The stage's static buffers (input ids, positions, counters, the logits' copy) are
allocated once, outside the graphs' pool; the KV cache is the model's (``setup_cache``
allocates it once; the decode writes it in place with index writes at device-side positions:
no host sync, no data-dependent shape). Graphs keep their intermediates in one private pool
shared by all of this object's graphs, which is safe in any replay order because nothing in the
pool outlives a replay (results go to the stage's static buffers).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..bark.model import Block, CausalGPT, CausalSelfAttention, KVCache
from ..config import GRAPH_BATCHES

log = logging.getLogger(__name__)

# step_fn(b, s, variant): one decode step over slots [0, b), keys up to s, from and into static
# buffers; variant True also filters with top-k/top-p
StepFn = Callable[[int, int, bool], None]
Key = tuple[int, int, bool]  # (batch bucket, kv bucket, variant)

DEFAULT_KV_STEP = 128
VARIANTS = (False, True)


def batch_buckets(slots: int, batches: str = "powers") -> tuple[int, ...]:
    """Batch sizes that get graphs. ``"powers"``: powers of two below ``slots``, then ``slots``
    (8 -> (1, 2, 4, 8), 6 -> (1, 2, 4, 6)); ``"slots"``: ``slots`` alone (every step runs all
    slots: fewer graphs, for a GPU where a step costs the same at any batch)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if batches not in GRAPH_BATCHES:
        raise ValueError(f"batches must be one of {GRAPH_BATCHES}, got {batches!r}")
    if batches == "slots":
        return (slots,)
    out = []
    b = 1
    while b < slots:
        out.append(b)
        b *= 2
    return (*out, slots)


def kv_buckets(max_len: int, step: int = DEFAULT_KV_STEP) -> tuple[int, ...]:
    """Multiples of ``step`` below ``max_len``, then ``max_len``: (128, 256, ..., 1024)."""
    if step < 1 or max_len < 1:
        raise ValueError(f"step and max_len must be >= 1, got {step} and {max_len}")
    return (*range(step, max_len, step), max_len)


def bucket_for(value: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``value``; ``buckets`` ascending."""
    i = bisect.bisect_left(buckets, value)
    if i == len(buckets):
        raise ValueError(f"{value} is larger than the largest bucket, {buckets[-1]}")
    return buckets[i]


def _first_attention(model: CausalGPT) -> CausalSelfAttention:
    block = model.layers[0]
    assert isinstance(block, Block)
    return block.attn


def on_gpu(device: torch.device | str) -> bool:
    """Whether the engine on ``device`` uses decode graphs and runs the GPU checks at load."""
    return torch.device(device).type == "cuda"


class StepGraphs:
    """A stage's decode step replayed from CUDA graphs, one per (batch, kv, variant) bucket.

    ``step_fn(b, s, variant)`` must read and write only static buffers (and the model's cache),
    so that a replay does what the call did. The caller pads rows ``[n, b)`` before
    :meth:`replay` (see the module docstring) and calls ``step_fn`` itself when :meth:`lookup`
    finds no graph.

    ``capture=False`` keeps the bookkeeping (buckets, which keys are "captured", staleness) and
    replays by calling ``step_fn`` on the bucket's shapes: the padded step without graphs, for
    machines without CUDA and to tell a capture problem from a padding one. By default it
    captures where the model is on CUDA. ``warmup`` eager runs on the capture stream precede
    each capture, as torch requires (cuBLAS handles and workspaces must not be created during a
    capture).
    """

    def __init__(
        self,
        model: CausalGPT,
        step_fn: StepFn,
        *,
        batches: str = "powers",
        kv_step: int = DEFAULT_KV_STEP,
        capture: bool | None = None,
        warmup: int = 2,
    ) -> None:
        self.model = model
        self.step_fn = step_fn
        self.device = model.lm_head.weight.device
        self.captures = self.device.type == "cuda" if capture is None else capture
        if self.captures and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, not one on {self.device}")
        self.warmup = warmup
        attn = _first_attention(model)
        if attn.cache is None:
            raise ValueError("call model.setup_cache(slots) before building StepGraphs")
        # what the graphs were captured against: a new cache, attention or head makes them stale
        self._cache: KVCache = attn.cache
        self._impl = attn.impl
        self._head_start = model.head_start
        self.slots = model.slots
        self.max_len = self._cache.k.size(2)
        self.batch_sizes = batch_buckets(self.slots, batches)
        self.kv_lens = kv_buckets(self.max_len, kv_step)
        self.graphs: dict[Key, torch.cuda.CUDAGraph | None] = {}  # None: capture=False
        self.pool = torch.cuda.graph_pool_handle() if self.captures else None
        self.stream = torch.cuda.Stream(self.device) if self.captures else None
        self.capture_s = 0.0  # seconds capture_all took
        self.eager_steps = 0  # steps that found no graph and ran eagerly
        self._stale_warned = False

    def current(self) -> bool:
        """Whether the graphs still match the model (same cache, attention and head)."""
        attn = _first_attention(self.model)
        return (
            attn.cache is self._cache
            and attn.impl == self._impl
            and self.model.head_start == self._head_start
        )

    def key(self, n: int, kv_len: int, variant: bool) -> Key:
        return bucket_for(n, self.batch_sizes), bucket_for(kv_len, self.kv_lens), variant

    def lookup(self, n: int, kv_len: int, variant: bool) -> Key | None:
        """The captured bucket for this step, or None: the caller runs ``step_fn(n, kv_len,
        variant)`` eagerly (counted here). Never captures."""
        key = self.key(n, kv_len, variant)
        if key in self.graphs and self.current():
            return key
        if not self.current() and not self._stale_warned:
            self._stale_warned = True
            log.warning("the model's cache or attention changed after capture: decode runs eagerly")
        self.eager_steps += 1
        return None

    def replay(self, key: Key) -> None:
        graph = self.graphs[key]
        if graph is None:
            self.step_fn(*key)
        else:
            graph.replay()

    def capture_all(self, prepare: Callable[[], None], variants: Sequence[bool] = VARIANTS) -> None:
        """Capture every bucket of ``variants`` now, largest first (see :meth:`capture`)."""
        keys = [
            (b, s, variant)
            for variant in variants
            for b in reversed(self.batch_sizes)
            for s in reversed(self.kv_lens)
        ]
        self.capture(keys, prepare)

    def capture(self, keys: Iterable[Key], prepare: Callable[[], None]) -> None:
        """Capture the steps ``keys`` (those not captured yet); add the time it took.

        ``prepare()`` runs before each capture and must put the static inputs in a state every
        key can run from (e.g. all rows at position 0): the warm-up runs write the cache and
        the buffers. Call it only while no slot holds a request, and before any other thread
        uses the device. A key need not be a bucket (benchmarks time exact batches): only
        buckets are ever looked up.

        On CUDA each variant's step first runs once with torch's sync debug mode set to
        error: a host sync in the step (which a capture cannot hold) raises here, before any
        capture begins, rather than inside one (a capture that fails midway can leave the
        allocator in a state the process does not recover from). The device is synchronized
        and the allocator's cache emptied once, not before every capture.
        """
        keys = [k for k in keys if k not in self.graphs]
        start = time.perf_counter()
        with torch.inference_mode():
            if self.captures and keys:
                self._no_host_sync({k[2] for k in keys}, prepare)
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            for key in keys:
                prepare()
                self.graphs[key] = self._capture(*key)
        if self.captures:
            torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - start

    def _no_host_sync(self, variants: set[bool], prepare: Callable[[], None]) -> None:
        """Run the step once per variant with host syncs turned into errors."""
        torch.cuda.synchronize(self.device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for variant in sorted(variants):
                prepare()
                self.step_fn(self.batch_sizes[-1], self.kv_lens[0], variant)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def _capture(self, b: int, s: int, variant: bool) -> torch.cuda.CUDAGraph | None:
        if not self.captures:
            return None
        assert self.stream is not None
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(self.stream):
                for _ in range(self.warmup):
                    self.step_fn(b, s, variant)
                # torch.cuda.graph's capture without its per-capture sync, gc and cache flush
                graph.capture_begin(pool=self.pool)
                try:
                    self.step_fn(b, s, variant)
                finally:
                    graph.capture_end()
            current.wait_stream(self.stream)
        return graph

    @property
    def live(self) -> bool:
        """Whether steps replay graphs: some are captured and they match the model."""
        return bool(self.graphs) and self.current()


def to_device(values: Any, device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """A host list as a tensor on ``device``, without a host sync.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory and then waits until
    the stream's queued work, the copy included, is done (``cudaStreamSynchronize``): the host
    stops running ahead of the device, at every call. Here the values go through pinned memory
    with a non-blocking copy, ordered on the current stream (torch keeps the pinned block until
    the copy is done). On other devices this is ``torch.tensor(values, dtype=dtype)``, moved.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_from_host(dst: Tensor, values: Any) -> None:
    """Write a host list into ``dst`` (its shape), as :func:`to_device` does: no host sync,
    and on CUDA straight from pinned memory into ``dst``."""
    host = torch.tensor(values, dtype=dst.dtype)
    if dst.device.type == "cuda":
        host = host.pin_memory()
    dst.copy_(host, non_blocking=dst.device.type == "cuda")
