"""One stream's job: text in, segments to the engine, encoded audio out in segment order.

A :class:`Job` belongs to one protocol stream. It owns the stream's segmenter and audio
encoder, turns completed segments into engine requests (each conditioned on the previous one
when voice continuity is on), and, as requests finish, writes the stream's messages into the
protocol session strictly in segment order. No asyncio and no sockets: the connection driver
calls it from the event loop, and the engine's final requests are handed to it there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..audio.encoders import Encoder
from ..config import GenerationOptions
from ..engine import Engine
from ..errors import InternalError
from ..protocol import Session, StreamSpec
from ..runtime.request import Request, Status
from ..text.segmenter import Segmenter


@dataclass
class JobStats:
    """What the server's metrics want to know when a job ends."""

    audio_ms: float
    ttfa_ms: float | None  # first text received -> first audio queued for the client
    rtf: float | None  # wall time (first text -> done) / audio time


@dataclass
class Job:
    spec: StreamSpec
    engine: Engine
    session: Session
    submit: Callable[[Job, Request], None]  # hands a request to the engine's pipeline
    cancel: Callable[[int], bool]  # takes one out
    continuity: bool = True
    on_done: Callable[[JobStats], None] | None = None
    segmenter: Segmenter = field(init=False)
    encoder: Encoder = field(init=False)
    requests: dict[int, Request] = field(default_factory=dict)  # index -> not yet sent
    texts: dict[int, str] = field(default_factory=dict)
    created: int = 0  # segments made so far
    sent: int = 0  # segments whose audio went out
    final: bool = False  # no more text comes
    closed: bool = False
    failed: bool = False
    started_at: float = field(default_factory=time.perf_counter)
    first_audio_at: float | None = None
    audio_ms: float = 0.0
    last: Request | None = None

    def __post_init__(self) -> None:
        self.segmenter = Segmenter(self.engine.count_tokens)
        self.encoder = Encoder(self.spec.format, self.spec.sample_rate, self.engine.sample_rate)

    # -- client side ----------------------------------------------------------------------

    def add_text(self, text: str, final: bool) -> list[Request]:
        """Feed text; submit every segment it completes. Returns the requests submitted."""
        segments = self.segmenter.push(text) if text else []
        if final:
            self.final = True
            segments += self.segmenter.end()
        return self._start(segments)

    def flush(self) -> list[Request]:
        return self._start(self.segmenter.flush())

    def stop(self) -> None:
        """Cancel everything still running (the stream is already closed in the session)."""
        self.closed = True
        for req in self.requests.values():
            self.cancel(req.id)
        self.requests.clear()
        self.last = None

    def _start(self, segments: list[str]) -> list[Request]:
        started = []
        for text in segments:
            if self.closed:
                break
            index = self.created
            options = self._options(index)
            after = self.last if self.continuity else None
            req = self.engine.request(text, self.spec.voice, options, after=after)
            self.submit(self, req)  # may raise Busy: the caller fails the stream
            self.created += 1
            self.requests[index], self.texts[index] = req, text
            self.last = req
            started.append(req)
        if not self.closed:
            self._maybe_done()
        return started

    def _options(self, index: int) -> GenerationOptions:
        o = self.spec.options
        if o.seed is None:
            return o
        return o.with_seed((o.seed + index) % 2**31)  # reproducible, but not the same noise

    # -- engine side ----------------------------------------------------------------------

    def finished(self, req: Request) -> None:
        """A request of this job became final (on the event loop)."""
        if self.closed:
            return
        if req.status is not Status.FINISHED:
            self.fail(req.error or InternalError("segment failed"))
            return
        while self.sent in self.requests and self.requests[self.sent].status is Status.FINISHED:
            self._send_segment(self.sent, self.requests.pop(self.sent))
            self.sent += 1
        self._maybe_done()

    def fail(self, exc: BaseException) -> None:
        if self.closed:
            return
        self.failed = True
        self.session.fail(self.spec.stream, exc)
        self.stop()

    def _send_segment(self, index: int, req: Request) -> None:
        stream = self.spec.stream
        assert req.audio is not None
        self.session.segment(stream, index, self.texts.pop(index))
        payloads = self.encoder.encode(req.audio) + self.encoder.end_segment()
        if payloads and self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()
        for p in payloads:
            self.session.audio(stream, index, p)
        ms = self.encoder.last_segment.ms
        self.audio_ms += ms
        self.session.segment_end(stream, index, ms)

    def _maybe_done(self) -> None:
        if not (self.final and self.sent == self.created) or self.closed:
            return
        self.closed = True
        stats = self.stats()
        self.session.done(self.spec.stream, stats.audio_ms, stats.ttfa_ms, stats.rtf)
        if self.on_done is not None:
            self.on_done(stats)

    def stats(self) -> JobStats:
        now = time.perf_counter()
        ttfa = None if self.first_audio_at is None else (self.first_audio_at - self.started_at)
        rtf = (now - self.started_at) / (self.audio_ms / 1000) if self.audio_ms > 0 else None
        return JobStats(self.audio_ms, None if ttfa is None else ttfa * 1000, rtf)
