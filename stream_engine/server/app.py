"""The server: WebSocket protocol v1 and a few HTTP endpoints on one port.

* ``/v1/tts``: the streaming protocol (``docs/protocol.md``), one :class:`Connection` each.
* ``GET /healthz``: 200 with the model and the engine's state, as JSON.
* ``GET /metrics``: Prometheus text.
* ``GET /``: the browser client (``clients/browser/index.html``) when it is installed, and
  ``GET /NAME.EXT`` its other files (scripts, styles), see :func:`_browser_file`.

The model runs in the pipeline's worker threads (:mod:`stream_engine.runtime.pipeline`); their
finished requests are handed to the event loop with ``call_soon_threadsafe``, so nothing here
blocks the loop on the model and nothing in the workers touches a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import signal
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response

from ..config import ServerConfig
from ..engine import Engine
from ..protocol import PATH, ProtocolLimits
from ..runtime.pipeline import Pipeline
from ..runtime.request import Request
from ..runtime.scheduler import STAGES
from .connection import CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN, Connection
from .jobs import Job, JobStats
from .metrics import Counter, Gauge, Histogram, Registry

log = logging.getLogger(__name__)

BROWSER_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "browser" / "index.html"
BROWSER_DIR = BROWSER_CLIENT.parent
BROWSER_TYPES = {  # the only files served from BROWSER_DIR, by extension
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_BROWSER_NAME = re.compile(r"/([A-Za-z0-9_][A-Za-z0-9_.-]{0,99})")
# The page loads nothing but its own files and talks only to the server it came from.
BROWSER_CSP = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'self'"
)


class Metrics:
    def __init__(self, server: Server) -> None:
        self.registry = r = Registry()
        rt = server.engine.runtime
        r.add(
            Gauge(
                "stream_engine_connections",
                "Open WebSocket connections.",
                lambda: {(): float(len(server.connections))},
            )
        )
        r.add(
            Gauge(
                "stream_engine_active_streams",
                "Streams open on all connections.",
                lambda: {(): float(sum(len(c.jobs) for c in server.connections))},
            )
        )
        r.add(
            Gauge(
                "stream_engine_queue_depth",
                "Requests waiting to enter each stage.",
                lambda: {(("stage", n),): float(w) for n, (w, _) in rt.depths().items()},
            )
        )
        self.last_batch = dict.fromkeys(STAGES, 0)  # stage -> requests in its last step
        r.add(
            Gauge(
                "stream_engine_batch_size",
                "Requests each stage stepped at its last step.",
                lambda: {(("stage", n),): float(b) for n, b in self.last_batch.items()},
            )
        )
        self.ttfa = Histogram(
            "stream_engine_ttfa_seconds",
            "Time from a stream's first text to its first audio.",
            [0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
        )
        self.rtf = Histogram(
            "stream_engine_rtf",
            "Real-time factor of finished streams (wall time / audio time).",
            [0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 50],
        )
        self.errors = Counter("stream_engine_errors_total", "Error messages sent, by code.")
        self.streams = Counter("stream_engine_streams_total", "Streams ended, by outcome.")
        self.audio = Counter("stream_engine_audio_seconds_total", "Audio seconds sent.")
        self.slow_clients = Counter(
            "stream_engine_slow_clients_total", "Clients disconnected for not reading audio."
        )
        self.previews = Counter(
            "stream_engine_previews_total",
            "Segment previews (early audio) decoded and handed to their stream.",
        )
        self.stage_seconds = Counter(
            "stream_engine_stage_seconds_total",
            "Seconds each stage spent stepping (its busy time; on CUDA, host time).",
        )
        self.stage_steps = Counter("stream_engine_stage_steps_total", "Steps each stage ran.")
        self.stage_rows = Counter(
            "stream_engine_stage_rows_total",
            "Requests stepped, summed over steps (rows / steps: the mean batch).",
        )
        for counter in (self.stage_seconds, self.stage_steps, self.stage_rows):
            for n in STAGES:  # every key exists before the workers write (no dict resize)
                counter.inc(0.0, stage=n)
        for m in (
            self.ttfa,
            self.rtf,
            self.errors,
            self.streams,
            self.audio,
            self.slow_clients,
            self.previews,
            self.stage_seconds,
            self.stage_steps,
            self.stage_rows,
        ):
            r.add(m)

    def step(self, stage: str, batch: int, start: float, end: float, window: bool) -> None:
        """A :data:`~stream_engine.runtime.loop.StepObserver` (called from worker threads)."""
        self.stage_seconds.inc(end - start, stage=stage)
        self.stage_steps.inc(stage=stage)
        self.stage_rows.inc(batch, stage=stage)
        self.last_batch[stage] = batch


class Server:
    def __init__(
        self,
        engine: Engine,
        config: ServerConfig | None = None,
        limits: ProtocolLimits | None = None,
    ) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.limits = limits or ProtocolLimits()
        self.pipeline = Pipeline(engine.runtime, self._final_from_worker, device=engine.device)
        self.owners: dict[int, tuple[Connection, Job]] = {}  # request id -> its stream's job
        self.connections: set[Connection] = set()
        self.metrics = Metrics(self)
        self.started_at = time.time()
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ws: WsServer | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine.runtime.observers.append(self.metrics.step)
        self.pipeline.start()
        cfg = self.config
        self._ws = await serve(
            self._handle,
            cfg.host,
            cfg.port,
            process_request=self._http,
            max_size=cfg.max_message_bytes,
            server_header="stream-engine",
        )
        log.info("serving %s on ws://%s:%d%s", self.engine.name, cfg.host, self.port, PATH)

    @property
    def port(self) -> int:
        assert self._ws is not None
        return int(next(iter(self._ws.sockets)).getsockname()[1])

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; give open streams ``timeout`` seconds to finish; cancel the rest."""
        timeout = self.config.shutdown_timeout_s if timeout is None else timeout
        self.draining = True
        if self._ws is not None:
            self._ws.close(close_connections=False)  # no new connections
        deadline = time.monotonic() + timeout
        # streams whose text is complete can finish; the others get cancelled once those are
        # done (or at the deadline): a stream waiting for text could hold the drain forever
        while time.monotonic() < deadline and any(
            j.final for c in self.connections for j in c.jobs.values()
        ):
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            for stream in list(conn.jobs):
                conn.jobs.pop(stream).stop()
                conn.session.cancelled(stream)
            conn.pump()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.drain(), timeout=2.0)
            await conn.ws.close(CLOSE_GOING_AWAY, "server shutting down")
        if self._ws is not None:
            await self._ws.wait_closed()
        await asyncio.to_thread(self.pipeline.stop, 30.0)
        with contextlib.suppress(ValueError):
            self.engine.runtime.observers.remove(self.metrics.step)

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        await self.stop()

    # -- the engine's results -------------------------------------------------------------

    def _final_from_worker(self, req: Request) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, req)

    def _deliver(self, req: Request) -> None:
        if req.preview_of is not None:  # early audio: its segment's stream, which goes on
            owner = self.owners.get(req.preview_of.id)
            if owner is not None:
                self.metrics.previews.inc()
        else:
            owner = self.owners.pop(req.id, None)
        if owner is not None:
            conn, job = owner
            conn.deliver(job, req)

    def cancel(self, request_id: int) -> bool:
        self.owners.pop(request_id, None)
        return self.pipeline.cancel(request_id)

    def job_done(self, stats: JobStats) -> None:
        self.metrics.streams.inc(outcome="done")
        self.metrics.audio.inc(stats.audio_ms / 1000)
        if stats.ttfa_ms is not None:
            self.metrics.ttfa.observe(stats.ttfa_ms / 1000)
        if stats.rtf is not None:
            self.metrics.rtf.observe(stats.rtf)

    # -- WebSocket ------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        conn = Connection(self, ws)
        same_ip = sum(c.address == conn.address for c in self.connections)
        if (
            self.draining
            or len(self.connections) >= self.config.max_connections
            or same_ip >= self.config.max_connections_per_ip
        ):
            why = "server shutting down" if self.draining else "too many connections"
            await ws.send(
                json.dumps({"type": "error", "id": None, "code": "limit", "message": why})
            )
            self.metrics.errors.inc(code="limit")
            await ws.close(CLOSE_TRY_AGAIN, why)
            return
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    # -- HTTP -----------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: HttpRequest) -> Response | None:
        path, _, query = request.path.partition("?")
        if path == PATH:
            return self._check_access(connection, request, query)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return _response(HTTPStatus.NOT_FOUND, f"WebSocket endpoint is {PATH}\n")
        if path == "/healthz":
            body = {
                "status": "draining" if self.draining else "ok",
                "model": self.engine.name,
                "device": str(self.engine.device),
                "connections": len(self.connections),
                "streams": sum(len(c.jobs) for c in self.connections),
                "uptime_s": round(time.time() - self.started_at, 1),
            }
            return _response(HTTPStatus.OK, json.dumps(body), "application/json")
        if path == "/metrics":
            return _response(
                HTTPStatus.OK, self.metrics.registry.render(), "text/plain; version=0.0.4"
            )
        if path in ("/", "/index.html"):
            page = _browser_file("/index.html")
            return page or _response(HTTPStatus.NOT_FOUND, "the browser client is not installed\n")
        return _browser_file(path) or _response(HTTPStatus.NOT_FOUND, "not found\n")

    def _check_access(
        self, connection: ServerConnection, request: HttpRequest, query: str
    ) -> Response | None:
        cfg = self.config
        if cfg.allowed_origins is not None:
            origin = request.headers.get("Origin")
            if origin is not None and origin not in cfg.allowed_origins:
                return _response(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        if cfg.token is not None:
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = auth[len("Bearer ") :]
            else:
                given = parse_qs(query).get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), cfg.token.encode()):
                return _response(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        return None


def _browser_file(path: str) -> Response | None:
    """``/NAME.EXT``: the file NAME.EXT directly inside BROWSER_DIR, if it has one of the
    BROWSER_TYPES extensions; None otherwise (no subfolders, nothing outside the folder)."""
    match = _BROWSER_NAME.fullmatch(path)
    if match is None or Path(match[1]).suffix not in BROWSER_TYPES:
        return None
    folder = BROWSER_DIR.resolve()
    file = (folder / match[1]).resolve()  # a link must stay inside, with an allowed type
    content_type = BROWSER_TYPES.get(file.suffix)
    if file.parent != folder or content_type is None or not file.is_file():
        return None
    try:
        body = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    response = _response(HTTPStatus.OK, body, content_type)
    response.headers["X-Content-Type-Options"] = "nosniff"
    if file.suffix == ".html":
        response.headers["Content-Security-Policy"] = BROWSER_CSP
    return response


def _response(status: HTTPStatus, body: str, content_type: str = "text/plain") -> Response:
    data = body.encode("utf-8")
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(data))
    headers["Cache-Control"] = "no-store"
    return Response(status.value, status.phrase, headers, data)
