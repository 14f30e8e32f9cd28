"""The engine loop: schedule -> execute -> update, one iteration per :meth:`Runtime.step`.

The runtime owns the four stages and a bounded queue in front of each. ``submit`` and
``cancel`` may be called between steps; requests move from a stage's output to the next
stage's queue in ``update``. Nothing here is asynchronous: a caller (``Engine.generate`` or the
server's worker thread) calls ``step`` in a loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ..errors import Busy, InternalError
from .request import Request, Status
from .scheduler import STAGES, Plan, Scheduler, StageState, Ticket
from .stages import Stage

log = logging.getLogger(__name__)


class Runtime:
    def __init__(
        self, stages: Mapping[str, Stage], scheduler: Scheduler | None = None, max_queue: int = 256
    ) -> None:
        self.stages = dict(stages)
        self.scheduler = scheduler or Scheduler()
        self.max_queue = max_queue
        self.requests: dict[int, Request] = {}  # every request not yet final
        self.queues: dict[str, list[Ticket]] = {name: [] for name in STAGES}
        self.steps = 0

    # -- called by users of the runtime ---------------------------------------------------

    def submit(self, req: Request) -> None:
        if len(self.queues["semantic"]) >= self.max_queue:
            raise Busy(f"{self.max_queue} requests are already waiting")
        self.requests[req.id] = req
        self.queues["semantic"].append(Ticket(req.id, req.id))

    def cancel(self, request_id: int) -> bool:
        """Take a request out of every stage and queue; True if it was still running."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for name, queue in self.queues.items():
            self.queues[name] = [t for t in queue if t.request_id != request_id]
        for stage in self.stages.values():
            stage.remove(req)
        req.status = Status.CANCELLED
        return True

    @property
    def busy(self) -> bool:
        return bool(self.requests)

    # -- the loop -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One iteration; returns the requests that became final (finished or failed)."""
        plan = self.schedule()
        outputs = self.execute(plan)
        return self.update(plan, outputs)

    def schedule(self) -> Plan:
        states = {n: StageState(free=s.free, active=s.active) for n, s in self.stages.items()}
        plan = self.scheduler.plan(self.queues, states)
        for name, ids in plan.admit.items():
            admitted = set(ids)
            self.queues[name] = [t for t in self.queues[name] if t.request_id not in admitted]
            for rid in ids:
                self.stages[name].admit(self.requests[rid])
        return plan

    def execute(self, plan: Plan) -> dict[str, list[Request] | BaseException]:
        outputs: dict[str, list[Request] | BaseException] = {}
        for name in plan.run:
            try:
                outputs[name] = self.stages[name].step()
            except Exception as exc:  # one stage's failure must not stop the others
                log.exception("stage %s failed", name)
                outputs[name] = exc
        self.steps += 1
        return outputs

    def update(
        self, plan: Plan, outputs: dict[str, list[Request] | BaseException]
    ) -> list[Request]:
        final: list[Request] = []
        for name, out in outputs.items():
            if isinstance(out, BaseException):
                # the batch's rows are lost: fail every request the stage held
                for req in list(self.requests.values()):
                    if self.stages[name].remove(req):
                        req.status, req.error = Status.FAILED, InternalError(f"{name} failed")
                        self.requests.pop(req.id, None)
                        final.append(req)
                continue
            for req in out:
                nxt = STAGES.index(name) + 1
                if nxt < len(STAGES):
                    self.queues[STAGES[nxt]].append(Ticket(req.id, req.id))
                else:
                    req.status = Status.FINISHED
                    self.requests.pop(req.id, None)
                    final.append(req)
        return final
