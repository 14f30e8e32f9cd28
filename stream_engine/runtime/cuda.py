"""CUDA graphs for the decode step of the semantic and coarse models.

A decode step advances every slot in ``[0, n)`` by one token. On a GPU it is launch-bound: a
step of bark-small is some 200 small kernels (embeddings, 12 blocks of norms, projections,
cache writes and attention, then the head), most of them shorter than the few microseconds it
takes Python and the driver to launch one. :class:`DecodeGraphs` captures :meth:`CausalGPT.decode` once per shape
and replays it with one launch.

Shapes. A graph has fixed shapes, so calls are padded up to buckets:

* batch: ``n`` (the highest busy slot + 1) rounds up to a power of two, or to ``slots``
  (``slots=6`` gives buckets 1, 2, 4, 6). Rows ``[n, b)`` are padding: token 0 at position 0,
  as the stage's own rows for empty slots. Like those, they write K/V at position 0 of their
  slot, which the stage allows for every slot that is not decoding (it is empty, or it is
  prefilled, rewriting position 0, before anything reads it).
* keys: ``kv_len`` rounds up to a multiple of ``kv_step`` (default 128), or to the cache length.
  ``decode`` masks every key after a row's own position, so the extra keys get zero weight.

Padding changes no result beyond rounding: the logits of a row equal those of the unpadded call
up to the order in which kernels sum (measured on CPU in float32: 4e-6 at most, the same size as
what the stage's own ``kv_len = max(pos) + 1`` already does to rows behind the longest one). A
replay runs the kernels of the eager call on the padded shapes, so it equals that call bit for
bit (tests/gpu/test_cuda.py checks both on a GPU).

What is captured: the embeddings, every block (the 2 * n_layer in-place cache writes included),
the final norm, the head, and a cast of the logits to float32 into a static output. What is not:
sampling (its options are decided on the host: which rows use top-k or top-p, the coarse
codebook of each row), prefill (prompt lengths vary) and the fine model and codec.

Memory. ``ids``, ``pos`` and ``out`` are allocated once, outside the graphs' pool; the KV cache
is the model's (``setup_cache`` allocates it once; ``decode`` writes it in place with index
writes at device-side positions: no host sync, no data-dependent shape). Graphs keep their
intermediates in one private pool shared by all of this object's graphs; that is safe in any
replay order because nothing in the pool outlives a replay (results go to ``out``).

Capture happens on first use of a bucket (lazily) or for every bucket in :meth:`capture_all`.
It synchronizes the device and empties the allocator's cache (``torch.cuda.graph`` does), so
a lazy capture is a one-off stall of some milliseconds per bucket. If the model's cache is
reallocated (``setup_cache``) or its attention implementation changes, the graphs are dropped
and captured again on use.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor

from ..bark.model import Block, CausalGPT, CausalSelfAttention, KVCache

Decoder: TypeAlias = Callable[[Tensor, Tensor, int], Tensor]  # (ids, pos, kv_len) -> logits

DEFAULT_KV_STEP = 128


def batch_buckets(slots: int) -> tuple[int, ...]:
    """Powers of two below ``slots``, then ``slots``: 8 -> (1, 2, 4, 8), 6 -> (1, 2, 4, 6)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
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


class DecodeGraphs:
    """:meth:`CausalGPT.decode` replayed from CUDA graphs, one per (batch, kv) bucket.

    ``graphs(ids, pos, kv_len)`` has ``model.decode``'s contract: ``ids`` and ``pos`` (n,) on
    the model's device for slots ``[0, n)``, keys up to ``kv_len`` (> max(pos)) read; returns
    logits (n, ``model.decode_vocab``). Differences: the logits are float32 whatever the
    model's dtype, and they are a view of a static buffer, valid until the next call (read
    them, or clone them, before calling again; never write to them).

    ``capture=False`` runs the same padded step on the same static buffers eagerly, without
    graphs (for tests on machines without CUDA, and to tell a capture problem from a padding
    one). ``warmup`` eager runs on the capture stream precede each capture, as torch requires
    (lazy initialisation of cuBLAS handles and workspaces must not happen during a capture).
    """

    def __init__(
        self,
        model: CausalGPT,
        *,
        kv_step: int = DEFAULT_KV_STEP,
        capture: bool = True,
        warmup: int = 2,
    ) -> None:
        self.model = model
        self.kv_step = kv_step
        self.capture = capture
        self.warmup = warmup
        self._decode: Decoder = model.decode  # bound now: callers may replace model.decode
        self.device = model.lm_head.weight.device
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, not one on {self.device}")
        self.stream = torch.cuda.Stream(self.device) if capture else None
        self._setup()

    def _setup(self) -> None:
        """(Re)build buffers and buckets for the model's current cache; drop every graph."""
        attn = _first_attention(self.model)
        if attn.cache is None:
            raise ValueError("call model.setup_cache(slots) before building DecodeGraphs")
        self._cache: KVCache = attn.cache
        self._impl = attn.impl
        self._head_start = self.model.head_start
        self.slots = self.model.slots
        self.max_len = self._cache.k.size(2)
        self.batch_sizes = batch_buckets(self.slots)
        self.kv_lens = kv_buckets(self.max_len, self.kv_step)
        V = self.model.decode_vocab
        dev = self.device
        self.ids = torch.zeros(self.slots, dtype=torch.long, device=dev)  # (S,)
        self.pos = torch.zeros(self.slots, dtype=torch.long, device=dev)  # (S,)
        self.out = torch.zeros(self.slots, V, dtype=torch.float32, device=dev)  # (S, V)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # a fresh pool: the old graphs (and the memory they hold) go with their dict
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def _current(self) -> bool:
        attn = _first_attention(self.model)
        return (
            attn.cache is self._cache
            and attn.impl == self._impl
            and self.model.head_start == self._head_start
        )

    def __call__(self, ids: Tensor, pos: Tensor, kv_len: int) -> Tensor:
        if not self._current():
            self._setup()
        n = ids.size(0)
        b = bucket_for(n, self.batch_sizes)
        s = bucket_for(kv_len, self.kv_lens)
        with torch.inference_mode():
            self.ids[:n].copy_(ids)
            self.pos[:n].copy_(pos)
            if n < b:  # padding rows: token 0 at position 0
                self.ids[n:b].zero_()
                self.pos[n:b].zero_()
            if not self.capture:
                self._step(b, s)
            else:
                graph = self.graphs.get((b, s))
                if graph is None:
                    graph = self._capture(b, s)  # its warm-up runs already did this step
                graph.replay()
        return self.out[:n]

    def _step(self, b: int, s: int) -> None:
        logits = self._decode(self.ids[:b], self.pos[:b], s)  # (b, V)
        self.out[:b].copy_(logits)

    def _capture(self, b: int, s: int) -> torch.cuda.CUDAGraph:
        """Warm up on the capture stream, then capture the (b, s) step into the shared pool.

        Runs the step on whatever ``ids``/``pos`` hold: the warm-up runs write the cache
        exactly as the replay after them does (same inputs, same values).
        """
        assert self.stream is not None
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                for _ in range(self.warmup):
                    self._step(b, s)
            current.wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                self._step(b, s)
        self.graphs[(b, s)] = graph
        return graph

    def capture_all(self) -> None:
        """Capture every bucket now, largest first.

        Writes position 0 of every slot (the warm-up runs decode dummy rows): call it only
        while no slot holds a request, e.g. right after ``setup_cache``.
        """
        if not self._current():
            self._setup()
        if not self.capture:
            return
        with torch.inference_mode():
            self.ids.zero_()
            self.pos.zero_()
            for b in reversed(self.batch_sizes):
                for s in reversed(self.kv_lens):
                    if (b, s) not in self.graphs:
                        self._capture(b, s)


def make_decoder(
    model: CausalGPT,
    slots: int,
    device: torch.device | str,
    enabled: bool = True,
    *,
    kv_step: int = DEFAULT_KV_STEP,
    capture_now: bool = False,
) -> Decoder:
    """The decode function a stage should call: ``model.decode`` itself, or its graphs.

    Graphs only when ``enabled`` and ``device`` is CUDA; everywhere else ``model.decode`` is
    returned unchanged. ``model.setup_cache(slots)`` must have run. ``capture_now`` captures
    every bucket at once (see :meth:`DecodeGraphs.capture_all`: no slot may be in use).
    """
    if not enabled or torch.device(device).type != "cuda":
        return model.decode
    if model.slots != slots:
        raise ValueError(f"the model's cache has {model.slots} slots, not {slots}")
    graphs = DecodeGraphs(model, kv_step=kv_step)
    if capture_now:
        graphs.capture_all()
    return graphs


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
