"""The server's metrics, defined once, exposed through ``prometheus_client`` (``GET /metrics``).

Each :class:`Metrics` has its own ``CollectorRegistry``, so several servers in one process (the
tests, a benchmark) never share counts. Counters and histograms are updated from the event loop
and, for the stage steps, from the pipeline's worker threads; prometheus_client's metrics are
thread-safe. Gauges that describe the present (connections, streams, queue depths) are read
when the metrics are scraped, from the :class:`Live` view the server gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..runtime.scheduler import STAGES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Live:
    """What the gauges read at scrape time (callables: they run on the event loop)."""

    connections: Callable[[], int]  # open WebSocket connections
    streams: Callable[[], int]  # streams open on all connections and HTTP requests
    depths: Callable[[], Mapping[str, int]]  # stage -> requests waiting to enter it
    mode: Callable[[], Mapping[str, Any]]  # Engine.decode_mode(): how it decodes, fallbacks
    eager_steps: Callable[[], Mapping[str, int]]  # Engine.eager_steps(): decode steps off-graph


class _LiveCollector(Collector):
    def __init__(self, live: Live) -> None:
        self.live = live

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "stream_engine_connections",
            "Open WebSocket connections.",
            value=self.live.connections(),
        )
        yield GaugeMetricFamily(
            "stream_engine_active_streams",
            "Streams open on all connections and speech requests.",
            value=self.live.streams(),
        )
        depth = GaugeMetricFamily(
            "stream_engine_queue_depth", "Requests waiting to enter each stage.", labels=["stage"]
        )
        for stage, waiting in self.live.depths().items():
            depth.add_metric([stage], waiting)
        yield depth
        mode = dict(self.live.mode())
        fallbacks = [str(f) for f in mode.pop("fallbacks", [])]
        checks = mode.pop("checks", {})
        keys = sorted(mode)
        decode = GaugeMetricFamily(
            "stream_engine_decode_mode", "How the engine decodes (1 for its mode).", labels=keys
        )
        decode.add_metric([str(mode[k]) for k in keys], 1)
        yield decode
        fell = GaugeMetricFamily(
            "stream_engine_load_fallbacks",
            "What the engine fell back from at load, and why (1 per fallback).",
            labels=["reason"],
        )
        for reason in fallbacks:
            fell.add_metric([reason], 1)
        yield fell
        capture = GaugeMetricFamily(
            "stream_engine_graph_capture_seconds",
            "Seconds the load spent capturing each stage's decode graphs (CUDA).",
            labels=["stage"],
        )
        for stage, seconds in checks.get("capture_s", {}).items():
            capture.add_metric([stage], seconds)
        yield capture
        eager = CounterMetricFamily(
            "stream_engine_eager_decode_steps",
            "Decode steps that found no captured graph and ran eagerly (stages with graphs).",
            labels=["stage"],
        )
        for stage, steps in self.live.eager_steps().items():
            eager.add_metric([stage], steps)
        yield eager


class Metrics:
    def __init__(self, live: Live) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        r.register(_LiveCollector(live))
        self.batch_size = Gauge(
            "stream_engine_batch_size",
            "Requests each stage stepped at its last step.",
            ["stage"],
            registry=r,
        )
        self.ttfa = Histogram(
            "stream_engine_ttfa_seconds",
            "Time from a stream's first text to its first audio.",
            buckets=[0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
            registry=r,
        )
        self.rtf = Histogram(
            "stream_engine_rtf",
            "Real-time factor of finished streams (wall time / audio time).",
            buckets=[0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 50],
            registry=r,
        )
        self.errors = Counter(
            "stream_engine_errors", "Error messages sent, by code.", ["code"], registry=r
        )
        self.streams = Counter(
            "stream_engine_streams", "Streams ended, by outcome.", ["outcome"], registry=r
        )
        self.audio = Counter("stream_engine_audio_seconds", "Audio seconds sent.", registry=r)
        self.slow_clients = Counter(
            "stream_engine_slow_clients",
            "Clients disconnected for not reading audio.",
            registry=r,
        )
        self.previews = Counter(
            "stream_engine_previews",
            "Segment previews (early audio) decoded and handed to their stream.",
            registry=r,
        )
        self.speech_requests = Counter(
            "stream_engine_speech_requests",
            "POST /v1/audio/speech requests answered, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.stage_seconds = Counter(
            "stream_engine_stage_seconds",
            "Seconds each stage spent stepping (its busy time; on CUDA, host time).",
            ["stage"],
            registry=r,
        )
        self.stage_steps = Counter(
            "stream_engine_stage_steps", "Steps each stage ran.", ["stage"], registry=r
        )
        self.stage_rows = Counter(
            "stream_engine_stage_rows",
            "Requests stepped, summed over steps (rows / steps: the mean batch).",
            ["stage"],
            registry=r,
        )
        for stage in STAGES:  # every stage shows from the start, at 0
            for metric in (self.batch_size, self.stage_seconds, self.stage_steps, self.stage_rows):
                metric.labels(stage)

    def step(self, stage: str, batch: int, start: float, end: float, window: bool) -> None:
        """A :data:`~stream_engine.runtime.loop.StepObserver` (called from worker threads)."""
        self.stage_seconds.labels(stage).inc(end - start)
        self.stage_steps.labels(stage).inc()
        self.stage_rows.labels(stage).inc(batch)
        self.batch_size.labels(stage).set(batch)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when it has none yet), e.g. for tests and benchmarks."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def stream_done(self, audio_ms: float, ttfa_ms: float | None, rtf: float | None) -> None:
        """A stream ended with ``done``."""
        self.streams.labels("done").inc()
        self.audio.inc(audio_ms / 1000)
        if ttfa_ms is not None:
            self.ttfa.observe(ttfa_ms / 1000)
        if rtf is not None:
            self.rtf.observe(rtf)
