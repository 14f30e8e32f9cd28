"""A record of the engine's stage steps: where the time goes, for benchmarks and for operators.

:class:`StepTrace` is a :data:`~.loop.StepObserver` (``runtime.observers.append(trace)``) that
keeps the last ``limit`` steps (stage, requests in the stage, start, end, window work or
not). It can summarise a time span (seconds per stage, of them window work, mean batch, how
much of the span some stage was stepping) and write
the steps as a Chrome trace (the JSON that ``chrome://tracing`` and https://ui.perfetto.dev
open), one track per stage.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from .scheduler import STAGES


@dataclass(frozen=True)
class Step:
    stage: str
    batch: int  # requests in the stage when it stepped
    start: float  # time.perf_counter() seconds
    end: float
    window: bool = False  # whole-window work (see Stage.window), not decode steps only


class StepTrace:
    def __init__(self, limit: int = 1_000_000) -> None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        self.steps: deque[Step] = deque(maxlen=limit)  # oldest dropped first
        self._lock = threading.Lock()

    def __call__(self, stage: str, batch: int, start: float, end: float, window: bool) -> None:
        with self._lock:
            self.steps.append(Step(stage, batch, start, end, window))

    def between(self, start: float, end: float) -> list[Step]:
        """The steps that began in ``[start, end)``."""
        with self._lock:
            return [s for s in self.steps if start <= s.start < end]

    def summary(self, start: float, end: float) -> dict[str, Any]:
        """Per stage: steps, seconds, of them ``window_seconds``, mean batch; ``window_s``: all
        stages' window seconds; ``busy``: the share of ``[start, end)`` during which some stage
        was stepping (1.0: the engine never waited)."""
        steps = self.between(start, end)
        stages: dict[str, dict[str, float]] = {}
        for name in STAGES:
            mine = [s for s in steps if s.stage == name]
            if mine:
                stages[name] = {
                    "steps": len(mine),
                    "seconds": sum(s.end - s.start for s in mine),
                    "window_seconds": sum(s.end - s.start for s in mine if s.window),
                    "mean_batch": sum(s.batch for s in mine) / len(mine),
                }
        # union of the step intervals (steps of different workers may overlap on a GPU)
        covered, reach = 0.0, start
        for s in sorted(steps, key=lambda s: s.start):
            lo, hi = max(s.start, reach), min(s.end, end)
            if hi > lo:
                covered += hi - lo
                reach = hi
        span = end - start
        return {
            "span_s": span,
            "busy": covered / span if span > 0 else 0.0,
            "window_s": sum(v["window_seconds"] for v in stages.values()),
            "stages": stages,
        }

    def chrome(self, path: str, start: float | None = None, end: float | None = None) -> int:
        """Write the steps in ``[start, end)`` (default: all) as a Chrome trace; returns how many."""
        with self._lock:
            steps = list(self.steps)
        lo = start if start is not None else min((s.start for s in steps), default=0.0)
        hi = end if end is not None else float("inf")
        chosen = [s for s in steps if lo <= s.start < hi]
        events: list[dict[str, Any]] = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": n}}
            for i, n in enumerate(STAGES)
        ]
        for s in chosen:
            events.append(
                {
                    "name": f"{s.stage} x{s.batch}",
                    "ph": "X",
                    "pid": 0,
                    "tid": STAGES.index(s.stage) if s.stage in STAGES else len(STAGES),
                    "ts": (s.start - lo) * 1e6,
                    "dur": (s.end - s.start) * 1e6,
                    "args": {"batch": s.batch, "window": s.window},
                }
            )
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        return len(chosen)
