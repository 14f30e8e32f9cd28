"""Worker threads that run the stages concurrently: the engine as a long-running service.

Each *group* of stages gets one thread that loops ``Runtime.step(group)`` while it has work and
sleeps on the runtime's condition when it has none. With the default groups the semantic
stage of segment N+1 runs while the acoustic stages (coarse, fine, codec) work on segment N.
On CUDA each worker issues its work on its own CUDA stream; work is handed over between stages
through host memory (tokens are read back at stage ends), so no cross-stream event is needed.

Callers use :meth:`Pipeline.submit` / :meth:`Pipeline.cancel` from any thread; finished and
failed requests are handed to ``on_final`` from the worker thread that finished them (the
server bridges that to its event loop).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from .loop import Runtime
from .request import Request

log = logging.getLogger(__name__)

DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (("semantic",), ("coarse", "fine", "codec"))


class Pipeline:
    def __init__(
        self,
        runtime: Runtime,
        on_final: Callable[[Request], None],
        groups: Sequence[Sequence[str]] = DEFAULT_GROUPS,
        device: torch.device | None = None,
    ) -> None:
        self.runtime = runtime
        self.on_final = on_final
        self.groups = [tuple(g) for g in groups]
        self.device = device or torch.device("cpu")
        self._stop = False
        self._threads: list[threading.Thread] = []
        self.batch_sizes: dict[str, int] = {}  # stage -> requests in its last step (metrics)

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

    def _work(self, group: tuple[str, ...]) -> None:
        rt = self.runtime
        with self._stream():
            while True:
                with rt.changed:
                    while not self._stop and not rt.has_work(group):
                        rt.changed.wait()
                    if self._stop:
                        return
                try:
                    final = rt.step(group)
                except Exception:  # a bug in the loop itself: fail what this group holds
                    log.exception("worker %s failed", group)
                    final = rt.fail_held(group)
                for name in group:
                    self.batch_sizes[name] = rt.stages[name].active
                for req in final:
                    try:
                        self.on_final(req)
                    except Exception:
                        log.exception("on_final failed for request %d", req.id)
