"""The scheduling policy: which waiting requests enter which stage, and which stages run.

Pure: no torch, no asyncio, no clocks. The engine loop describes the stages as
:class:`StageState` and the queues as lists of :class:`Ticket`; the policy answers with a
:class:`Plan`. Tested with fake stages in ``tests/runtime/test_scheduler.py``.

Policy:

* Each stage admits waiting requests in ticket order (oldest first; a stream's segments get
  increasing tickets, so they pass through every stage in order) while it has free slots.
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

from dataclasses import dataclass, field

STAGES = ("semantic", "coarse", "fine", "codec")  # the order work flows through


@dataclass(frozen=True)
class Ticket:
    """A request waiting to enter a stage."""

    request_id: int  # the runtime's id for the request
    order: int  # global arrival order: lower goes first
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
    """FIFO admission into bounded stages; downstream-first execution."""

    def plan(self, waiting: dict[str, list[Ticket]], stages: dict[str, StageState]) -> Plan:
        """Plan the stages named in ``stages`` (a worker may own only some of them)."""
        plan = Plan()
        for name in STAGES:
            if name not in stages:
                continue
            state = stages[name]
            queue = sorted((t for t in waiting.get(name, []) if t.ready), key=lambda t: t.order)
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


@dataclass(frozen=True)
class SharedCores:
    """Priority between worker threads that share the same cores (the CPU).

    On a GPU the stages' workers run side by side on separate streams. On a CPU they compete
    for the same few cores, so a background step (work nobody is waiting for yet) slows the
    urgent one it runs beside. Background work therefore runs freely only while no urgent work
    is running or waiting elsewhere; otherwise it keeps to ``share`` of the wall time.
    """

    share: float = 0.25  # most of the wall time background work takes beside urgent work

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {self.share!r}")

    def may_run(
        self, urgent: bool, urgent_elsewhere: bool, now: float, allowed_from: float
    ) -> bool:
        """Whether a worker may step now. ``allowed_from``: see :meth:`next_allowed`."""
        return urgent or not urgent_elsewhere or now >= allowed_from

    def next_allowed(self, started: float, ended: float) -> float:
        """After a background step over ``[started, ended)``: when the next may start while
        urgent work is about (so that background steps fill ``share`` of the time)."""
        return ended + (ended - started) * (1.0 - self.share) / self.share
