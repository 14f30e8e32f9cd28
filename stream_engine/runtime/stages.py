"""The four stages of Bark, each advancing a batch of requests by one step at a time.

A stage owns a fixed number of *slots* and the buffers for them, allocated once. ``admit``
puts a request into a free slot, ``step`` advances every admitted request by one unit of work
and returns the requests that left the stage, ``remove`` takes one out (cancellation). Requests
join and leave only between steps, and rows never influence each other: a request's tokens are
the same whatever else shares its batch.

Units of work: the semantic stage makes one token per request per step; the coarse stage one
token (a window's first token comes from its prefill); the fine stage runs one codebook of one
1024-frame window; the codec decodes one request's audio.

Host syncs: positions and window bookkeeping are known on the host without reading the device.
Tokens are read back only when the host needs them: the semantic stage every ``sync_every``
steps or when a request reaches its cap (a request whose EOS is seen late decoded a few tokens
it will discard), the coarse stage at the end of each window (the next window's prompt is built
from them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..bark import prompts
from ..bark.model import CausalGPT, FineGPT
from ..bark.prompts import BarkConstants
from ..bark.sampling import RowParams, apply_min_eos_p, choose, choose_fine
from .cuda import Key, StepGraphs, copy_from_host, to_device
from .request import MAX_PREVIEWS, Request, Status

NEVER = float("inf")  # a min_eos_p that never fires


@dataclass
class _Row:
    """Host-side state of one slot."""

    req: Request
    pos: int = 0  # position of the next input token in the slot's cache
    generated: int = 0  # tokens produced so far (read back or not)
    prefill: bool = True  # the next step prefills this row instead of decoding it
    done: bool = False  # left the stage (EOS seen or cap reached)
    # coarse only
    semantic: list[int] = field(default_factory=list)  # voice history + semantic tokens
    base: int = 0  # length of the voice's semantic history
    coarse: list[int] = field(default_factory=list)  # history + generated coarse tokens
    hist_len: int = 0  # length of the coarse history
    total: int = 0  # coarse tokens to generate
    window_left: int = 0  # tokens left in the current window
    in_window: int = 0  # tokens made in the current window (its parity picks the codebook)


class _Slots:
    """Fixed slots with the lowest free one taken first (keeps decode batches dense)."""

    def __init__(self, n: int) -> None:
        self.rows: list[_Row | None] = [None] * n

    @property
    def free(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def active(self) -> int:
        return len(self.rows) - self.free

    def take(self, row: _Row) -> int:
        i = self.rows.index(None)
        self.rows[i] = row
        return i

    def find(self, req: Request) -> int | None:
        for i, r in enumerate(self.rows):
            if r is not None and r.req is req:
                return i
        return None

    def release(self, i: int) -> None:
        self.rows[i] = None

    def items(self) -> list[tuple[int, _Row]]:
        return [(i, r) for i, r in enumerate(self.rows) if r is not None]


class _Params:
    """Per-slot sampling options on the device, written when a request is admitted."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.p = RowParams.build([1.0] * n, [0] * n, [1.0] * n, [True] * n, [0] * n, device)
        self.min_eos_p = torch.full((n,), NEVER, device=device)
        self.device = device

    def set(self, i: int, temp: float, req: Request, min_eos_p: float | None = None) -> None:
        o = req.options
        self.p.temperature[i] = temp
        self.p.top_k[i] = o.top_k or 0
        self.p.top_p[i] = o.top_p if o.top_p is not None else 1.0
        self.p.greedy[i] = o.greedy
        self.p.seed[i] = int(o.seed or 0)
        self.min_eos_p[i] = NEVER if min_eos_p is None else min_eos_p

    def rows(self, idx: Tensor | slice) -> RowParams:
        p = self.p
        return RowParams(p.temperature[idx], p.top_k[idx], p.top_p[idx], p.greedy[idx], p.seed[idx])


def _due(req: Request) -> float:
    """``req.due`` where the runtime has set it (see Runtime.due), else its arrival."""
    return req.submitted_at if req.due is None else req.due


class Stage:
    """Common interface; see the module docstring."""

    name = "stage"
    # whether the last step ran whole-window work (a prefill, a fine pass, an EnCodec decode:
    # compute bound, so it costs about the sum of its requests) rather than decode steps only
    window = False

    def __init__(self, slots: int) -> None:
        self.slots = _Slots(slots)

    @property
    def free(self) -> int:
        return self.slots.free

    @property
    def active(self) -> int:
        return self.slots.active

    def admit(self, req: Request) -> None:
        raise NotImplementedError

    def step(self) -> list[Request]:
        raise NotImplementedError

    def remove(self, req: Request) -> bool:
        i = self.slots.find(req)
        if i is None:
            return False
        self.slots.release(i)
        return True


class DecodeStage(Stage):
    """A stage that generates tokens one step at a time: the semantic and the coarse stages.

    One step prefills the rows that start (their prompts, eagerly: lengths vary) and decodes
    every other live row by one token in one pass. The decode step (:meth:`step_fn`) is the
    model's forward pass *and* the choice of the next token, reading and writing static
    buffers only, so that on CUDA it is captured whole (:class:`~.cuda.StepGraphs`):

    * ``ids`` (S,): each slot's next input token; a step overwrites it with the token it chose;
    * ``meta`` (3, S): each slot's position, sampling counter (the row's tokens so far) and the
      stage's per-row value for :meth:`mask` (the coarse codebook), written by the host once
      per step in one copy;
    * ``logits`` (S, V): with graphs, the step's logits in float32, for the self-check: those
      the model computes (from ``head_start``, see ``CausalGPT.restrict_head``); the others
      stay 0.

    Tokens are read back only when the host needs them (:meth:`sync_due`); until then they wait
    on the device in ``_pending``. Subclasses provide the prompts (:meth:`prompts`), the token
    masks (:meth:`mask`), what a token means to a row (:meth:`take`) and what leaving means
    (:meth:`leave`).
    """

    def __init__(
        self,
        model: CausalGPT,
        consts: BarkConstants,
        slots: int,
        sync_every: int = 1,
        cuda_graphs: bool = False,
        graph_batches: str = "powers",
    ) -> None:
        super().__init__(slots)
        self.model, self.c, self.sync_every = model, consts, sync_every
        dev = model.lm_head.weight.device
        self.device = dev
        self.setup()
        model.setup_cache(slots)
        V = model.cfg.output_vocab_size
        self.ids = torch.zeros(slots, dtype=torch.long, device=dev)  # (S,)
        self.meta = torch.zeros(3, slots, dtype=torch.long, device=dev)  # (3, S)
        self.logits = torch.zeros(slots, V, dtype=torch.float32, device=dev)  # (S, V)
        self.params = _Params(slots, dev)
        self._pending: list[tuple[Tensor, list[_Row | None]]] = []
        self._since_sync = 0
        # CUDA graphs of step_fn, captured by capture_graphs (Engine.load); None: always eager
        self.graphs: StepGraphs | None = None
        if cuda_graphs:
            self.graphs = StepGraphs(model, self.step_fn, batches=graph_batches)

    # -- hooks ----------------------------------------------------------------------------

    def setup(self) -> None:
        """The stage's own setup of its model and constants, before the cache and graphs."""

    def prompts(self, rows: list[tuple[int, _Row]]) -> tuple[Tensor, Tensor]:
        """Embedded prompts (B, T, C) of rows that start, and each one's last index (B,).

        Sets each row's ``pos`` (its next position) and whatever else the stage tracks."""
        raise NotImplementedError

    def mask(self, logits: Tensor, aux: Tensor, rows: Tensor | slice) -> Tensor:
        """Scores (B, V) from float32 logits (B, V): the stage's token masks. ``aux`` (B,) is
        :meth:`aux` of each row, ``rows`` their slots. Must be capturable: no host sync."""
        raise NotImplementedError

    def aux(self, r: _Row) -> int:
        """The per-row value :meth:`mask` reads (0 unless the stage needs one)."""
        return 0

    def advance(self, r: _Row) -> None:
        """Bookkeeping after a live row got its token of this step (read back or not)."""

    def sync_due(self, live: list[tuple[int, _Row]]) -> bool:
        raise NotImplementedError

    def take(self, r: _Row, tok: int) -> None:
        """A token of ``r``, read back; may mark the row done."""
        raise NotImplementedError

    def after_sync(self) -> list[Request]:
        """After a readback: requests the stage emits besides finished ones (previews)."""
        return []

    def leave(self, r: _Row) -> None:
        """``r`` is done: put what the stage made into its request."""

    # -- the step -------------------------------------------------------------------------

    def step_fn(self, b: int, s: int, variant: bool) -> None:
        """One decode step of slots ``[0, b)``, keys up to ``s``: static buffers in and out."""
        pos, counter, aux = self.meta[0, :b], self.meta[1, :b], self.meta[2, :b]
        part = self.model.decode(self.ids[:b], pos, s).float()  # (b, V - head_start)
        if self.graphs is not None:  # the self-check compares them; serving needs no copy
            self.logits[:b, self.model.head_start :].copy_(part)
        logits = self._widen(part)  # (b, V)
        rows = slice(0, b)
        p = self.params.rows(rows)
        tok = choose(self.mask(logits, aux, rows), p, counter, use_top_k=variant, use_top_p=variant)
        self.ids[:b].copy_(tok)

    def _widen(self, part: Tensor) -> Tensor:
        """Decode logits back to full width (ids below the head's start can never be picked), so
        that sampling sees the same scores and noise indices as with the whole head."""
        start = self.model.head_start
        if start == 0:
            return part
        logits = part.new_full((part.size(0), self.model.cfg.output_vocab_size), float("-inf"))
        logits[:, start:] = part
        return logits

    @staticmethod
    def _filtered(rows: list[_Row]) -> bool:
        return any(r.req.options.top_k or r.req.options.top_p for r in rows)

    def admit(self, req: Request) -> None:
        i = self.slots.take(self.row(req))
        self.model.clear_slot(i)

    def row(self, req: Request) -> _Row:
        raise NotImplementedError

    def step(self) -> list[Request]:
        live = [(i, r) for i, r in self.slots.items() if not r.done]
        decoding = [(i, r) for i, r in live if not r.prefill]
        if decoding:
            self._decode(decoding)
        starting = [(i, r) for i, r in live if r.prefill]
        self.window = bool(starting)
        if starting:
            self._prefill(starting)
        for _, r in live:
            r.generated += 1
            self.advance(r)
            r.req.mark(self.name)
        self._since_sync += 1
        if self.sync_due(live):
            return self._sync()
        return self._release_done()

    def _prefill(self, rows: list[tuple[int, _Row]]) -> None:
        x, last = self.prompts(rows)  # (B, T, C), (B,)
        # slot, counter and aux of each row, in one copy
        meta = [
            [i for i, _ in rows],
            [r.generated for _, r in rows],
            [self.aux(r) for _, r in rows],
        ]
        slots, counter, aux = to_device(meta, self.device)
        logits = self.model.prefill(x, slots, last).float()  # (B, V)
        p = self.params.rows(slots)
        filtered = self._filtered([r for _, r in rows])
        scores = self.mask(logits, aux, slots)
        tok = choose(scores, p, counter, use_top_k=filtered, use_top_p=filtered)
        self.ids[slots] = tok
        for _, r in rows:
            r.prefill = False
        self._pending.append((tok, [r for _, r in rows]))

    def _decode(self, rows: list[tuple[int, _Row]]) -> None:
        n = max(i for i, _ in rows) + 1
        # empty and prefilling slots decode a dummy token at position 0
        meta = [[0] * n, [0] * n, [0] * n]
        owners: list[_Row | None] = [None] * n
        for i, r in rows:
            meta[0][i], meta[1][i], meta[2][i], owners[i] = r.pos, r.generated, self.aux(r), r
        kv_len = max(meta[0]) + 1
        variant = self._filtered([r for _, r in rows])
        key = self.graphs.lookup(n, kv_len, variant) if self.graphs is not None else None
        if key is None:
            copy_from_host(self.meta[:, :n], meta)
            self.step_fn(n, kv_len, variant)
        else:
            b = key[0]
            pad = [0] * (b - n)  # rows [n, b): token 0 at position 0
            copy_from_host(self.meta[:, :b], [m + pad for m in meta])
            self.ids[n:b].zero_()
            assert self.graphs is not None
            self.graphs.replay(key)
        for _, r in rows:
            r.pos += 1
        self._pending.append((self.ids[:n].clone(), owners))

    def _sync(self) -> list[Request]:
        """Read back pending tokens, give each to its row; free finished slots."""
        self._since_sync = 0
        if self._pending:
            flat = torch.cat([t for t, _ in self._pending]).tolist()
            k = 0
            for _, owners in self._pending:
                for r in owners:
                    if r is not None and not r.done:
                        self.take(r, flat[k])
                    k += 1
            self._pending.clear()
        extra = self.after_sync()
        return self._release_done() + extra

    def _release_done(self) -> list[Request]:
        out = []
        for i, r in self.slots.items():
            if r.done:  # rows become done at a sync (pending read) or at admission
                self.slots.release(i)
                self.leave(r)
                out.append(r.req)
        return out

    def remove(self, req: Request) -> bool:
        i = self.slots.find(req)
        if i is None:
            return False
        row = self.slots.rows[i]
        assert row is not None
        row.done = True  # its pending tokens are skipped at the next sync
        self.slots.release(i)
        return True

    # -- load time ------------------------------------------------------------------------

    def capture_graphs(self, keys: Iterable[Key] | None = None) -> None:
        """Capture every decode bucket, or the steps ``keys`` (CUDA). Only while no slot holds
        a request."""
        if self.graphs is None:
            return
        assert self.active == 0, "capture only while the stage is empty"

        def prepare() -> None:  # every row a dummy at position 0, as padding rows are
            self.ids.zero_()
            self.meta.zero_()

        if keys is None:
            self.graphs.capture_all(prepare)
        else:
            self.graphs.capture(keys, prepare)
        prepare()

    @torch.inference_mode()
    def trial(
        self, lens: list[int], steps: int, graphs: bool, variant: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Decode fixed prompts for the self-check: ``steps`` steps of slots ``[0, len(lens))``.

        Slot ``i`` is prefilled with ``lens[i]`` fixed tokens, then those slots decode together
        from there, eagerly on the buckets' padded shapes (``graphs=False``) or by replaying
        the captured graphs (``graphs=True``): greedy, or with ``variant`` sampled with fixed
        seeds, temperature, top-k and top-p (the noise is a function of seed and step, so both
        ways draw the same). Returns the chosen tokens (steps, B) and the logits (steps, B, V).
        Only while the stage is empty; leaves the slots cleared and the options as they were.
        """
        assert self.active == 0, "trial only while the stage is empty"
        assert self.graphs is not None
        B, dev = len(lens), self.device
        g = torch.Generator().manual_seed(0)
        vocab = min(self.model.cfg.input_vocab_size, self.c.semantic_vocab_size)
        ids = torch.randint(0, vocab, (B, max(lens)), generator=g).to(dev)
        p = self.params.p
        saved = [t.clone() for t in (p.temperature, p.top_k, p.top_p, p.greedy, p.seed)]
        if variant:
            p.greedy[:B], p.temperature[:B], p.top_k[:B], p.top_p[:B] = False, 0.8, 50, 0.9
            p.seed[:B] = torch.arange(B, device=dev) + 7
        else:
            p.greedy[:B] = True
        try:
            for i in range(B):
                self.model.clear_slot(i)
            last = torch.tensor(lens, device=dev) - 1
            self.model.prefill(self.model.embed(ids), torch.arange(B, device=dev), last)
            self.ids[:B] = ids.gather(1, last[:, None])[:, 0]
            pos = list(lens)
            tokens, logits = [], []
            for k in range(steps):
                key = self.graphs.key(B, max(pos) + 1, variant)
                pad = [0] * (key[0] - B)
                copy_from_host(self.meta[:, : key[0]], [pos + pad, [k + 1] * B + pad, [0] * key[0]])
                self.ids[B : key[0]] = 0
                if graphs:
                    self.graphs.replay(key)
                else:
                    self.step_fn(*key)
                tokens.append(self.ids[:B].clone())
                logits.append(self.logits[:B].clone())
                pos = [n + 1 for n in pos]
            return torch.stack(tokens), torch.stack(logits)
        finally:
            for t, old in zip(
                (p.temperature, p.top_k, p.top_p, p.greedy, p.seed), saved, strict=True
            ):
                t.copy_(old)
            for i in range(B):
                self.model.clear_slot(i)
            self.ids.zero_()
            self.meta.zero_()


class SemanticStage(DecodeStage):
    """Text (+ voice) -> semantic tokens, until EOS or the request's cap."""

    name = "semantic"

    def setup(self) -> None:
        c, V = self.c, self.model.cfg.output_vocab_size
        # Bark suppresses every id above EOS: (semantic_vocab, pad) and (pad, V)
        keep = torch.zeros(V, dtype=torch.bool, device=self.device)
        keep[: c.semantic_vocab_size] = True
        keep[c.semantic_pad_token] = True
        self.suppress = ~keep
        self.prompt_len = c.max_input_semantic_length + 1

    def row(self, req: Request) -> _Row:
        return _Row(req)

    def admit(self, req: Request) -> None:
        super().admit(req)
        i = self.slots.find(req)
        assert i is not None
        o = req.options
        self.params.set(i, o.text_temp, req, o.min_eos_p)
        req.status = Status.RUNNING

    def mask(self, logits: Tensor, aux: Tensor, rows: Tensor | slice) -> Tensor:
        scores = logits.masked_fill(self.suppress, float("-inf"))
        return apply_min_eos_p(scores, self.c.semantic_pad_token, self.params.min_eos_p[rows])

    def prompts(self, rows: list[tuple[int, _Row]]) -> tuple[Tensor, Tensor]:
        c, dev = self.c, self.device
        text, hist = [], []
        for _, r in rows:
            t, h = prompts.semantic_prompt(r.req.text_ids, r.req.voice, c)
            text.append(t)
            hist.append(h)
            r.pos = self.prompt_len
        emb = self.model.embed
        ids = to_device([text, hist], dev)  # (2, B, 256)
        infer = torch.full((len(rows), 1), c.semantic_infer_token, device=dev)
        x = torch.cat([emb(ids[0]) + emb(ids[1]), emb(infer)], dim=1)  # (B, 257, C)
        last = torch.full((len(rows),), self.prompt_len - 1, device=dev)
        return x, last

    def sync_due(self, live: list[tuple[int, _Row]]) -> bool:
        at_cap = any(r.generated >= r.req.max_semantic_tokens for _, r in live)
        return at_cap or self._since_sync >= self.sync_every

    def take(self, r: _Row, tok: int) -> None:
        if tok == self.c.semantic_pad_token:
            r.done = True  # EOS: not part of the output
            return
        r.req.semantic.append(tok)
        if len(r.req.semantic) >= r.req.max_semantic_tokens:
            r.done = True


class CoarseStage(DecodeStage):
    """Semantic tokens -> the first two codebooks, in Bark's sliding windows."""

    name = "coarse"

    def setup(self) -> None:
        # no coarse id is below the first codebook's: decode steps skip those logits
        self.model.restrict_head(self.c.semantic_vocab_size)
        self.vocab = torch.arange(self.model.cfg.output_vocab_size, device=self.device)

    def row(self, req: Request) -> _Row:
        c = self.c
        sem_hist, coarse_hist = prompts.coarse_histories(req.voice, c)
        return _Row(
            req,
            semantic=sem_hist + list(req.semantic),
            base=len(sem_hist),
            coarse=list(coarse_hist),
            hist_len=len(coarse_hist),
            total=prompts.coarse_length(len(req.semantic), c),
        )

    def admit(self, req: Request) -> None:
        super().admit(req)
        i = self.slots.find(req)
        assert i is not None
        row = self.slots.rows[i]
        assert row is not None
        self.params.set(i, req.options.coarse_temp, req)
        req.status = Status.RUNNING
        if row.total == 0:
            row.done = True

    def aux(self, r: _Row) -> int:
        return r.in_window % 2  # the codebook of the row's next token

    def mask(self, logits: Tensor, aux: Tensor, rows: Tensor | slice) -> Tensor:
        """Bark's alternating codebooks, as transformers' ``AlternatingCodebooksLogitsProcessor``.

        ``aux`` is each row's codebook. The first codebook may use ids [10000, 11024); the
        second only loses ids below 11024, so ids from 12048 up stay allowed (original Bark cut
        them too). Trained weights never pick them; random ones do, and we follow the reference
        token for token. Such an id maps back into [0, 1024) by the remainder the fine stage
        takes.
        """
        c = self.c
        cb = aux[:, None]
        lo = c.semantic_vocab_size + cb * c.codebook_size
        hi = torch.where(cb == 0, lo + c.codebook_size, self.vocab.numel())
        allowed = (self.vocab[None] >= lo) & (self.vocab[None] < hi)
        return logits.masked_fill(~allowed, float("-inf"))

    def prompts(self, rows: list[tuple[int, _Row]]) -> tuple[Tensor, Tensor]:
        c, dev = self.c, self.device
        seqs = []
        for _, r in rows:
            generated = len(r.coarse) - r.hist_len
            seqs.append(prompts.coarse_window_prompt(r.semantic, r.base, r.coarse, generated, c))
            r.window_left = min(c.sliding_window_len, r.total - generated)
            r.in_window = 0
            r.pos = len(seqs[-1])
        T = max(len(s) for s in seqs)
        ids = to_device([s + [0] * (T - len(s)) for s in seqs], dev)  # right-padded
        last = to_device([len(s) - 1 for s in seqs], dev)
        return self.model.embed(ids), last

    def advance(self, r: _Row) -> None:
        r.window_left -= 1
        r.in_window += 1

    def sync_due(self, live: list[tuple[int, _Row]]) -> bool:
        # the next window's prompt is built from the tokens: read them at every window's end
        return any(r.window_left == 0 for _, r in live)

    def take(self, r: _Row, tok: int) -> None:
        r.coarse.append(tok)

    def after_sync(self) -> list[Request]:
        previews = []
        for _, r in self.slots.items():
            if r.window_left == 0 and not r.done:
                if len(r.coarse) - r.hist_len >= r.total:
                    r.done = True
                else:
                    r.prefill = True  # next window
                    previews += self._preview(r)
        return previews

    def _preview(self, r: _Row) -> list[Request]:
        """A preview of ``r``'s segment, if it asked for previews and one is due."""
        req = r.req
        generated = len(r.coarse) - r.hist_len
        if r.total - generated < self.c.sliding_window_len:
            return []  # less than a window left: the segment itself comes soon enough
        frames = generated // self.c.n_coarse_codebooks
        # the first at the first window's end (the listener is waiting), then every N frames
        due = req.preview_frames > 0 and (
            req.previews == 0 or frames - req.previewed_frames >= req.preview_frames
        )
        if not due or req.previews >= MAX_PREVIEWS:
            return []
        return [req.preview(self._codes(r))]

    def _codes(self, r: _Row) -> np.ndarray:
        """The row's generated coarse tokens as EnCodec codes (2, T)."""
        gen = np.asarray(r.coarse[r.hist_len :], dtype=np.int64)
        frames = gen.reshape(-1, self.c.n_coarse_codebooks).T  # (2, T)
        return np.remainder(frames - self.c.semantic_vocab_size, self.c.codebook_size)

    def leave(self, r: _Row) -> None:
        r.req.coarse = self._codes(r)


class FineStage(Stage):
    """Two codebooks -> eight, one codebook of one 1024-frame window per step."""

    name = "fine"
    window = True

    def __init__(self, model: FineGPT, consts: BarkConstants, slots: int) -> None:
        super().__init__(slots)
        self.model, self.c = model, consts
        self.device = model.heads[0].weight.device
        self.params = _Params(slots, self.device)
        self.state: dict[int, tuple[Tensor, prompts.FinePlan, list[int]]] = {}

    def admit(self, req: Request) -> None:
        assert req.coarse is not None
        c = self.c
        buf = prompts.fine_input(req.coarse, req.voice, c)
        n_hist = 0 if req.voice is None else min(req.voice.fine.shape[1], c.max_fine_history_length)
        plan = prompts.fine_plan(req.coarse.shape[1], n_hist, c)
        i = self.slots.take(_Row(req))
        self.params.set(i, 1.0 if req.options.greedy else req.options.fine_temp, req)
        # progress: [window index, codebook]
        self.state[i] = (to_device(buf, self.device), plan, [0, c.n_coarse_codebooks])
        req.status = Status.RUNNING

    def step(self) -> list[Request]:
        items = self.slots.items()
        if not items:
            return []
        L = self.c.max_fine_input_length
        windows, books, fills = [], [], []
        for i, _ in items:
            buf, plan, (w, cb) = self.state[i]
            start, fill = plan.windows[w]
            windows.append(buf[start : start + L])
            books.append(cb)
            fills.append(fill - start)  # the window's first frame that gets new codes
        codes = torch.stack(windows)  # (B, L, 8)
        # rows predicting the same codebook share one embedding sum and one head
        groups: dict[int, list[int]] = {}
        for b, cb in enumerate(books):
            groups.setdefault(cb, []).append(b)
        x = torch.empty(
            (len(items), L, self.model.cfg.n_embd),
            dtype=self.model.heads[0].weight.dtype,
            device=self.device,
        )
        for cb, members in groups.items():
            idx = to_device(members, self.device)
            x[idx] = self.model.embed(codes[idx], cb)
        # the model computes the frames from the batch's earliest fill point; earlier logits
        # stay 0, and unused
        keep = min(fills)
        h = self.model.body(x, keep_from=keep)  # (B, L - keep, C)
        logits = torch.zeros((len(items), L, self.c.codebook_size), device=self.device)
        for cb, members in groups.items():
            idx = to_device(members, self.device)
            logits[idx, keep:] = self.model.head(h[idx], cb)[..., : self.c.codebook_size].float()
        slots = to_device([i for i, _ in items], self.device)
        counter = to_device(
            [self.state[i][2][0] * 8 + self.state[i][2][1] for i, _ in items], self.device
        )
        p = self.params.rows(slots)
        pred = choose_fine(logits, p.temperature, p.seed, counter)  # (B, L)
        out = []
        for b, (i, r) in enumerate(items):
            buf, plan, prog = self.state[i]
            start, fill = plan.windows[prog[0]]
            buf[fill : start + L, prog[1]] = pred[b, fill - start :]
            r.req.mark(self.name)
            prog[1] += 1
            if prog[1] == self.c.n_fine_codebooks:
                prog[0], prog[1] = prog[0] + 1, self.c.n_coarse_codebooks
                if prog[0] == len(plan.windows):
                    end = buf.shape[0] - plan.n_pad
                    r.req.fine = buf[plan.n_history : end].T.cpu().numpy()
                    self.slots.release(i)
                    del self.state[i]
                    out.append(r.req)
        return out

    def remove(self, req: Request) -> bool:
        i = self.slots.find(req)
        if i is None:
            return False
        self.slots.release(i)
        del self.state[i]
        return True


class CodecStage(Stage):
    """Eight codebooks -> 24 kHz float32 audio with EnCodec's decoder, one request at a time.

    EnCodec's LSTMs see padding, so requests are not padded together (as in transformers).
    """

    name = "codec"
    window = True

    def __init__(self, codec: torch.nn.Module, slots: int) -> None:
        super().__init__(slots)
        # transformers' EncodecModel, whose submodules type as "Tensor | Module" under torch's
        # stubs: its quantizer and decoder are called as that model defines them
        self.codec: Any = codec
        self.device = next(codec.parameters()).device

    def admit(self, req: Request) -> None:
        self.slots.take(_Row(req))
        req.status = Status.RUNNING

    def decode(self, fine: np.ndarray) -> np.ndarray:
        codes = torch.as_tensor(fine, device=self.device)[:, None]  # (8, 1, T)
        emb = self.codec.quantizer.decode(codes)  # (1, D, T)
        audio = self.codec.decoder(emb)  # (1, 1, T * 320)
        return audio[0, 0].float().cpu().numpy()

    def step(self) -> list[Request]:
        items = self.slots.items()
        if not items:
            return []
        # the one due first, as the scheduler admits them (Runtime.due; a stream stays in order)
        i, r = min(items, key=lambda item: (_due(item[1].req), item[1].req.id))
        assert r.req.fine is not None
        r.req.mark(self.name)
        r.req.audio = self.decode(r.req.fine)
        r.req.mark(self.name)
        self.slots.release(i)
        return [r.req]
