"""A Python client for protocol v1 (``docs/protocol.md``), on websockets' asyncio API.

Streams, several at once on one connection::

    async with connect("ws://127.0.0.1:8765", token=None) as conn:
        stream = await conn.speak(voice="v2/en_speaker_6", format="pcm_f32le")
        await stream.send("Hello there. ")          # opens the stream (its first speak)
        await stream.send("How are you?")
        await stream.end()                           # final: no more text
        async for chunk in stream:                   # audio as each piece arrives
            play(chunk.audio)                        # float32 numpy
        print(stream.stats)                          # Done(audio_ms, ttfa_ms, rtf)

    audio, rate = await conn.say("One call, the whole utterance.")

The protocol itself is :class:`~stream_engine.protocol.ClientSession`'s (the sans-I/O client
core): it builds every message, reads every frame into typed events and checks the server
against ``docs/protocol.md``. This module is its asyncio driver: one reader task per connection
feeds it every frame and routes the events to their streams; a frame that breaks the protocol
closes the connection (1002). Each stream has a bounded queue; a
stream whose chunks nobody reads fills its queue and then holds up the reader, and so every
other stream of the connection (and at last the server drops the connection as a slow
reader): read every stream you open, or cancel it. An ``error`` for a stream is raised from
its iteration (and from :meth:`Stream.send`) as :class:`~stream_engine.errors.ServerError`
with the protocol's code.

:func:`synthesize` speaks one text on a new connection. :class:`Client` is the low-level,
message-by-message client (it sends what it is told and yields every frame); the server tests
use it to send what a well-behaved client never would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Generator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from .audio.decode import OpusDecoder, decode_audio, decode_pcm
from .errors import InternalError, InvalidRequest, ServerError
from .protocol import (
    AudioReceived,
    ClientSession,
    Hello,
    SegmentEnded,
    SegmentStarted,
    Started,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
)
from .protocol.client import Event
from .protocol.wire import endpoint

__all__ = [
    "Chunk",
    "Client",
    "Connection",
    "Done",
    "Segment",
    "ServerError",
    "Stream",
    "connect",
    "decode_audio",
    "decode_pcm",
    "synthesize",
]

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 256  # items per stream: ~25 s of PCM audio at 100 ms a chunk
StreamId = str | int
Outcome = Literal["done", "cancelled", "error"]


# -- decoded results -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Chunk:
    """One binary frame of a stream, with what the client knows about it."""

    stream: int  # the stream's number (from ``started``)
    segment: int  # segment index: 0, 1, 2, ...
    seq: int  # the frame's sequence number in its stream: 0, 1, 2, ...
    text: str  # what the segment speaks
    payload: bytes  # the frame's payload as sent (PCM, μ-law bytes or one Opus packet)
    audio: npt.NDArray[np.float32] | None  # mono float32; None for Opus unless decode=True
    format: str
    sample_rate: int
    arrived: float  # time.monotonic() when the frame arrived
    elapsed: float  # seconds from the stream's opening ``speak`` to its arrival

    @property
    def duration(self) -> float:
        """Seconds of audio in this chunk (0.0 for an undecoded Opus packet)."""
        return 0.0 if self.audio is None else len(self.audio) / self.sample_rate


@dataclass(frozen=True)
class Segment:
    """A segment whose audio has ended (from ``segment_end``)."""

    index: int
    text: str
    audio_ms: float


@dataclass(frozen=True)
class Done:
    """The server's figures for a finished stream (``done``)."""

    audio_ms: float
    ttfa_ms: float | None  # server side: first text received -> first audio sent
    rtf: float | None  # synthesis time / audio time


# -- one stream ------------------------------------------------------------------------------


class Stream:
    """One utterance on a :class:`Connection`: text in with :meth:`send`, chunks out by
    ``async for``. Made by :meth:`Connection.speak`.

    The stream opens on the server with its first ``speak`` message: the first :meth:`send`,
    :meth:`end` or :meth:`open`. Iterating yields :class:`Chunk` objects in order and stops
    after the last one of a stream that ended ``done`` or ``cancelled``; an ``error`` is
    raised as :class:`ServerError`. When the server's terminal message arrives, ``outcome``
    becomes ``"done"``, ``"cancelled"`` or ``"error"`` and ``stats`` / ``error`` are set;
    ``segments`` lists each ended segment as the iteration passes its end.
    """

    def __init__(
        self,
        conn: Connection,
        id: StreamId,
        open_fields: dict[str, Any],
        decode: bool,
        queue_size: int,
    ) -> None:
        self.conn = conn
        self.id = id
        self.decode = decode
        self._open_fields = open_fields
        # what ``started`` says
        self.number: int | None = None
        self.voice: str | None = None
        self.format: str | None = None
        self.sample_rate: int | None = None
        # the outcome
        self.outcome: Outcome | None = None
        self.stats: Done | None = None
        self.error: ServerError | None = None
        self.segments: list[Segment] = []
        self.opened_at: float | None = None  # time.monotonic() of the opening speak
        self.first_audio_at: float | None = None
        # client side state
        self.opened = False
        self.final = False
        self._cancelling = False  # cancel sent (or asked for): audio is dropped from now on
        self._queue: asyncio.Queue[Chunk | SegmentEnded] = asyncio.Queue(queue_size)
        self._wakeup = asyncio.Event()
        self._ended = asyncio.Event()  # the terminal message arrived (or the connection died)
        self._started = asyncio.Event()
        self._texts: dict[int, str] = {}  # segment index -> text, as ``segment`` arrives
        self._opus: OpusDecoder | None = None
        self._raised = False

    def __repr__(self) -> str:
        return f"<Stream id={self.id!r} number={self.number} outcome={self.outcome}>"

    @property
    def ended(self) -> bool:
        """The stream is closed: its terminal message arrived (or the connection ended)."""
        return self._ended.is_set()

    @property
    def ttfa(self) -> float | None:
        """Client side time to first audio: opening ``speak`` sent -> first chunk arrived (s)."""
        if self.opened_at is None or self.first_audio_at is None:
            return None
        return self.first_audio_at - self.opened_at

    # -- text in ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the stream on the server now (an opening ``speak`` with no text)."""
        if not self.opened:
            await self._speak("", final=False)

    async def send(self, text: str, *, final: bool = False) -> None:
        """Append text (the first call opens the stream). ``final=True``: no more text.

        Raises the stream's :class:`ServerError` if it ended with one; after :meth:`cancel`
        the text is dropped; after :meth:`end` it is an :class:`InvalidRequest`.
        """
        if not isinstance(text, str):
            raise InvalidRequest(f"text must be a str, got {type(text).__name__}")
        if self.error is None and self.final and not self._cancelling:
            raise InvalidRequest(f"stream {self.id!r} has ended: no text after end()")
        if self._check_closed():
            return
        if self.opened and not text and not final:
            return
        await self._speak(text, final)

    async def end(self, text: str = "") -> None:
        """Send the last text (may be empty) with ``final``: the server finishes the stream."""
        if self.final or self._check_closed():
            return
        await self._speak(text, final=True)

    async def flush(self) -> None:
        """Ask the server to synthesize the text buffered so far, sentence finished or not."""
        if not self.opened or self.final or self._check_closed():
            return
        self.conn.session.flush(self.id)
        await self.conn._send_pending()

    async def feed(
        self,
        source: AsyncIterable[str] | Iterable[str],
        *,
        end: bool = True,
        min_interval: float = 0.02,
        flush_after: float | None = None,
    ) -> None:
        """Send text from ``source`` as it is produced (e.g. by a language model).

        Pieces that arrive while a message is on its way are joined, and messages go out at
        most every ``min_interval`` seconds, so token-by-token sources stay far below the
        server's message rate limit. ``flush_after``: when the source pauses that long with
        text still buffered, :meth:`flush` it. ``end``: send ``final`` when the source is
        exhausted. Stops early, quietly, if the stream is cancelled; raises its error if it
        fails.
        """
        pieces: asyncio.Queue[object] = asyncio.Queue()
        eof = object()

        async def produce() -> None:
            try:
                if isinstance(source, AsyncIterable):
                    async for piece in source:
                        await pieces.put(piece)
                else:
                    for piece in source:
                        await pieces.put(piece)
            except Exception as e:
                await pieces.put(e)
            else:
                await pieces.put(eof)

        producer = asyncio.create_task(produce())
        try:
            unflushed = False
            at_end = False
            while not at_end:
                try:
                    if flush_after is not None and unflushed:
                        item = await asyncio.wait_for(pieces.get(), flush_after)
                    else:
                        item = await pieces.get()
                except TimeoutError:
                    await self.flush()
                    unflushed = False
                    continue
                batch: list[str] = []
                while True:
                    if isinstance(item, Exception):
                        raise item
                    if item is eof:
                        at_end = True
                        break
                    if not isinstance(item, str):
                        raise InvalidRequest(f"feed() takes str pieces, got {type(item).__name__}")
                    batch.append(item)
                    if pieces.empty():
                        break
                    item = pieces.get_nowait()
                if batch:
                    await self.send("".join(batch))
                    unflushed = True
                if self._check_closed():
                    return
                if not at_end:
                    await asyncio.sleep(min_interval)
            if end:
                await self.end()
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    async def cancel(self) -> None:
        """Stop the stream; wait for its terminal message. Audio not yet read is dropped.

        Afterwards ``outcome`` is ``"cancelled"``, or ``"done"``/``"error"`` if that crossed
        the cancel on the wire; iterating the stream ends at once either way.
        """
        if self._cancelling or self.ended:
            self._cancelling = True
            self._drop_audio()
            return
        self._cancelling = True
        self._drop_audio()
        if not self.opened:  # nothing was sent: nothing to cancel on the server
            self.conn._forget(self)
            self._terminate("cancelled")
            return
        self.conn.session.cancel(self.id)
        await self.conn._send_pending()
        await self._ended.wait()
        self._drop_audio()

    async def _speak(self, text: str, final: bool) -> None:
        if self.conn.closed is not None:
            raise self.conn.closed
        fields = {} if self.opened else self._open_fields
        self.conn.session.speak(self.id, text, final=final, **fields)
        if not self.opened:
            self.opened = True
            self.opened_at = time.monotonic()
        if final:
            self.final = True
        await self.conn._send_pending()

    def _check_closed(self) -> bool:
        """True if text should be dropped (cancelled); raises the stream's error if it failed."""
        if self.error is not None:
            raise self.error
        return self._cancelling or self.ended

    # -- audio out -------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        while True:
            item = await self._next_item()
            if item is None:
                if self.error is not None and not self._raised and not self._cancelling:
                    self._raised = True
                    raise self.error
                raise StopAsyncIteration
            if isinstance(item, Chunk):
                if self._cancelling:
                    continue
                return item
            self.segments.append(Segment(item.index, item.text, item.audio_ms))

    async def _next_item(self) -> Chunk | SegmentEnded | None:
        while True:
            if not self._queue.empty():
                return self._queue.get_nowait()
            if self._ended.is_set():
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    async def started(self) -> None:
        """Wait for ``started`` (``number``, ``format``, ``sample_rate`` are set after it)."""
        if not self.opened and not self.ended:
            await self.open()
        await self._started.wait()  # set by ``started``, and by the end of the stream
        if self.error is not None:
            raise self.error

    async def collect(self) -> npt.NDArray[np.float32]:
        """Read the rest of the stream; return its audio as one float32 array.

        Opus streams need ``decode=True``. Raises :class:`ServerError` if the stream fails.
        """
        parts: list[npt.NDArray[np.float32]] = []
        async for chunk in self:
            if chunk.audio is None:
                raise InvalidRequest("collect() of an Opus stream needs speak(..., decode=True)")
            parts.append(chunk.audio)
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    async def wait(self) -> Done | None:
        """Read (and drop) the rest of the stream; return its stats (None if cancelled)."""
        async for _ in self:
            pass
        return self.stats

    def _drop_audio(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._wakeup.set()

    # -- called by the connection's reader -------------------------------------------------

    def _on_started(self, started: Started) -> None:
        self.number = started.stream
        self.voice = started.voice
        self.format = started.format
        self.sample_rate = started.sample_rate
        if self.format == "opus" and self.decode:
            self._opus = OpusDecoder(self.sample_rate)
        self._started.set()

    def _make_chunk(self, segment: int, seq: int, payload: bytes) -> Chunk:
        assert self.number is not None and self.format is not None
        assert self.sample_rate is not None
        now = time.monotonic()
        if self.first_audio_at is None:
            self.first_audio_at = now
        audio: npt.NDArray[np.float32] | None
        if self.format == "opus":
            audio = None if self._opus is None else self._opus.decode(payload)
        else:
            audio = decode_audio(payload, self.format)
        opened = now if self.opened_at is None else self.opened_at
        return Chunk(
            self.number,
            segment,
            seq,
            self._texts.get(segment, ""),
            payload,
            audio,
            self.format,
            self.sample_rate,
            now,
            now - opened,
        )

    async def _put(self, item: Chunk | SegmentEnded) -> None:
        if self._cancelling or self.conn._closing:
            return
        await self._queue.put(item)
        self._wakeup.set()

    def _terminate(self, outcome: Outcome, done: StreamDone | None = None) -> None:
        if self._ended.is_set():
            return
        self.outcome = outcome
        if done is not None:
            self.stats = Done(done.audio_ms, done.ttfa_ms, done.rtf)
        self._ended.set()
        self._started.set()
        self._wakeup.set()

    def _fail(self, error: ServerError) -> None:
        if self._ended.is_set():
            return
        self.error = error
        self._terminate("error")


# -- one connection --------------------------------------------------------------------------


class Connection:
    """A connection to the server; any number of :class:`Stream` objects at once.

    Made by :func:`connect`. ``hello`` is the server's hello message; ``voices``,
    ``formats``, ``sample_rates`` and ``limits`` come from it. ``errors`` collects error
    messages about no stream (``"id": null``).
    """

    def __init__(
        self,
        ws: ClientConnection,
        session: ClientSession,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        assert session.hello is not None
        self.ws = ws
        self.session = session
        self.hello = session.hello.message
        self.queue_size = queue_size
        self.errors: list[ServerError] = []
        self.closed: ServerError | None = None  # set when the connection has ended
        self._closing = False
        self._by_id: dict[StreamId, Stream] = {}
        self._ids = itertools.count(1)
        self._reader = asyncio.create_task(self._read(), name="stream-engine client reader")

    @property
    def voices(self) -> list[str]:
        return list(self.hello.get("voices", []))

    @property
    def formats(self) -> list[str]:
        return list(self.hello.get("formats", []))

    @property
    def sample_rates(self) -> dict[str, list[int]]:
        return dict(self.hello.get("sample_rates", {}))

    @property
    def limits(self) -> dict[str, Any]:
        return dict(self.hello.get("limits", {}))

    @property
    def streams(self) -> list[Stream]:
        """Streams open (or about to open) on this connection."""
        return list(self._by_id.values())

    async def speak(
        self,
        text: str = "",
        *,
        final: bool = False,
        voice: str | None = None,
        format: str | None = None,
        sample_rate: int | None = None,
        options: dict[str, Any] | None = None,
        decode: bool = False,
        id: StreamId | None = None,
        early_audio: bool = False,
    ) -> Stream:
        """A new stream. With ``text`` or ``final`` it opens at once; else with its first
        :meth:`Stream.send`. ``None`` leaves a field to the server's default (``hello``).
        ``decode``: decode Opus packets to float32 in ``Chunk.audio`` (needs ``opuslib``).
        ``id``: the stream's protocol id (default: a fresh one). ``early_audio``: audio of a
        segment may start before the segment is generated whole (docs/protocol.md)."""
        if self.closed is not None:
            raise self.closed
        if id is None:
            id = next(i for i in (f"s{n}" for n in self._ids) if i not in self._by_id)
        elif isinstance(id, bool) or not isinstance(id, str | int):
            raise InvalidRequest(f"a stream id is a str or an int, got {id!r}")
        elif id in self._by_id:
            raise InvalidRequest(f"stream id {id!r} is in use on this connection")
        fields: dict[str, Any] = {}
        for key, value in (
            ("voice", voice),
            ("format", format),
            ("sample_rate", sample_rate),
            ("options", options),
            ("early_audio", early_audio or None),
        ):
            if value is not None:
                fields[key] = value
        stream = Stream(self, id, fields, decode, self.queue_size)
        self._by_id[id] = stream
        if text or final:
            await stream.send(text, final=final)
        return stream

    async def say(
        self,
        text: str,
        *,
        voice: str | None = None,
        format: str = "pcm_f32le",
        sample_rate: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[npt.NDArray[np.float32], int]:
        """Speak ``text``; return (float32 audio, sample rate) when the stream is done."""
        stream = await self.speak(
            text,
            final=True,
            voice=voice,
            format=format,
            sample_rate=sample_rate,
            options=options,
            decode=True,
        )
        audio = await stream.collect()
        if stream.sample_rate is None:
            raise InternalError("the stream ended without a sample rate")
        return audio, stream.sample_rate

    async def close(self) -> None:
        """Close the connection; streams still open end with ``connection_closed``.

        Audio nobody has read yet is dropped (so that a full queue cannot hold up the close).
        """
        self._closing = True
        for stream in self._by_id.values():
            stream._drop_audio()
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- internals -------------------------------------------------------------------------

    async def _send_pending(self) -> None:
        """Send what the protocol session has queued."""
        if self.closed is not None:
            raise self.closed
        try:
            for frame in self.session.data_to_send():
                await self.ws.send(frame)
        except ConnectionClosed as e:
            raise self._closed_error(e) from e

    def _forget(self, stream: Stream) -> None:
        if self._by_id.get(stream.id) is stream:
            del self._by_id[stream.id]

    async def _read(self) -> None:
        reason: BaseException | None = None
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    events = self.session.receive_bytes(frame)
                else:
                    events = self.session.receive_text(frame)
                for event in events:
                    await self._on_event(event)
                await self._send_pending()  # e.g. a cancel of a stream nobody wants
        except ConnectionClosed as e:
            reason = e
        except (Exception, ServerError) as e:  # a broken frame: this connection is unusable
            log.warning("stream-engine client: %s", e)
            reason = e
            await self.ws.close(1002, "protocol error")
        finally:
            self.closed = self._closed_error(reason)
            for stream in list(self._by_id.values()):
                self._forget(stream)
                stream._fail(self.closed)

    def _closed_error(self, reason: BaseException | None) -> ServerError:
        if self.closed is not None:
            return self.closed
        detail = ""
        if isinstance(reason, ConnectionClosed) and reason.rcvd is not None:
            detail = f" ({reason.rcvd.code} {reason.rcvd.reason})".rstrip()
        elif reason is not None and not isinstance(reason, ConnectionClosed):
            detail = f" ({reason})"
        elif self.ws.close_code is not None:
            detail = f" ({self.ws.close_code} {self.ws.close_reason or ''})".rstrip()
        if self.errors:
            last = self.errors[-1]
            detail += f" after {last.code}: {last.message}"
        return ServerError("connection_closed", f"the connection closed{detail}")

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, Violation):
            raise ServerError("protocol_error", f"the server broke the protocol: {event.what}")
        if isinstance(event, Hello):
            return
        stream = None if event.id is None else self._by_id.get(event.id)
        if stream is None:  # about the connection, or about a stream we no longer have
            if isinstance(event, StreamError):
                self.errors.append(ServerError(event.code, event.message, event.id))
                if event.id is not None:
                    log.warning("error for no stream of ours: %s", event)
            return
        if isinstance(event, Started):
            stream._on_started(event)
        elif isinstance(event, SegmentStarted):
            stream._texts[event.index] = event.text
        elif isinstance(event, AudioReceived):
            await stream._put(stream._make_chunk(event.segment, event.seq, event.payload))
        elif isinstance(event, SegmentEnded):
            await stream._put(event)
        else:  # the stream's end
            self._forget(stream)
            if isinstance(event, StreamError):
                stream._fail(ServerError(event.code, event.message, event.id))
            elif isinstance(event, StreamDone):
                stream._terminate("done", event)
            else:
                assert isinstance(event, StreamCancelled)
                stream._terminate("cancelled")


class _Connect:
    """What :func:`connect` returns: ``async with connect(...) as conn`` or
    ``conn = await connect(...)``."""

    def __init__(self, url: str, token: str | None, queue_size: int, kwargs: dict[str, Any]):
        self.url = url
        self.token = token
        self.queue_size = queue_size
        self.kwargs = kwargs
        self.conn: Connection | None = None

    async def _open(self) -> Connection:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        ws = await ws_connect(
            endpoint(self.url), additional_headers=headers, max_size=None, **self.kwargs
        )
        session = await handshake(ws)
        return Connection(ws, session, self.queue_size)

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._open().__await__()

    async def __aenter__(self) -> Connection:
        self.conn = await self._open()
        return self.conn

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.conn is not None:
            await self.conn.close()


async def handshake(ws: ClientConnection) -> ClientSession:
    """A protocol session for a new connection, past the server's first frame (its hello).

    Raises :class:`ServerError` if the server turns the connection away instead (``limit``).
    """
    session = ClientSession()
    try:
        session.expect_hello(await ws.recv())
    except ConnectionClosed as e:
        raise ServerError("connection_closed", "the server closed before hello") from e
    except ServerError:
        await ws.close()
        raise
    return session


def connect(
    url: str, token: str | None = None, *, queue_size: int = DEFAULT_QUEUE_SIZE, **kwargs: Any
) -> _Connect:
    """Connect to a server (``ws://HOST:PORT``, or the full ``.../v1/tts`` URL).

    ``token``: the server's bearer token. ``queue_size``: chunks buffered per stream before
    the reader waits. Other keyword arguments go to ``websockets``' ``connect`` (``origin``,
    ``open_timeout``, ...). Raises ``ServerError`` if the server turns the connection away
    (``limit``), and websockets' ``InvalidStatus`` for HTTP refusals (401, 403).
    """
    return _Connect(url, token, queue_size, kwargs)


async def synthesize(
    url: str,
    text: str,
    *,
    voice: str | None = None,
    seed: int | None = None,
    token: str | None = None,
    format: str = "pcm_f32le",
    sample_rate: int | None = None,
) -> tuple[npt.NDArray[np.float32], int]:
    """Speak ``text`` on a running server; return (float32 audio, sample rate)."""
    options = {"seed": seed} if seed is not None else None
    async with connect(url, token=token) as conn:
        return await conn.say(
            text, voice=voice, format=format, sample_rate=sample_rate, options=options
        )


# -- low level -------------------------------------------------------------------------------


class Client:
    """The low-level client: one message per call, every event as the protocol core reads it.

    async with await Client.connect("ws://127.0.0.1:8765") as c:
        await c.speak("s1", "Hello there.", final=True, voice="v2/en_speaker_6")
        async for event in c.events():
            ...  # Started, SegmentStarted, AudioReceived, SegmentEnded, StreamDone, ...

    The server tests use it: :meth:`send` sends any message as it is, even one a well-behaved
    client never would; the others go through the :class:`ClientSession`.
    """

    def __init__(self, ws: ClientConnection, session: ClientSession) -> None:
        assert session.hello is not None
        self.ws = ws
        self.session = session
        self.hello = session.hello.message

    @classmethod
    async def connect(cls, url: str, token: str | None = None, **kwargs: Any) -> Client:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await ws_connect(endpoint(url), additional_headers=headers, max_size=None, **kwargs)
        return cls(ws, await handshake(ws))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def send(self, message: dict[str, Any]) -> None:
        """Send ``message`` as it is, past the protocol core (for tests of bad input)."""
        await self.ws.send(json.dumps(message))

    async def speak(
        self,
        id: StreamId,
        text: str,
        final: bool = False,
        *,
        voice: str | None = None,
        format: str | None = None,
        sample_rate: int | None = None,
        options: dict[str, Any] | None = None,
        early_audio: bool | None = None,
    ) -> None:
        """Open stream ``id`` (first call) or append text to it."""
        self.session.speak(
            id,
            text,
            final=final,
            voice=voice,
            format=format,
            sample_rate=sample_rate,
            options=options,
            early_audio=early_audio,
        )
        await self._send_pending()

    async def flush(self, id: StreamId) -> None:
        self.session.flush(id)
        await self._send_pending()

    async def cancel(self, id: StreamId) -> None:
        self.session.cancel(id)
        await self._send_pending()

    async def events(self) -> AsyncIterator[Event]:
        """Every event of the connection, in order, until it closes."""
        async for frame in self.ws:
            if isinstance(frame, bytes):
                events = self.session.receive_bytes(frame)
            else:
                events = self.session.receive_text(frame)
            for event in events:
                yield event
            await self._send_pending()

    async def _send_pending(self) -> None:
        for frame in self.session.data_to_send():
            await self.ws.send(frame)

    async def close(self) -> None:
        await self.ws.close()
