"""Worker threads that run the stages concurrently: the engine as a long-running service.

Each *group* of stages gets one thread that loops ``Runtime.step(group)`` while it has work and
sleeps on the runtime's condition when it has none. With the default groups the semantic
stage of segment N+1 runs while the acoustic stages (coarse, fine, codec) work on segment N.
On CUDA each worker issues its work on its own CUDA stream; work is handed over between stages
through host memory (tokens are read back at stage ends), so no cross-stream event is needed.

On a CPU the workers share the same cores, and each step's kernels already use all of them:
two steps at once only slow each other, and a step of work nobody waits for yet (the semantic
stage of a stream's next segment) would slow the step a listener is waiting for. There the
workers take turns, one step at a time, in the order :class:`~.scheduler.SharedCores` picks:
urgent work first, background work to a share of the time while urgent work waits.

Callers use :meth:`Pipeline.submit` / :meth:`Pipeline.cancel` from any thread; finished and
failed requests are handed to ``on_final`` from the worker thread that finished them (the
server bridges that to its event loop).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import cast

import torch

from .loop import Runtime
from .request import Request
from .scheduler import SharedCores

log = logging.getLogger(__name__)

DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("semantic",), ("coarse", "fine", "codec"))


class Pipeline:
    def __init__(
        self,
        runtime: Runtime,
        on_final: Callable[[Request], None],
        groups: Sequence[Sequence[str]] = DEFAULT_GROUPS,
        device: torch.device | None = None,
        cores: SharedCores | bool | None = True,
    ) -> None:
        """``cores``: the priority between workers on a CPU (``True``: the default policy
        there and none on a GPU; ``False``/``None``: none, every worker steps when it can)."""
        self.runtime = runtime
        self.on_final = on_final
        self.groups = [tuple(g) for g in groups]
        self.device = device or torch.device("cpu")
        if cores is True:
            cores = SharedCores() if self.device.type == "cpu" else None
        self.cores: SharedCores | None = cores or None
        self._turn_of: tuple[str, ...] | None = None  # with cores: the group stepping now
        self._stop = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self._threads:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # buffers made on the default stream are ready
        for group in self.groups:
            t = threading.Thread(
                target=self._work, args=(group,), name=f"stage-{'+'.join(group)}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float | None = None) -> None:
        with self.runtime.changed:
            self._stop = True
            self.runtime.changed.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def submit(self, req: Request) -> None:
        self.runtime.submit(req)

    def cancel(self, request_id: int) -> bool:
        return self.runtime.cancel(request_id)

    # -- worker ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _stream(self) -> Iterator[None]:
        if self.device.type == "cuda":
            with torch.cuda.stream(torch.cuda.Stream(self.device)):
                yield
        else:
            yield

    def _turn(self, group: tuple[str, ...]) -> bool | None:
        """Wait until ``group`` has work and its turn; whether its step is urgent (None: stop).

        Call with the runtime's ``changed`` held. Without ``cores`` every group steps whenever
        it has work. With them one group steps at a time: whichever thread finds no group
        stepping asks the policy, reserves the turn for the group picked and wakes the others.
        """
        rt = self.runtime
        while True:
            if self._stop:
                return None
            if not rt.has_work(group):
                if self._turn_of == group:  # its work went away (cancelled): pass the turn on
                    self._turn_of = None
                    rt.changed.notify_all()
                rt.changed.wait()
                continue
            if self.cores is None:
                return True
            if self._turn_of is None:
                wants: dict[Hashable, bool] = {
                    g: rt.urgent(g) for g in self.groups if rt.has_work(g)
                }
                self._turn_of = cast(tuple[str, ...], self.cores.pick(wants, time.perf_counter()))
                rt.changed.notify_all()
            if self._turn_of == group:
                return rt.urgent(group)
            rt.changed.wait()

    def _work(self, group: tuple[str, ...]) -> None:
        rt = self.runtime
        with self._stream():
            while True:
                with rt.changed:
                    urgent = self._turn(group)
                    if urgent is None:
                        return
                started = time.perf_counter()
                try:
                    final = rt.step(group)
                except Exception:  # a bug in the loop itself: fail what this group holds
                    log.exception("worker %s failed", group)
                    final = rt.fail_held(group)
                with rt.changed:
                    if self.cores is not None:
                        self.cores.ran(group, urgent, started, time.perf_counter())
                        self._turn_of = None
                    rt.changed.notify_all()
                for req in final:
                    try:
                        self.on_final(req)
                    except Exception:
                        log.exception("on_final failed for request %d", req.id)
