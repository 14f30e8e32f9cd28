"""One WebSocket client: the protocol session, its stream jobs, and a bounded send queue.

The reader loop feeds frames to the :class:`~stream_engine.protocol.Session` and acts on the
events it returns; a sender task writes the session's output to the socket. Audio the client
has not read yet is counted: over ``max_unsent_bytes`` the client is too slow and is
disconnected with close code 1008, without slowing anyone else down (the engine never waits
for a socket).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..errors import InternalError, StreamEngineError
from ..protocol import AppendText, Event, FlushStream, OpenStream, Session
from ..runtime.request import Request
from .jobs import Job, JobStats

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger(__name__)

CLOSE_TOO_SLOW = 1008  # policy violation: the client does not read its audio
CLOSE_TRY_AGAIN = 1013  # too many connections
CLOSE_GOING_AWAY = 1001  # server shutting down


class Connection:
    def __init__(self, server: Server, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.session = Session(
            model=server.engine.name,
            voices=sorted(server.engine.voices),
            sample_rate=server.engine.sample_rate,
            limits=server.limits,
        )
        self.jobs: dict[int, Job] = {}
        self.frames: deque[str | bytes] = deque()
        self.unsent = 0  # bytes queued for the socket, not yet written
        self.wakeup = asyncio.Event()
        self.closing = False

    @property
    def address(self) -> str:
        addr = self.ws.remote_address
        return str(addr[0]) if addr else "?"

    # -- the reader loop ------------------------------------------------------------------

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        self.pump()
        try:
            async for frame in self.ws:
                now = time.monotonic()
                if isinstance(frame, str):
                    events = self.session.receive_text(frame, now)
                else:
                    events = self.session.receive_bytes(frame, now)
                for event in events:
                    self.act(event)
                self.pump()
        except ConnectionClosed:
            pass
        finally:
            for event in self.session.close():
                self.act(event)
            sender.cancel()

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
                self.server.metrics.streams.inc(outcome="cancelled")
        except StreamEngineError as exc:
            self._fail(event, exc)
        except Exception:  # a bug: this stream fails, the connection goes on
            log.exception("stream %s failed", getattr(event, "stream", "?"))
            self._fail(event, InternalError("internal error"))
        self._reap()

    def _open(self, event: OpenStream) -> None:
        job = Job(
            event.spec,
            self.server.engine,
            self.session,
            submit=self._submit,
            cancel=self.server.cancel,
            continuity=self.server.config.continuity,
            preview_frames=self.server.config.early_audio_frames,
            on_done=self.server.job_done,
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
        self.server.metrics.streams.inc(outcome="error")

    def _submit(self, job: Job, req: Request) -> None:
        self.server.owners[req.id] = (self, job)
        try:
            self.server.pipeline.submit(req)
        except BaseException:
            self.server.owners.pop(req.id, None)
            raise

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
                self.server.metrics.streams.inc(outcome="error")

    # -- sending --------------------------------------------------------------------------

    def pump(self) -> None:
        """Move the session's output into the send queue; drop a client that cannot keep up."""
        for frame in self.session.data_to_send():
            if isinstance(frame, str) and frame.startswith('{"type":"error"'):
                code = json.loads(frame).get("code", "internal")
                self.server.metrics.errors.inc(code=str(code))
            self.frames.append(frame)
            self.unsent += len(frame)
        if self.unsent > self.server.config.max_unsent_bytes and not self.closing:
            log.warning(
                "client %s too slow: %d bytes unsent; disconnecting", self.address, self.unsent
            )
            self.server.metrics.slow_clients.inc()
            self.abort(CLOSE_TOO_SLOW, "client too slow: audio not read")
        if self.frames:
            self.wakeup.set()

    def abort(self, code: int, reason: str) -> None:
        """Close the connection now: stop every stream, drop what was not sent."""
        self.closing = True
        for event in self.session.close():
            self.act(event)
        self.frames.clear()
        self.unsent = 0
        asyncio.get_running_loop().create_task(self.ws.close(code, reason))

    async def _send_loop(self) -> None:
        try:
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                while self.frames:
                    frame = self.frames.popleft()
                    await self.ws.send(frame)
                    self.unsent = max(0, self.unsent - len(frame))
        except ConnectionClosed:
            pass

    async def drain(self) -> None:
        """Wait until everything queued so far was handed to the socket."""
        while self.frames and not self.closing:
            await asyncio.sleep(0.01)


__all__ = ["CLOSE_GOING_AWAY", "CLOSE_TOO_SLOW", "CLOSE_TRY_AGAIN", "Connection", "JobStats"]
