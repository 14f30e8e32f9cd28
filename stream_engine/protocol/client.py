"""The client side of protocol v1 as a sans-I/O state machine.

One :class:`ClientSession` per connection, the mirror of the server's
:class:`~stream_engine.protocol.server.Session`. The driver tells it what the user wants
(:meth:`~ClientSession.speak`, :meth:`~ClientSession.flush`, :meth:`~ClientSession.cancel`),
sends what :meth:`~ClientSession.data_to_send` returns, feeds it every frame received
(:meth:`~ClientSession.receive_text`, :meth:`~ClientSession.receive_bytes`) and acts on the
typed events it returns. No sockets, no awaits, no clocks.

It checks the server against the ordering rules of ``docs/protocol.md``: what breaks one is a
:class:`Violation` event (a driver that trusts nothing it cannot check stops reading then),
never an exception. It keeps the client's side of the rules too: a stream's opening fields go
on its first ``speak`` only, nothing is sent for a stream after its ``final`` or ``cancel``,
and once the client cancels a stream no audio of it is passed on. A stream the server opened
from a ``speak`` that crossed its stream's end on the wire is cancelled at once, unseen.

The driver's loop::

    session = ClientSession()
    (hello,) = session.receive_text(first_frame)      # Hello, or StreamError: turned away
    session.speak("a", "Hello there.", final=True, voice="v2/en_speaker_6")
    send(session.data_to_send())
    for frame in websocket:
        for event in session.receive_text(frame) (or receive_bytes):
            ...                                      # Started, SegmentStarted, AudioReceived,
        send(session.data_to_send())                 # SegmentEnded, StreamDone, ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest, ServerError
from .wire import HEADER, MAX_INT_ID, PROTOCOL_VERSION, SAMPLE_BYTES, SERVER_TYPES, StreamId

# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """The server's ``hello``: what it offers."""

    model: str
    sample_rate: int  # the model's native rate
    voices: tuple[str, ...]
    formats: tuple[str, ...]
    sample_rates: dict[str, tuple[int, ...]]
    limits: dict[str, Any]
    server: str | None  # the server (replica) the connection reached, when it says
    message: dict[str, Any]  # the message itself (later versions may add fields)


@dataclass(frozen=True)
class Started:
    """The stream is open; its binary frames carry ``stream``."""

    id: StreamId
    stream: int
    voice: str | None
    format: str
    sample_rate: int
    early_audio: bool


@dataclass(frozen=True)
class SegmentStarted:
    id: StreamId
    index: int
    text: str  # what the segment speaks


@dataclass(frozen=True)
class AudioReceived:
    """One binary frame: PCM samples, μ-law bytes, or one Opus packet."""

    id: StreamId
    stream: int
    segment: int
    seq: int
    payload: bytes


@dataclass(frozen=True)
class SegmentEnded:
    id: StreamId
    index: int
    text: str
    audio_ms: float


@dataclass(frozen=True)
class StreamDone:
    id: StreamId
    audio_ms: float
    ttfa_ms: float | None  # the server's: first text received -> first audio sent
    rtf: float | None


@dataclass(frozen=True)
class StreamCancelled:
    id: StreamId


@dataclass(frozen=True)
class StreamError:
    """An ``error``: it ends stream ``id`` if that stream is open. ``id`` None: about the
    connection (a refusal instead of the hello, or a frame the server could not read)."""

    id: StreamId | None
    code: str
    message: str


@dataclass(frozen=True)
class Violation:
    """The server broke a rule of ``docs/protocol.md`` (``id``: the stream it concerns)."""

    id: StreamId | None
    what: str


Event = (
    Hello
    | Started
    | SegmentStarted
    | AudioReceived
    | SegmentEnded
    | StreamDone
    | StreamCancelled
    | StreamError
    | Violation
)
TERMINAL_EVENTS = (StreamDone, StreamCancelled, StreamError)


# -- state -----------------------------------------------------------------------------------


@dataclass
class _Stream:
    id: StreamId
    asked: dict[str, Any]  # the opening fields the client sent (None: the server's default)
    number: int | None = None
    format: str | None = None
    sample_rate: int | None = None
    final: bool = False  # final sent
    cancelling: bool = False  # cancel sent (or to be sent): audio is dropped from now on
    unwanted: bool = False  # opened by a speak that crossed its stream's end: cancelled
    segment: int | None = None  # the segment open now
    next_segment: int = 0
    next_seq: int = 0
    segment_bytes: int = 0
    segments_ms: float = 0.0  # sum of segment_end audio_ms
    texts: dict[int, str] = field(default_factory=dict)


def _key(id: StreamId) -> tuple[type, StreamId]:
    return (type(id), id)  # 1 and "1" are different ids


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class ClientSession:
    """The protocol state of one client connection."""

    def __init__(self) -> None:
        self.hello: Hello | None = None
        self._streams: dict[tuple[type, StreamId], _Stream] = {}
        self._by_number: dict[int, _Stream] = {}
        self._last_number = 0
        self._outbox: list[str] = []
        self._closed = False

    # ---------------------------------------------------------------- the client's side

    def is_open(self, id: StreamId) -> bool:
        """A stream with this id was opened and has not ended."""
        stream = self._streams.get(_key(id))
        return stream is not None and not stream.unwanted

    def speak(
        self,
        id: StreamId,
        text: str = "",
        *,
        final: bool = False,
        voice: str | None = None,
        format: str | None = None,
        sample_rate: int | None = None,
        options: dict[str, Any] | None = None,
        early_audio: bool | None = None,
    ) -> None:
        """Open stream ``id`` (an id with no open stream) or append ``text`` to it.

        The opening fields (``voice`` ... ``early_audio``; None: the server's default) are for
        the opening ``speak``; on a later one they are an error, as is text after ``final``.
        """
        self._check_id(id)
        if not isinstance(text, str):
            raise InvalidRequest(f"text must be a str, got {type(text).__name__}")
        fields = {
            k: v
            for k, v in (
                ("voice", voice),
                ("format", format),
                ("sample_rate", sample_rate),
                ("options", options),
                ("early_audio", early_audio),
            )
            if v is not None
        }
        message: dict[str, Any] = {"type": "speak", "id": id, "text": text, "final": final}
        stream = self._streams.get(_key(id))
        if stream is None or stream.unwanted:
            stream = _Stream(id, fields)
            if stream.unwanted:
                self._forget(stream)
            self._streams[_key(id)] = stream
            message.update(fields)
        else:
            if fields:
                raise InvalidRequest(f"{', '.join(fields)}: only on a stream's first speak")
            if stream.final or stream.cancelling:
                raise InvalidRequest(f"stream {id!r} takes no more text")
        stream.final = stream.final or final
        self._send(message)

    def flush(self, id: StreamId) -> None:
        """Ask for the stream's buffered text now. Nothing is sent for a stream that is not
        open, or whose text is all in (final) or that is being cancelled."""
        stream = self._streams.get(_key(id))
        if stream is not None and not (stream.final or stream.cancelling or stream.unwanted):
            self._send({"type": "flush", "id": id})

    def cancel(self, id: StreamId) -> bool:
        """Stop the stream. Its audio is dropped from now on; its one terminal event still
        comes (``StreamCancelled``, or the done or error that crossed the cancel). False, and
        nothing sent, if the stream is not open or already being cancelled."""
        stream = self._streams.get(_key(id))
        if stream is None or stream.cancelling or stream.unwanted:
            return False
        stream.cancelling = True
        self._send({"type": "cancel", "id": id})
        return True

    def expect_hello(self, frame: str | bytes) -> Hello:
        """The server's first frame, which must be its ``hello``.

        Raises :class:`~stream_engine.errors.ServerError` with the server's code when it turns
        the connection away instead (an ``error`` with id null: ``limit``), and with code
        ``protocol_error`` for anything else.
        """
        events = self.receive_bytes(frame) if isinstance(frame, bytes) else self.receive_text(frame)
        if self.hello is not None:
            return self.hello
        for event in events:
            if isinstance(event, StreamError):
                raise ServerError(event.code, event.message)
        raise ServerError("protocol_error", "the server did not start with hello")

    def data_to_send(self) -> list[str]:
        """The text frames to send, in order."""
        out, self._outbox = self._outbox, []
        return out

    def connection_lost(self) -> list[StreamId]:
        """The connection is gone: the ids of the streams that were open (they end here)."""
        ids = [s.id for s in self._streams.values() if not s.unwanted]
        self._streams.clear()
        self._by_number.clear()
        self._outbox.clear()
        self._closed = True
        return ids

    # ---------------------------------------------------------------- the server's frames

    def receive_bytes(self, frame: bytes) -> list[Event]:
        if len(frame) < HEADER.size:
            return [Violation(None, f"a binary frame of {len(frame)} bytes has no header")]
        number, segment, seq = HEADER.unpack_from(frame)
        stream = self._by_number.get(number)
        if stream is None:
            what = "never started" if number > self._last_number else "after its end"
            return [Violation(None, f"a binary frame for stream {number}, {what}")]
        events: list[Event] = []
        payload = frame[HEADER.size :]
        if stream.segment is None or segment != stream.segment:
            events.append(
                Violation(stream.id, f"audio of segment {segment}; open: {stream.segment}")
            )
        if seq != stream.next_seq:
            events.append(
                Violation(stream.id, f"sequence number {seq}, expected {stream.next_seq}")
            )
        stream.next_seq = (seq + 1) & 0xFFFF_FFFF
        width = SAMPLE_BYTES.get(stream.format or "", 1)
        if not payload or len(payload) % width:
            events.append(Violation(stream.id, f"{stream.format} payload of {len(payload)} bytes"))
        stream.segment_bytes += len(payload)
        if not (stream.cancelling or stream.unwanted):
            events.append(AudioReceived(stream.id, number, segment, seq, payload))
        return events

    def receive_text(self, frame: str) -> list[Event]:
        try:
            message = json.loads(frame)
        except ValueError:
            return [Violation(None, "a text frame that is not JSON")]
        if not isinstance(message, dict) or message.get("type") not in SERVER_TYPES:
            return [Violation(None, f"an unknown message: {frame[:80]}")]
        kind = message["type"]
        if kind == "hello":
            return self._hello(message)
        if "id" not in message:
            return [Violation(None, f"{kind} without an id")]
        id = message["id"]
        if id is None or isinstance(id, dict | list | float | bool):
            if kind == "error":
                return [StreamError(None, str(message.get("code")), str(message.get("message")))]
            return [Violation(None, f"{kind} with id {id!r}")]
        stream = self._streams.get(_key(id))
        if stream is None:
            if kind == "error":  # e.g. a flush that crossed its stream's end on the wire
                return [StreamError(id, str(message.get("code")), str(message.get("message")))]
            if kind == "started":  # a speak that crossed its stream's end opened a new one
                stream = _Stream(id, {}, final=True, unwanted=True)  # its end is not ours
                self._streams[_key(id)] = stream
                events = self._started(stream, message)
                stream.cancelling = True
                self._send({"type": "cancel", "id": id})
                return [e for e in events if isinstance(e, Violation)]
            return [Violation(id, f"{kind} for an id with no open stream")]
        if stream.number is None and kind not in ("started", "error"):
            return [Violation(id, f"{kind} before started")]
        events = self._message(stream, kind, message)
        if stream.unwanted:
            return [e for e in events if isinstance(e, Violation)]
        return events

    # ---------------------------------------------------------------- internals

    def _hello(self, message: dict[str, Any]) -> list[Event]:
        if self.hello is not None:
            return [Violation(None, "a second hello")]
        if message.get("protocol") != PROTOCOL_VERSION:
            return [Violation(None, f"protocol {message.get('protocol')!r}, expected 1")]
        try:
            rates = message.get("sample_rates", {})
            self.hello = Hello(
                str(message["model"]),
                int(message["sample_rate"]),
                tuple(str(v) for v in message.get("voices", [])),
                tuple(str(f) for f in message.get("formats", [])),
                {str(f): tuple(int(r) for r in rs) for f, rs in rates.items()},
                dict(message.get("limits", {})),
                None if message.get("server") is None else str(message["server"]),
                message,
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return [Violation(None, "a hello without model and sample_rate")]
        return [self.hello]

    def _message(self, stream: _Stream, kind: str, m: dict[str, Any]) -> list[Event]:
        id = stream.id
        if kind == "started":
            if stream.number is not None:
                return [Violation(id, "a second started")]
            return self._started(stream, m)
        if kind == "segment":
            index, text = m.get("index"), str(m.get("text", ""))
            events: list[Event] = []
            if stream.segment is not None or index != stream.next_segment:
                events.append(Violation(id, f"segment {index}, expected {stream.next_segment}"))
            if not isinstance(index, int) or isinstance(index, bool):
                return [*events, Violation(id, f"segment index {index!r}")]
            stream.segment, stream.next_segment, stream.segment_bytes = index, index + 1, 0
            stream.texts[index] = text
            return [*events, SegmentStarted(id, index, text)]
        if kind == "segment_end":
            return self._segment_end(stream, m)
        # a terminal message: the stream ends here whatever else is wrong
        self._forget(stream)
        if kind == "done":
            return self._done(stream, m)
        if kind == "cancelled":  # asked for, or the server's own (e.g. shutting down)
            return [StreamCancelled(id)]
        return [StreamError(id, str(m.get("code")), str(m.get("message")))]

    def _started(self, stream: _Stream, m: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        number = m.get("stream")
        if not isinstance(number, int) or isinstance(number, bool) or number in self._by_number:
            self._forget(stream)
            return [Violation(stream.id, f"started with stream number {number!r}")]
        if number != self._last_number + 1:  # 1, 2, 3, ... in the order streams open
            expected = self._last_number + 1
            events.append(Violation(stream.id, f"stream number {number}, expected {expected}"))
        self._last_number = max(self._last_number, number)
        stream.number, stream.format = number, str(m.get("format"))
        stream.sample_rate = m.get("sample_rate") if isinstance(m.get("sample_rate"), int) else 0
        self._by_number[number] = stream
        for key in ("voice", "format", "sample_rate", "early_audio"):
            if key in stream.asked and m.get(key) != stream.asked[key]:
                events.append(Violation(stream.id, f"started with {key} {m.get(key)!r}"))
        events.append(
            Started(
                stream.id,
                number,
                m.get("voice"),
                stream.format,
                int(stream.sample_rate or 0),
                bool(m.get("early_audio", False)),
            )
        )
        return events

    def _segment_end(self, stream: _Stream, m: dict[str, Any]) -> list[Event]:
        id, index, ms = stream.id, m.get("index"), m.get("audio_ms")
        events: list[Event] = []
        if stream.segment is None or index != stream.segment:
            events.append(Violation(id, f"segment_end {index!r}; open: {stream.segment}"))
        if isinstance(ms, bool) or not isinstance(ms, int | float) or ms < 0:
            events.append(Violation(id, f"segment_end audio_ms {ms!r}"))
            ms = 0.0
        width = SAMPLE_BYTES.get(stream.format or "")
        if stream.format != "opus" and width and stream.sample_rate:
            received = stream.segment_bytes / width / stream.sample_rate * 1000
            if abs(received - ms) > 1.0:
                events.append(
                    Violation(id, f"segment_end audio_ms {ms}, audio received {received:.1f}")
                )
        stream.segments_ms += float(ms)
        text = stream.texts.pop(index, "") if isinstance(index, int) else ""
        stream.segment = None
        return [*events, SegmentEnded(id, index if isinstance(index, int) else -1, text, float(ms))]

    def _done(self, stream: _Stream, m: dict[str, Any]) -> list[Event]:
        id, events = stream.id, []
        if stream.segment is not None:
            events.append(Violation(id, f"done inside segment {stream.segment}"))
        if not stream.final:
            events.append(Violation(id, "done before the client sent final"))
        given = m.get("audio_ms")
        ms = stream.segments_ms
        if isinstance(given, bool) or not isinstance(given, int | float):
            events.append(Violation(id, f"done audio_ms {given!r}"))
        elif abs(given - ms) > 1.0:
            events.append(Violation(id, f"done audio_ms {given}, segments {ms:.1f}"))
        else:
            ms = float(given)

        def number(key: str) -> float | None:
            value = m.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                return None
            return float(value)

        return [*events, StreamDone(id, ms, number("ttfa_ms"), number("rtf"))]

    def _forget(self, stream: _Stream) -> None:
        if self._streams.get(_key(stream.id)) is stream:
            del self._streams[_key(stream.id)]
        if stream.number is not None and self._by_number.get(stream.number) is stream:
            del self._by_number[stream.number]

    def _check_id(self, id: object) -> None:
        if isinstance(id, bool) or not isinstance(id, str | int):
            raise InvalidRequest(f"a stream id is a str or an int, got {id!r}")
        if isinstance(id, int) and abs(id) > MAX_INT_ID:
            raise InvalidRequest(f"an integer id must be within ±{MAX_INT_ID}")
        if isinstance(id, str) and not id:
            raise InvalidRequest("a string id must not be empty")

    def _send(self, message: dict[str, Any]) -> None:
        if self._closed:
            raise InvalidRequest("the connection is closed")
        self._outbox.append(_dumps(message))
