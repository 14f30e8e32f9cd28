"""The server: one ASGI application, and the runner that serves it with uvicorn.

Routes (``docs/protocol.md``, ``docs/http.md``):

* ``/v1/tts``: the streaming WebSocket protocol v1 (:mod:`.websocket`);
* ``POST /v1/audio/speech``: OpenAI-compatible speech, streamed (:mod:`.speech`);
* ``GET /v1/voices``, ``POST``/``DELETE /v1/voices/{name}``: the voices (:mod:`.voices`);
* ``GET /healthz``: the engine's state, as JSON; ``GET /metrics``: Prometheus text;
* ``GET /`` and ``/NAME.EXT``: the browser client (:mod:`.static`).

:func:`create_app` builds the application around a :class:`~.service.Service`; its lifespan
starts and stops the engine's pipeline, so any ASGI host can run it. :class:`Server` runs it
with uvicorn on one port, and on SIGTERM drains before uvicorn closes the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute

from ..config import ServerConfig
from ..engine import Engine
from ..protocol import PATH, ProtocolLimits
from ..text.segmenter import SegmenterConfig
from .metrics import CONTENT_TYPE
from .service import Service
from .speech import speech
from .static import BrowserFiles
from .voices import VoiceRegistry, add_voice, list_voices, remove_voice
from .websocket import tts_socket

log = logging.getLogger(__name__)

_NO_STORE = {"Cache-Control": "no-store"}


def create_app(service: Service) -> Starlette:
    """The ASGI application serving ``service``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await service.drain(0.0)
            await service.close()

    app = Starlette(
        routes=[
            WebSocketRoute(PATH, tts_socket),
            Route("/v1/audio/speech", speech, methods=["POST"]),
            Route("/v1/voices", list_voices, methods=["GET"]),
            Route("/v1/voices/{name:path}", add_voice, methods=["POST"]),
            Route("/v1/voices/{name:path}", remove_voice, methods=["DELETE"]),
            Route("/healthz", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Mount("/", BrowserFiles()),
        ],
        lifespan=lifespan,
    )
    app.state.service = service
    return app


async def health(request: Request) -> Response:
    service: Service = request.app.state.service
    return JSONResponse(service.health(), headers=_NO_STORE)


async def metrics(request: Request) -> Response:
    service: Service = request.app.state.service
    return Response(service.metrics.render(), media_type=CONTENT_TYPE, headers=_NO_STORE)


class Server:
    """The application on uvicorn, on ``config.host:config.port`` (port 0: a free one)."""

    def __init__(
        self,
        engine: Engine,
        config: ServerConfig | None = None,
        limits: ProtocolLimits | None = None,
        voices: VoiceRegistry | None = None,
        segmenting: SegmenterConfig | None = None,
    ) -> None:
        self.service = Service(engine, config, limits, voices, segmenting)
        self.config = self.service.config
        self.app = create_app(self.service)
        self.sockets: list[socket.socket] = []
        self._uvicorn: uvicorn.Server | None = None
        self._main: asyncio.Task[None] | None = None

    @classmethod
    async def start_local(
        cls, model: str, device: str | None = None, dtype: str | None = None
    ) -> Server:
        """Load ``model`` and serve it on a free loopback port, in this process (for ``say``
        and the examples when no server is given); :attr:`url` is where."""
        engine = Engine.load(model, device=device, dtype=dtype)
        server = cls(engine, ServerConfig(host="127.0.0.1", port=0))
        await server.start()
        return server

    @property
    def url(self) -> str:
        """The WebSocket URL of a started server (``ws://HOST:PORT``)."""
        return f"ws://{self.config.host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.host, cfg.port))
        sock.listen(2048)
        sock.setblocking(False)
        self.sockets = [sock]
        uv_config = uvicorn.Config(
            self.app,
            ws="websockets-sansio",
            ws_max_size=cfg.max_message_bytes,
            lifespan="on",
            log_config=None,
            access_log=False,
            proxy_headers=bool(cfg.forwarded_allow_ips),
            forwarded_allow_ips=list(cfg.forwarded_allow_ips),
            server_header=False,
            headers=[("server", "stream-engine")],
            timeout_graceful_shutdown=5,
        )
        uv_config.load()
        server = uvicorn.Server(uv_config)
        server.lifespan = uv_config.lifespan_class(uv_config)
        await server.startup(sockets=self.sockets)
        if server.should_exit:
            raise RuntimeError("the server did not start")
        self._uvicorn = server
        self._main = asyncio.create_task(server.main_loop())
        log.info(
            "serving %s on ws://%s:%d%s and http://%s:%d/v1/audio/speech",
            self.service.engine.name,
            cfg.host,
            self.port,
            PATH,
            cfg.host,
            self.port,
        )

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; give open streams ``timeout`` seconds to finish (default: the
        config's ``shutdown_timeout_s``); cancel the rest; stop the engine's pipeline."""
        server, self._uvicorn = self._uvicorn, None
        if server is None:
            return
        for listener in server.servers:
            listener.close()  # no new connections; the open ones go on
        await self.service.drain(timeout)
        server.should_exit = True
        if self._main is not None:
            await self._main
        await server.shutdown(sockets=self.sockets)  # the lifespan stops the pipeline

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
