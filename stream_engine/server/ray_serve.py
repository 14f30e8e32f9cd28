"""The server on Ray Serve: the same ASGI application on many replicas, one engine each.

Serve's HTTP proxy takes the connections (WebSocket and HTTP) on one port and hands each to a
replica; a WebSocket stays on its replica for its whole life and counts as one ongoing request
there, which is what autoscaling reads. Each replica loads one :class:`~stream_engine.Engine`
(``num_gpus=1`` where the cluster has GPUs) and serves :func:`~.app.create_app` around its own
:class:`~.service.Service`: continuous batching stays inside the replica. The replica's name,
in every ``hello`` and in ``/healthz``, is Serve's replica tag.

* :func:`build` is the application builder ``serve run`` / ``serve deploy`` import
  (``deploy/ray/serve.yaml``: ``import_path: stream_engine.server.ray_serve:build``);
* :func:`run` is what ``stream-engine serve --ray`` does: start or join Ray, start Serve's
  proxy on ``host:port``, deploy, and wait for SIGTERM.

Metrics: Serve's proxy sends a scrape of ``/metrics`` to one replica or another, so each
replica also copies its prometheus_client samples into Ray's own metrics
(``ray.serve.metrics``, tagged with the replica) every few seconds; Prometheus scrapes them
from Ray's metrics export port on every node (``docs/ray.md``).

Ray is an optional dependency (``pip install "stream-engine[ray]"``): nothing here imports it
until it is used.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import settings_from
from .scaling import Scaling

log = logging.getLogger(__name__)

APP_NAME = "stream-engine"
DEPLOYMENT_NAME = "StreamEngine"
METRICS_PERIOD_S = 5.0  # how often a replica copies its metrics into Ray's


@dataclass(frozen=True)
class ReplicaArgs:
    """What each replica needs to build its engine and server (sent to every replica)."""

    model: str = "suno/bark-small"
    device: str | None = None
    dtype: str | None = None
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # TOML's tables


def _deployment() -> Any:
    """The deployment class (made on first use: it needs Ray)."""
    from ray import serve

    @serve.ingress()
    class StreamEngine:
        async def __init__(self, args: ReplicaArgs) -> None:  # type: ignore[misc]  # Serve awaits it
            from ..engine import Engine
            from .service import Service

            settings = settings_from(args.settings)
            tag = serve.get_replica_context().replica_tag
            server = replace(settings.server, server_name=settings.server.server_name or tag)
            engine = Engine.load(
                args.model, device=args.device, dtype=args.dtype, config=settings.engine
            )
            self.service = Service(engine, server, settings.limits, segmenting=settings.segmenter)
            self._bridge = _MetricsBridge(self.service)
            self._bridge.start()

        def __serve_build_asgi_app__(self) -> Any:
            from .app import create_app

            return create_app(self.service)

        async def __del__(self) -> None:
            self._bridge.stop()

    return serve.deployment(name=DEPLOYMENT_NAME)(StreamEngine)


def build(args: Mapping[str, Any]) -> Any:
    """The application builder for ``serve run`` / ``serve deploy``.

    ``args``: ``model``, ``device``, ``dtype`` and ``settings`` (tables ``server``, ``limits``,
    ``engine``, ``segmenter``, as in ``--config FILE``). Replicas and autoscaling are the
    config file's ``deployments`` section.
    """
    known = {"model", "device", "dtype", "settings"}
    unknown = sorted(set(args) - known)
    if unknown:
        from ..errors import InvalidOption

        raise InvalidOption(f"unknown argument(s) {unknown}; known: {sorted(known)}")
    return application(ReplicaArgs(**dict(args)))


def application(
    args: ReplicaArgs, scaling: Scaling | None = None, cluster_gpus: float = 0.0
) -> Any:
    """The deployment bound to ``args``, as ``serve.run`` takes it. ``scaling``: replicas and
    autoscaling (None: Serve's defaults, or a config file's ``deployments`` section)."""
    settings_from(args.settings)  # every setting is checked here, before a replica starts
    deployment = _deployment()
    if scaling is not None:
        deployment = deployment.options(**scaling.deployment_options(cluster_gpus))
    return deployment.bind(args)


class _MetricsBridge:
    """Copies the replica's prometheus_client samples into Ray's metrics, every few seconds.

    Every sample becomes a Ray gauge of the same name (Ray adds the ``ray_`` prefix and the
    replica's tags), its labels as tag keys: a counter's running total, a histogram's
    ``_bucket``/``_sum``/``_count``, as Prometheus itself would scrape them.
    """

    def __init__(self, service: Any) -> None:
        self.service = service
        self._gauges: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                self.copy()
            except Exception:  # a metric must never take the replica down
                log.exception("copying metrics to Ray failed")
            await asyncio.sleep(METRICS_PERIOD_S)

    def copy(self) -> int:
        from ray.serve.metrics import Gauge

        n = 0
        for family in self.service.metrics.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                keys = tuple(sorted(sample.labels))
                gauge = self._gauges.get((sample.name, keys))
                if gauge is None:
                    gauge = Gauge(sample.name, description=family.documentation, tag_keys=keys)
                    self._gauges[(sample.name, keys)] = gauge
                gauge.set(sample.value, tags=dict(sample.labels))
                n += 1
        return n


def run(
    args: ReplicaArgs,
    scaling: Scaling,
    host: str,
    port: int,
    address: str | None = None,
    temp_dir: str | None = None,
) -> None:
    """``stream-engine serve --ray``: serve on Ray until SIGTERM or SIGINT."""
    import ray
    from ray import serve

    application(args)  # check every setting before starting anything
    ray.init(address=address, _temp_dir=temp_dir, include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        serve.run(application(args, scaling, gpus), name=APP_NAME, route_prefix="/")
        log.info(
            "serving %s on Ray Serve at ws://%s:%d/v1/tts and http://%s:%d/v1/audio/speech",
            args.model,
            host,
            port,
            host,
            port,
        )
        stop = False

        def ask_to_stop(signum: int, frame: Any) -> None:
            nonlocal stop
            stop = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, ask_to_stop)
        while not stop:
            time.sleep(0.5)
        log.info("shutting down")
        serve.delete(APP_NAME)  # replicas drain: their connections get the shutdown timeout
        serve.shutdown()
    finally:
        ray.shutdown()


__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "ReplicaArgs", "Scaling", "application", "build", "run"]
