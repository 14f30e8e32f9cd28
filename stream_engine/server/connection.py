"""One client of protocol v1: its session, its stream jobs, and a bounded send queue.

A :class:`Connection` knows nothing of the transport. A driver feeds it the client's frames
(:meth:`Connection.receive`), runs :meth:`Connection.send_loop` with a function that writes one
frame, and calls :meth:`Connection.closed` when the transport is gone. The WebSocket endpoint
(:mod:`.websocket`) is one driver; the OpenAI-compatible speech endpoint (:mod:`.speech`) is
another, which reads the same frames and writes them into an HTTP body.

Everything sent goes through the :class:`~stream_engine.protocol.Session`, errors included.
Audio the client has not read yet is counted: over ``max_unsent_bytes`` the client is too slow
and is disconnected with close code 1008, without slowing anyone else down (the engine never
waits for a socket).

A connection sees the server through a :class:`ConnectionContext`: submit and cancel requests,
the limits and settings, the metrics. It never holds the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from ..bark.prompts import VoicePrompt
from ..config import ServerConfig
from ..engine import Engine
from ..errors import Cancelled, InternalError, StreamEngineError, UnknownVoice
from ..protocol import AppendText, Event, FlushStream, OpenStream, ProtocolLimits, Session
from ..runtime.request import Request
from ..text.segmenter import SegmenterConfig
from .jobs import Job, JobStats
from .metrics import Metrics

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001  # server shutting down
CLOSE_TOO_SLOW = 1008  # policy violation: the client does not read its audio
CLOSE_TRY_AGAIN = 1013  # too many connections, or shutting down

Frame = str | bytes


@dataclass(frozen=True)
class ConnectionContext:
    """What a connection may use of the server."""

    server: str  # this server's name (a replica's id): in every hello
    engine: Engine  # names the model and its rate; builds each segment's request
    voices: Mapping[str, VoicePrompt]  # the voices offered now (built in and added)
    limits: ProtocolLimits
    segmenting: SegmenterConfig  # how each stream's text is cut into segments
    config: ServerConfig  # continuity, early_audio_frames, max_unsent_bytes
    metrics: Metrics
    submit: Callable[[Connection, Job, Request], None]  # to the pipeline; raises Busy
    cancel: Callable[[int], bool]  # take a request out of the pipeline


class Connection:
    def __init__(
        self,
        ctx: ConnectionContext,
        address: str,
        close: Callable[[int, str], Coroutine[Any, Any, None]],
    ) -> None:
        """``close(code, reason)`` ends the transport (a WebSocket close code)."""
        self.ctx = ctx
        self.address = address
        self._close = close
        self.session = Session(
            model=ctx.engine.name,
            voices=ctx.voices.keys(),
            sample_rate=ctx.engine.sample_rate,
            limits=ctx.limits,
            server=ctx.server,
        )
        self.jobs: dict[int, Job] = {}
        self.frames: deque[Frame] = deque()
        self.unsent = 0  # bytes queued for the transport, not yet written
        self.wakeup = asyncio.Event()
        self.closing = False
        self._closer: asyncio.Task[None] | None = None

    # -- the client's frames --------------------------------------------------------------

    def receive(self, frame: Frame) -> None:
        now = time.monotonic()
        if isinstance(frame, str):
            events = self.session.receive_text(frame, now)
        else:
            events = self.session.receive_bytes(frame, now)
        for event in events:
            self.act(event)
        self.pump()

    def act(self, event: Event) -> None:
        """Do what one protocol event asks."""
        try:
            if isinstance(event, OpenStream):
                self._open(event)
            elif (job := self.jobs.get(event.stream)) is None:
                pass  # already ended on our side (e.g. failed); the session knows
            elif isinstance(event, AppendText):
                job.add_text(event.text, event.final)
            elif isinstance(event, FlushStream):
                job.flush()
            else:  # CancelStream
                del self.jobs[event.stream]
                job.stop()
                self.ctx.metrics.streams.labels("cancelled").inc()
        except StreamEngineError as exc:
            self._fail(event, exc)
        except Exception:  # a bug: this stream fails, the connection goes on
            log.exception("stream %s failed", getattr(event, "stream", "?"))
            self._fail(event, InternalError("internal error"))
        self._reap()

    def _open(self, event: OpenStream) -> None:
        ctx = self.ctx
        name = event.spec.voice
        if name is not None and name not in ctx.voices:  # deleted since the hello
            raise UnknownVoice(f"unknown voice {name!r}")
        job = Job(
            event.spec,
            ctx.engine,
            None if name is None else ctx.voices[name],
            self.session,
            submit=self._submit,
            cancel=ctx.cancel,
            continuity=ctx.config.continuity,
            preview_frames=ctx.config.early_audio_frames,
            on_done=self._done,
            segmenting=ctx.segmenting,
        )
        self.jobs[event.spec.stream] = job
        job.add_text(event.text, event.final)

    def _fail(self, event: Event, exc: StreamEngineError) -> None:
        stream = event.spec.stream if isinstance(event, OpenStream) else event.stream
        job = self.jobs.pop(stream, None)
        if job is not None:
            job.fail(exc)
        else:
            self.session.fail(stream, exc)
        self.ctx.metrics.streams.labels("error").inc()

    def _submit(self, job: Job, req: Request) -> None:
        self.ctx.submit(self, job, req)

    def _done(self, stats: JobStats) -> None:
        self.ctx.metrics.stream_done(stats.audio_ms, stats.ttfa_ms, stats.rtf)

    # -- results from the engine (on the event loop) --------------------------------------

    def deliver(self, job: Job, req: Request) -> None:
        try:
            job.finished(req)
        except Exception:
            log.exception("delivering request %d failed", req.id)
            job.fail(InternalError("internal error"))
        self._reap()
        self.pump()

    def _reap(self) -> None:
        for stream in [s for s, j in self.jobs.items() if j.closed]:
            job = self.jobs.pop(stream)
            if job.failed:
                self.ctx.metrics.streams.labels("error").inc()

    # -- sending --------------------------------------------------------------------------

    def pump(self) -> None:
        """Move the session's output into the send queue; drop a client that cannot keep up."""
        for code in self.session.take_errors():
            self.ctx.metrics.errors.labels(code).inc()
        for frame in self.session.data_to_send():
            self.frames.append(frame)
            self.unsent += len(frame)
        if self.unsent > self.ctx.config.max_unsent_bytes and not self.closing:
            log.warning(
                "client %s too slow: %d bytes unsent; disconnecting", self.address, self.unsent
            )
            self.ctx.metrics.slow_clients.inc()
            self.abort(CLOSE_TOO_SLOW, "client too slow: audio not read")
        if self.frames:
            self.wakeup.set()

    def abort(self, code: int, reason: str) -> None:
        """Close the connection now: stop every stream, drop what was not sent."""
        self.closing = True
        self.closed()
        self.frames.clear()
        self.unsent = 0
        self.wakeup.set()
        if self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self._close(code, reason))

    def closed(self) -> None:
        """The transport is gone (or going): every open stream stops."""
        for event in self.session.close():
            self.act(event)

    async def send_loop(self, send: Callable[[Frame], Awaitable[None]]) -> None:
        """Write queued frames with ``send`` until the connection closes or ``send`` raises."""
        while not self.closing:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.frames and not self.closing:
                frame = self.frames.popleft()
                await send(frame)
                self.unsent = max(0, self.unsent - len(frame))

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until everything queued so far was written."""
        deadline = time.monotonic() + timeout
        while self.frames and not self.closing and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # -- server shutdown ------------------------------------------------------------------

    async def shutdown(self, deadline: float) -> None:
        """Let streams whose text is complete finish until ``deadline`` (``time.monotonic``);
        cancel the rest, send what is queued, and close with 1001.

        A stream still waiting for text is cancelled once the complete ones are done: it could
        hold the drain forever.
        """
        while not self.closing and time.monotonic() < deadline:
            if not any(j.final for j in self.jobs.values()):
                break
            await asyncio.sleep(0.05)
        for stream in list(self.jobs):
            self.jobs.pop(stream).stop()
            self.session.fail(stream, Cancelled("server shutting down"))
            self.ctx.metrics.streams.labels("cancelled").inc()
        self.pump()
        await self.drain(2.0)
        if self._closer is None and not self.closing:
            self.closing = True
            self.wakeup.set()
            self._closer = asyncio.get_running_loop().create_task(
                self._close(CLOSE_GOING_AWAY, "server shutting down")
            )
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._closer), 5.0)


__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_TOO_SLOW",
    "CLOSE_TRY_AGAIN",
    "Connection",
    "ConnectionContext",
    "Frame",
]
