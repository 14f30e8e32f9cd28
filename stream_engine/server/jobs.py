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
from ..audio.splice import Splicer
from ..bark.prompts import VoicePrompt
from ..config import GenerationOptions
from ..engine import Engine
from ..errors import InternalError
from ..protocol import Session, StreamSpec
from ..runtime.request import Request, Status
from ..text.segmenter import Segmenter, SegmenterConfig


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
    voice: VoicePrompt | None  # the prompt of spec.voice, looked up when the stream opened
    session: Session
    submit: Callable[[Job, Request], None]  # hands a request to the engine's pipeline
    cancel: Callable[[int], bool]  # takes one out
    continuity: bool = True
    preview_frames: int = 0  # early audio: frames between previews (0: the stream's choice off)
    on_done: Callable[[JobStats], None] | None = None
    segmenting: SegmenterConfig | None = None  # how text is cut (None: the defaults)
    segmenter: Segmenter = field(init=False)
    encoder: Encoder = field(init=False)
    requests: dict[int, Request] = field(default_factory=dict)  # index -> not yet sent
    texts: dict[int, str] = field(default_factory=dict)
    # early audio: the newest preview of a segment not yet next in line; segments partly sent
    previews: dict[int, Request] = field(default_factory=dict)
    partial: dict[int, Splicer] = field(default_factory=dict)
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
        self.segmenter = Segmenter(self.engine.count_tokens, self.segmenting)
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
        self.previews.clear()
        self.partial.clear()
        self.last = None

    def _start(self, segments: list[str]) -> list[Request]:
        started = []
        for text in segments:
            if self.closed:
                break
            index = self.created
            options = self._options(index)
            after = self.last if self.continuity else None
            req = self.engine.request(text, self.voice, options, after=after)
            if self.spec.early_audio and self.sent == self.created and self.preview_frames:
                # every earlier segment has gone out: the listener will wait for this one
                req.preview_frames = self.preview_frames
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
        if req.preview_of is not None:
            if req.status is Status.FINISHED:  # a failed preview: the segment still comes
                self._preview(req)
            return
        if req.status is not Status.FINISHED:
            self.fail(req.error or InternalError("segment failed"))
            return
        while self.sent in self.requests and self.requests[self.sent].status is Status.FINISHED:
            self._send_segment(self.sent, self.requests.pop(self.sent))
            self.previews.pop(self.sent, None)
            self.sent += 1
        waiting = self.previews.pop(self.sent, None)
        if waiting is not None:
            self._send_preview(self.sent, waiting)
        self._maybe_done()

    def _preview(self, preview: Request) -> None:
        """Early audio of a segment: send it now if the segment is next in line, else keep it."""
        index = next((i for i, r in self.requests.items() if r is preview.preview_of), None)
        if index is None:
            return  # the segment itself has gone out already
        if index == self.sent:
            self._send_preview(index, preview)
        else:
            self.previews[index] = preview  # a newer preview replaces an older one

    def fail(self, exc: BaseException) -> None:
        if self.closed:
            return
        self.failed = True
        self.session.fail(self.spec.stream, exc)
        self.stop()

    def _send_preview(self, index: int, preview: Request) -> None:
        assert preview.audio is not None
        splicer = self.partial.get(index)
        if splicer is None:
            splicer = self.partial[index] = Splicer()
            self.session.segment(self.spec.stream, index, self.texts[index])
        self._send_audio(index, self.encoder.encode(splicer.piece(preview.audio)))

    def _send_segment(self, index: int, req: Request) -> None:
        stream = self.spec.stream
        assert req.audio is not None
        text = self.texts.pop(index)
        splicer = self.partial.pop(index, None)
        if splicer is None:
            self.session.segment(stream, index, text)
            audio = req.audio
        else:  # early audio went out: the rest, faded in from where it stopped
            audio = splicer.last(req.audio)
        self._send_audio(index, self.encoder.encode(audio) + self.encoder.end_segment())
        ms = self.encoder.last_segment.ms
        self.audio_ms += ms
        self.session.segment_end(stream, index, ms)

    def _send_audio(self, index: int, payloads: list[bytes]) -> None:
        if payloads and self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()
        for p in payloads:
            self.session.audio(self.spec.stream, index, p)

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
