"""The scheduling policy: which waiting requests enter which stage, and which stages run.

Pure: no torch, no asyncio, no clocks. The engine loop describes the stages as
:class:`StageState` and the queues as lists of :class:`Ticket`; the policy answers with a
:class:`Plan`. Tested with fake stages in ``tests/runtime/test_scheduler.py``.

Policy:

* Each stage admits waiting requests earliest *due* first (ties: oldest first) while it has
  free slots. A ticket's due time is when a listener will want its audio, as the runtime
  reckons it: for a stream's first segment, when it arrived; for a later one, when the audio
  before it would run out if playback had started on time (never before it arrived). So
  every stream's first segment goes before the later segments of streams that are already
  speaking, unless those would fall silent first: earliest deadline first, which for single
  requests is plain arrival order. A stream's segments get increasing due times, so they pass
  through every stage in order.
  A ticket that is not *ready* (its stream's previous segment has not yet left this stage, and
  this segment is conditioned on that segment's tokens) is passed over without blocking the
  tickets behind it.
* A *solo* ticket (a request whose batch failed, retried alone to find out which request
  failed, or to fit in memory) enters only an empty stage, and nothing enters with it or
  while it is there; when it is first in line the stage admits nothing else, so it drains.
* Every stage with work runs once per iteration, downstream first, so that a request nearer to
  producing audio is never held back by one that has just arrived: the codec and fine stages
  free their slots before the coarse and semantic stages fill theirs.
* Between worker threads that share the CPU's cores (:class:`SharedCores`): a step whose work
  a listener is waiting for (*urgent*: a stream's first unfinished segment) runs at once;
  other (*background*) work, such as the semantic stage of a stream's next segment, takes at
  most a set share of the time while urgent work is about, so that it still overlaps but
  does not slow the audio a listener is waiting for.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import StrEnum


class StageName(StrEnum):
    """The four stages, ordered as work flows through them (and compared in that order).

    Members are their names as strings ("semantic", ...), so they key the runtime's tables,
    metrics and traces as those strings do.
    """

    SEMANTIC = "semantic"
    COARSE = "coarse"
    FINE = "fine"
    CODEC = "codec"

    @property
    def order(self) -> int:
        return _ORDER[self]

    @property
    def next(self) -> StageName | None:
        """The stage after this one; None after the last."""
        i = self.order + 1
        return STAGES[i] if i < len(STAGES) else None

    def __lt__(self, other: object) -> bool:
        return self.order < StageName(other).order if isinstance(other, str) else NotImplemented

    def __le__(self, other: object) -> bool:
        return self.order <= StageName(other).order if isinstance(other, str) else NotImplemented

    def __gt__(self, other: object) -> bool:
        return self.order > StageName(other).order if isinstance(other, str) else NotImplemented

    def __ge__(self, other: object) -> bool:
        return self.order >= StageName(other).order if isinstance(other, str) else NotImplemented


STAGES: tuple[StageName, ...] = tuple(StageName)  # the order work flows through
_ORDER = {name: i for i, name in enumerate(STAGES)}


@dataclass(frozen=True)
class Ticket:
    """A request waiting to enter a stage."""

    request_id: int  # the runtime's id for the request
    order: int  # global arrival order: among equal due times, lower goes first
    due: float = 0.0  # when a listener needs its audio (seconds, the runtime's clock): lower first
    ready: bool = True  # False while the request waits for its predecessor in the stream
    solo: bool = False  # must run alone in the stage (a retry after its batch failed)


@dataclass(frozen=True)
class StageState:
    """What the policy needs to know about one stage."""

    free: int  # free slots
    active: int  # requests inside the stage now
    solo: bool = False  # a request that must run alone is inside


@dataclass
class Plan:
    """One iteration of the engine loop."""

    admit: dict[str, list[int]] = field(default_factory=dict)  # stage -> request ids, in order
    run: list[str] = field(default_factory=list)  # stages to step, in this order

    @property
    def idle(self) -> bool:
        return not (self.run or any(self.admit.values()))


class Scheduler:
    """Earliest-due-first admission into bounded stages; downstream-first execution."""

    def plan(self, waiting: dict[str, list[Ticket]], stages: dict[str, StageState]) -> Plan:
        """Plan the stages named in ``stages`` (a worker may own only some of them)."""
        plan = Plan()
        for name in STAGES:
            if name not in stages:
                continue
            state = stages[name]
            ready = (t for t in waiting.get(name, []) if t.ready)
            queue = sorted(ready, key=lambda t: (t.due, t.order))
            plan.admit[name] = self._admit(queue, state)
            if state.active + len(plan.admit[name]) > 0:
                plan.run.append(name)
        plan.run.reverse()  # downstream first
        return plan

    @staticmethod
    def _admit(queue: list[Ticket], state: StageState) -> list[int]:
        if state.solo:
            return []
        admit: list[int] = []
        for t in queue:
            if len(admit) == state.free:
                break
            if t.solo:
                if not admit and state.active == 0:
                    admit.append(t.request_id)
                break  # alone, or wait for the stage to drain
            admit.append(t.request_id)
        return admit


class SharedCores:
    """Turns between worker threads that share the same cores (the CPU). Pure: no clocks.

    On a GPU the stages' workers run side by side on separate streams. On a CPU they would
    compete for the same few cores (each step's kernels already use all of them), so here one
    worker steps at a time, and :meth:`pick` says which:

    * *Urgent* work (a step a listener is waiting for) always has a claim; *background* work
      has one when no urgent work is waiting, or when it is owed time: after a background
      step of ``d`` seconds it may claim again ``d * (1 - share) / share`` seconds later, so
      beside urgent work it takes about ``share`` of the time. It still overlaps (the next
      segment's semantic stage makes progress) but does not hold back what is awaited.
    * Among claimants the one that has run least goes first, so two urgent workers share the
      time evenly whatever their step lengths (a fine step is ~50x a decode step). A worker
      that had no work is not credited for its idle time.
    """

    def __init__(self, share: float = 0.25) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self.share = share
        self.used: dict[Hashable, float] = {}  # worker -> seconds it has run (see pick)
        self.allowed_from: dict[Hashable, float] = {}  # worker -> its next background claim
        self._wanting: set[Hashable] = set()

    def pick(self, wants: dict[Hashable, bool], now: float) -> Hashable | None:
        """Which worker steps next, among ``wants`` (worker -> its work is urgent): those that
        have work, while none is stepping. None only when ``wants`` is empty."""
        if not wants:
            self._wanting = set()
            return None
        busy = [self.used.get(w, 0.0) for w in wants if w in self._wanting]
        floor = min(busy) if busy else 0.0
        for w in wants:
            if w not in self._wanting:  # back from idle: no credit for the idle time
                self.used[w] = max(self.used.get(w, 0.0), floor)
        self._wanting = set(wants)
        any_urgent = any(wants.values())
        claims = [
            w
            for w, urgent in wants.items()
            if urgent or not any_urgent or now >= self.allowed_from.get(w, 0.0)
        ]
        return min(claims, key=lambda w: (self.used[w], not wants[w]))  # ties: urgent first

    def ran(self, worker: Hashable, urgent: bool, started: float, ended: float) -> None:
        """Account for a step of ``worker`` over ``[started, ended)``."""
        self.used[worker] = self.used.get(worker, 0.0) + (ended - started)
        if not urgent:
            self.allowed_from[worker] = ended + (ended - started) * (1.0 - self.share) / self.share
