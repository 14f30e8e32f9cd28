"""The server's state, shared by its endpoints: the engine's pipeline, the open clients, the
metrics, the voices, and the rules of access.

The model runs in the pipeline's worker threads (:mod:`stream_engine.runtime.pipeline`); their
finished requests are handed to the event loop with ``call_soon_threadsafe`` and delivered to
the connection whose stream they belong to, so nothing here blocks the loop on the model and
nothing in the workers touches a socket.

The ASGI application (:mod:`.app`) calls :meth:`Service.start` and :meth:`Service.close` from its
lifespan; whoever runs it calls :meth:`Service.drain` before the transport shuts down.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import ServerConfig
from ..engine import Engine
from ..errors import LimitExceeded
from ..protocol import ProtocolLimits
from ..runtime.pipeline import Pipeline
from ..runtime.request import Request
from ..text.segmenter import SegmenterConfig
from .connection import Connection, ConnectionContext
from .jobs import Job
from .metrics import Live, Metrics
from .voices import VoiceRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Denied:
    """Why a request may not reach an endpoint: an HTTP status and a message."""

    status: int
    message: str


class Service:
    def __init__(
        self,
        engine: Engine,
        config: ServerConfig | None = None,
        limits: ProtocolLimits | None = None,
        voices: VoiceRegistry | None = None,
        segmenting: SegmenterConfig | None = None,
    ) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.limits = limits or ProtocolLimits()
        self.voices = voices or VoiceRegistry(
            engine, self.config.voices_dir, dict(self.config.voice_aliases)
        )
        self.pipeline = Pipeline(engine.runtime, self._final_from_worker, device=engine.device)
        self.owners: dict[int, tuple[Connection, Job]] = {}  # request id -> its stream's job
        self.connections: set[Connection] = set()  # WebSocket clients
        self.speeches: set[Connection] = set()  # speech requests in flight
        self.metrics = Metrics(
            Live(
                connections=lambda: len(self.connections),
                streams=lambda: sum(len(c.jobs) for c in self.clients),
                depths=lambda: {n: w for n, (w, _) in engine.runtime.depths().items()},
                mode=engine.decode_mode,
                eager_steps=engine.eager_steps,
            )
        )
        self.name = self.config.server_name or f"{socket.gethostname()}-{os.getpid()}"
        self.context = ConnectionContext(
            self.name,
            engine,
            self.voices.prompts,
            self.limits,
            segmenting or SegmenterConfig(),
            self.config,
            self.metrics,
            self._submit,
            self.cancel,
        )
        self.started_at = time.time()
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def clients(self) -> set[Connection]:
        return self.connections | self.speeches

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the pipeline; its results come back on the running loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.engine.runtime.observers.append(self.metrics.step)
        self.pipeline.start()

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new clients; give open streams ``timeout`` seconds to finish (default: the
        config's ``shutdown_timeout_s``); cancel the rest and close every client."""
        timeout = self.config.shutdown_timeout_s if timeout is None else timeout
        self.draining = True
        deadline = time.monotonic() + timeout
        await asyncio.gather(*(c.shutdown(deadline) for c in self.clients))

    async def close(self) -> None:
        """Stop the pipeline (after :meth:`drain`)."""
        self.draining = True
        if self._loop is None:
            return
        await asyncio.to_thread(self.pipeline.stop, 30.0)
        if self.metrics.step in self.engine.runtime.observers:
            self.engine.runtime.observers.remove(self.metrics.step)
        self._loop = None

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.draining else "ok",
            "server": self.name,
            "model": self.engine.name,
            "device": str(self.engine.device),
            "engine": self.engine.decode_mode(),
            "connections": len(self.connections),
            "streams": sum(len(c.jobs) for c in self.clients),
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    # -- access ---------------------------------------------------------------------------

    def check_access(
        self, headers: Mapping[str, str], query_token: str | None = None
    ) -> Denied | None:
        """The origin allow-list and the bearer token (``Authorization: Bearer``; WebSocket
        clients in a browser may pass ``?token=`` instead, as ``query_token``)."""
        cfg = self.config
        if cfg.allowed_origins is not None:
            origin = headers.get("origin")
            if origin is not None and origin not in cfg.allowed_origins:
                return Denied(403, "origin not allowed")
        if cfg.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme != "Bearer":
                given = query_token or ""
            if not hmac.compare_digest(given.encode(), cfg.token.encode()):
                return Denied(401, "missing or wrong token")
        return None

    def admit(self, address: str | None, websocket: bool) -> LimitExceeded | None:
        """Why a new client must wait (None: it may come in)."""
        cfg = self.config
        if self.draining:
            return LimitExceeded("server shutting down")
        if len(self.connections) + len(self.speeches) >= cfg.max_connections:
            return LimitExceeded("too many connections")
        per_ip = cfg.max_connections_per_ip
        if (
            websocket
            and per_ip is not None
            and sum(c.address == address for c in self.connections) >= per_ip
        ):
            return LimitExceeded("too many connections from this address")
        return None

    # -- the engine's requests ------------------------------------------------------------

    def _submit(self, conn: Connection, job: Job, req: Request) -> None:
        self.owners[req.id] = (conn, job)
        try:
            self.pipeline.submit(req)
        except BaseException:
            self.owners.pop(req.id, None)
            raise

    def cancel(self, request_id: int) -> bool:
        self.owners.pop(request_id, None)
        return self.pipeline.cancel(request_id)

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
