"""The engine loop: schedule -> execute -> update, one iteration per :meth:`Runtime.step`.

The runtime owns the four stages and a bounded queue in front of each. Requests move from a
stage's output to the next stage's queue in ``update``. ``step`` may run every stage (what
``Engine.generate`` does, in the caller's thread) or only some of them: the pipeline
(:mod:`.pipeline`) gives each group of stages its own worker thread, each calling ``step`` on
its own stages, so the semantic stage of one segment runs while the acoustic stages work on
the previous one.

Thread safety: queues, the request table and pending removals are guarded by one lock, held
only for bookkeeping, never while a stage computes. A stage's own state is touched only by the
thread that steps it: ``cancel`` (any thread) takes a request out of the queues at once and
asks the stages holding it to drop it at their next step boundary.

Order: every stage admits the waiting requests whose audio a listener needs first
(:meth:`Runtime.due`, the scheduler's earliest-due-first policy).

Voice continuity: a request may name the previous segment of its stream (``Request.after``).
It enters a stage only after that segment has left the stage, and its prompt for the stage is
then continued with that segment's tokens. Cancelling or failing a request cancels or fails
the requests that wait on it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from ..bark.prompts import continue_voice
from ..errors import Busy, Cancelled, InternalError
from .request import Request, Status
from .scheduler import STAGES, Plan, Scheduler, StageName, StageState, Ticket
from .stages import Stage

log = logging.getLogger(__name__)

MAX_RETRIES = 2  # times a request is retried after its stage raised

# (stage, requests in it, start, end, window): one stage step, times from time.perf_counter()
# (on CUDA the host's: kernels are queued, not waited for); window: Stage.window after the step
StepObserver = Callable[[str, int, float, float, bool], None]


class Runtime:
    def __init__(
        self,
        stages: Mapping[str, Stage],
        scheduler: Scheduler | None = None,
        max_queue: int = 256,
        semantic_rate_hz: float = 49.9,
    ) -> None:
        self.stages = dict(stages)
        self.scheduler = scheduler or Scheduler()
        self.max_queue = max_queue
        self.semantic_rate_hz = semantic_rate_hz  # semantic tokens per second of audio
        self.requests: dict[int, Request] = {}  # every request not yet final
        self.queues: dict[str, list[Request]] = {name: [] for name in STAGES}
        self.removals: dict[str, list[Request]] = {name: [] for name in STAGES}
        self.steps = 0
        # called after every stage step, from the thread that ran it (metrics, traces)
        self.observers: list[StepObserver] = []
        # guards requests/queues/removals; workers wait on it for work
        self.changed = threading.Condition(threading.RLock())

    # -- called by users of the runtime (any thread) --------------------------------------

    def submit(self, req: Request) -> None:
        with self.changed:
            if len(self.queues["semantic"]) >= self.max_queue:
                raise Busy(f"{self.max_queue} requests are already waiting")
            self.requests[req.id] = req
            self.queues["semantic"].append(req)
            self.changed.notify_all()

    def cancel(self, request_id: int) -> bool:
        """Cancel a request (and those continuing it); True if it was still running."""
        with self.changed:
            req = self.requests.get(request_id)
            if req is None:
                return False
            self._drop(req, Status.CANCELLED, Cancelled("cancelled"))
            self.changed.notify_all()
            return True

    @property
    def busy(self) -> bool:
        return bool(self.requests)

    def depths(self) -> dict[str, tuple[int, int]]:
        """stage -> (requests waiting, requests inside), for metrics."""
        with self.changed:
            return {n: (len(self.queues[n]), self.stages[n].active) for n in STAGES}

    # -- the loop -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, names: Iterable[str] = STAGES) -> list[Request]:
        """One iteration over the stages ``names``; returns requests that became final.

        Final means finished, or failed because a stage raised. Cancelled requests are not
        returned (``cancel`` already made them final).
        """
        names = tuple(names)
        with self.changed:
            removals = {n: self.removals[n] for n in names}
            for n in names:
                self.removals[n] = []
        for n, reqs in removals.items():
            for req in reqs:
                self.stages[n].remove(req)
        plan = self.schedule(names)
        outputs = self.execute(plan)
        return self.update(plan, outputs)

    def has_work(self, names: Iterable[str]) -> bool:
        """Whether ``step(names)`` would do anything now. Call with ``changed`` held."""
        for n in names:
            stage = self.stages[n]
            if stage.active or self.removals[n]:
                return True
            if stage.free and any(self._ready(r, n) for r in self.queues[n]):
                return True
        return False

    def urgent(self, names: Iterable[str]) -> bool:
        """Whether stages ``names`` hold or may admit a request a listener is waiting for.

        That is a stream's first unfinished segment: it continues no segment, or the segment
        it continues has finished. Call with ``changed`` held.
        """

        def awaited(req: Request) -> bool:
            return req.after is None or req.after.status.final

        for n in names:
            inside = (
                r for r in self.requests.values() if r.stage == n and r.status is Status.RUNNING
            )
            if any(awaited(r) for r in inside):
                return True
            if any(awaited(r) and self._ready(r, n) for r in self.queues[n]):
                return True
        return False

    def schedule(self, names: Iterable[str] = STAGES) -> Plan:
        names = tuple(names)
        with self.changed:
            solo_inside = {
                r.stage for r in self.requests.values() if r.solo and r.status is Status.RUNNING
            }
            states = {
                n: StageState(self.stages[n].free, self.stages[n].active, n in solo_inside)
                for n in names
            }
            waiting = {
                n: [
                    Ticket(r.id, r.id, due=self.due(r), ready=self._ready(r, n), solo=r.solo)
                    for r in self.queues[n]
                ]
                for n in names
            }
            plan = self.scheduler.plan(waiting, states)
            for name, ids in plan.admit.items():
                admitted = set(ids)
                entering = [r for r in self.queues[name] if r.id in admitted]
                self.queues[name] = [r for r in self.queues[name] if r.id not in admitted]
                for req in sorted(entering, key=lambda r: r.id):
                    self._continue(req, name)
                    self.stages[name].admit(req)  # cheap bookkeeping; the caller owns the stage
        return plan

    def execute(self, plan: Plan) -> dict[str, list[Request] | BaseException]:
        outputs: dict[str, list[Request] | BaseException] = {}
        for name in plan.run:
            stage = self.stages[name]
            batch, started = stage.active, time.perf_counter()
            try:
                outputs[name] = stage.step()
            except Exception as exc:  # one stage's failure must not stop the others
                log.exception("stage %s failed", name)
                outputs[name] = exc
            ended = time.perf_counter()
            for observer in tuple(self.observers):
                try:
                    observer(name, batch, started, ended, stage.window)
                except Exception:  # a broken observer must not stop the engine
                    log.exception("step observer %r failed; removed", observer)
                    with contextlib.suppress(ValueError):
                        self.observers.remove(observer)
        self.steps += 1
        return outputs

    def update(
        self, plan: Plan, outputs: dict[str, list[Request] | BaseException]
    ) -> list[Request]:
        final: list[Request] = []
        with self.changed:
            for name, out in outputs.items():
                if isinstance(out, BaseException):
                    final += self._stage_failed(name, out)
                    continue
                for req in out:
                    if req.preview_of is not None and req.stage != name:  # made by the stage
                        self._enter_preview(req)
                        continue
                    if self.requests.get(req.id) is not req:
                        continue  # cancelled while the stage ran
                    req.solo = False
                    nxt = StageName(name).next
                    if nxt is not None:
                        req.stage, req.status = nxt, Status.WAITING
                        self.queues[nxt].append(req)
                    else:
                        req.status = Status.FINISHED
                        req.after = None
                        self.requests.pop(req.id, None)
                        final.append(req)
            self.changed.notify_all()
        return final

    def fail_held(self, names: Iterable[str]) -> list[Request]:
        """Fail every request the stages ``names`` hold (after a stage raised); return them.

        Call from the thread that owns those stages.
        """
        failed: list[Request] = []
        with self.changed:
            for req in list(self.requests.values()):
                held = [n for n in names if self.stages[n].remove(req)]
                if held:
                    failed += self._drop(req, Status.FAILED, InternalError(f"{held[0]} failed"))
            self.changed.notify_all()
        return failed

    def _stage_failed(self, name: str, exc: BaseException) -> list[Request]:
        """A stage raised: retry its requests one at a time; fail those that fail alone.

        The batch's state is lost, so each request it held starts the stage again, alone
        (sampling noise is keyed by position, so a retry gives the same tokens). A request
        that fails alone is the one at fault (or does not fit in memory even alone): it
        fails with ``internal``, and so do the later segments of its stream.
        """
        oom = isinstance(exc, torch.OutOfMemoryError)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        final: list[Request] = []
        with self.changed:
            for req in list(self.requests.values()):
                if not self.stages[name].remove(req):
                    continue
                if req.solo or req.retries >= MAX_RETRIES:
                    why = "out of memory" if oom else f"the {name} stage failed"
                    final += self._drop(req, Status.FAILED, InternalError(why))
                else:
                    req.retries += 1
                    req.solo = True
                    req.restart()
                    self.queues[name].append(req)
            self.changed.notify_all()
        return final

    # -- bookkeeping (with ``changed`` held) ----------------------------------------------

    def due(self, req: Request) -> float:
        """When a listener needs ``req``'s audio (``time.perf_counter()`` seconds).

        A stream's first segment is due when it arrived. A segment that continues another is
        due when that one's audio would end if it had started on time: its due time plus its
        length (semantic tokens / :attr:`semantic_rate_hz`), and never before it arrived
        itself. The length is known once the segment before has left the semantic stage,
        which is also when this one becomes ready to enter it; until then its arrival stands
        in (it is not ready, so it is not admitted anywhere). A preview is due at once: a
        listener waits for it (see :meth:`Request.preview`). A segment that names no previous
        one (``ServerConfig.continuity`` off) is due when it arrived, like a first segment.
        """
        if req.preview_of is not None:
            req.due = float("-inf")
        if req.due is not None:
            return req.due
        prev = req.after
        if prev is None:
            req.due = req.submitted_at
        elif prev.past(StageName.SEMANTIC):
            audio_s = len(prev.semantic) / self.semantic_rate_hz
            req.due = max(req.submitted_at, self.due(prev) + audio_s)
        else:
            return req.submitted_at
        return req.due

    @staticmethod
    def _ready(req: Request, stage: str) -> bool:
        """A request enters a stage after its predecessor has left it."""
        prev = req.after
        return prev is None or prev.past(StageName(stage))

    @staticmethod
    def _continue(req: Request, stage: str) -> None:
        """Condition ``req`` on its predecessor's tokens for ``stage``."""
        prev = req.after
        if prev is None:
            return
        if stage in ("semantic", "coarse", "fine"):
            req.voice = continue_voice(
                req.preset, np.asarray(prev.semantic), prev.coarse, prev.fine
            )
        if stage == "fine":
            req.after = None  # the codec needs nothing from it: let its audio be freed

    def _enter_preview(self, preview: Request) -> None:
        """Queue a preview for the stage after the one that made it, if its segment lives."""
        parent = preview.preview_of
        if parent is None or self.requests.get(parent.id) is not parent:
            return  # the segment was cancelled or failed while the stage ran
        self.requests[preview.id] = preview
        self.queues[preview.stage].append(preview)

    def _drop(self, req: Request, status: Status, error: BaseException) -> list[Request]:
        """Make ``req``, every request continuing it and its previews final; return them."""
        dropped = [req]
        for other in self.requests.values():
            # requests are in the order they entered: chains resolve in one pass
            if (other.after is not None and other.after in dropped) or (
                other.preview_of is not None and other.preview_of in dropped
            ):
                dropped.append(other)
        for r in dropped:
            self.requests.pop(r.id, None)
            if r in self.queues[r.stage]:
                self.queues[r.stage].remove(r)
            elif r.status is Status.RUNNING:
                self.removals[r.stage].append(r)
            r.status, r.error, r.after = status, error, None
        return dropped
