"""The server side of protocol v1 (``/v1/tts``) as a sans-I/O state machine.

One :class:`Session` per connection. It turns the client's frames into :data:`Event` values the
server must act on, turns what the engine did into frames for the client, and enforces the
protocol's rules and limits on the way. It performs no I/O: no sockets, no awaits, no clocks
(the driver passes the time in), no torch. ``docs/protocol.md`` is the specification; this
module implements it.

The driver's loop::

    session = Session(model=..., voices=...)
    send(session.data_to_send())                 # hello
    for frame in websocket:
        for event in session.receive_text(frame, time.monotonic()):   # or receive_bytes
            ...                                  # OpenStream / AppendText / FlushStream /
                                                 # CancelStream: start, feed, flush, stop a job
        send(session.data_to_send())
    # meanwhile, as the engine produces audio for stream N (OpenStream.spec.stream):
    session.segment(N, i, text); session.audio(N, i, payload); session.segment_end(N, i, ms)
    session.done(N, audio_ms, ttfa_ms, rtf)      # or session.fail(N, exc)
    send(session.data_to_send())
    # when the connection ends:
    for event in session.close(): ...            # CancelStream for every stream still open

The driver names streams by their number, never by the client's id: a client may reuse an id
once its stream has ended, while the engine is still winding down the old one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from ..audio.formats import DEFAULT_FORMAT, FORMATS, SAMPLE_RATES, check_format
from ..config import GenerationOptions, ProtocolLimits  # ProtocolLimits: defined with the settings
from ..errors import (
    Cancelled,
    InternalError,
    InvalidOption,
    InvalidRequest,
    LimitExceeded,
    StreamEngineError,
    UnknownVoice,
    UnsupportedFormat,
)
from .wire import (
    ERROR_CODES,
    HEADER,
    MAX_INT_ID,
    MAX_MESSAGE_CHARS,
    MESSAGE_KEYS,
    OPEN_KEYS,
    OPTION_KEYS,
    PROTOCOL_VERSION,
    SAMPLE_BYTES,
    UINT32_MAX,
    StreamId,
)

_GENERIC_INTERNAL = "internal error"
_MAX_OPTION_INT = 2**63  # larger integers are out of every option's range

# C0 and C1 control characters and DEL; tab, newline and carriage return are kept in text
_CONTROL_IN_ID = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_TEXT_CONTROLS = {c: " " for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t\n\r"}


@dataclass(frozen=True)
class StreamSpec:
    """What a client asked for when it opened a stream (all validated)."""

    id: StreamId  # the client's id, as it sent it
    stream: int  # the stream's number: tags its binary frames; the driver's handle for it
    voice: str | None  # a name from the model's voice registry, or None: no preset
    format: str  # one of audio.formats.FORMATS
    sample_rate: int  # allowed for format
    options: GenerationOptions
    early_audio: bool = False  # send a segment's audio in pieces before it is all generated


@dataclass(frozen=True)
class OpenStream:
    """A new stream: start a job for ``spec`` with this first text."""

    spec: StreamSpec
    text: str
    final: bool  # no more text follows: synthesize everything, then call done()


@dataclass(frozen=True)
class AppendText:
    """More text for an open stream (``text`` may be empty when only ``final`` is news)."""

    id: StreamId
    stream: int
    text: str
    final: bool


@dataclass(frozen=True)
class FlushStream:
    """Synthesize the stream's buffered text now, even without a sentence end."""

    id: StreamId
    stream: int


@dataclass(frozen=True)
class CancelStream:
    """Stop the stream's job now. The stream is already closed: later calls for it are no-ops.

    Comes from a client ``cancel``, from a client message that was rejected for an open stream
    (its error closed the stream), and from :meth:`Session.close`.
    """

    id: StreamId
    stream: int


Event = OpenStream | AppendText | FlushStream | CancelStream


@dataclass
class _Bucket:
    """Token bucket: ``rate`` tokens a second, at most ``size`` saved up; starts full."""

    rate: float
    size: float
    level: float
    last: float | None = None

    def take(self, n: float, now: float) -> bool:
        if isinstance(now, int | float) and math.isfinite(now):
            if self.last is not None and now > self.last:
                self.level = min(self.size, self.level + (now - self.last) * self.rate)
            if self.last is None or now > self.last:
                self.last = now
        if n <= self.level:
            self.level -= n
            return True
        return False


@dataclass
class _Stream:
    spec: StreamSpec
    final: bool = False
    chars: int = 0  # text characters received
    next_segment: int = 0  # index the next segment() must have
    segment: int | None = None  # the segment announced and not yet ended
    seq: int = 0  # sequence number of the next binary frame


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey("duplicate key")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_repr(value: object, limit: int = 40) -> str:
    """A repr of a client-sent scalar, cut short; containers are named by type only."""
    if isinstance(value, dict | list):
        return type(value).__name__
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return "a huge integer"
    return _clip(repr(value), limit)


def _ms(name: str, value: object, *, optional: bool = False, digits: int = 1) -> float | None:
    """A finite, non-negative number from the driver, rounded for the wire."""
    if value is None and optional:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise InternalError(f"{name} must be a finite number >= 0, got {_short_repr(value)}")
    return round(number, digits)


def _dumps(message: dict[str, Any]) -> str:
    # ensure_ascii: lone surrogates in echoed text stay escaped, so the frame is valid UTF-8
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class Session:
    """The protocol state of one connection. Methods never block; output waits in the outbox.

    Client input never raises: whatever is wrong becomes an ``error`` message in the outbox.
    Driver calls (``segment``, ``audio``, ...) raise :class:`~stream_engine.errors.InternalError`
    when they break the driver contract (see ``docs/protocol.md``); the driver should then call
    :meth:`fail` for that stream.
    """

    def __init__(
        self,
        *,
        model: str,
        voices: Collection[str],
        sample_rate: int = 24_000,
        formats: Sequence[str] = FORMATS,
        limits: ProtocolLimits | None = None,
        server: str | None = None,
    ) -> None:
        """``server``: the name of the server (or replica) this connection reached; it is in the
        hello when given, so that a client behind a load balancer can tell where it landed."""
        unknown = [f for f in formats if f not in SAMPLE_RATES]
        if unknown:
            raise InvalidOption(f"unknown format(s) {unknown}; known: {list(FORMATS)}")
        self.model = model
        self.voices: tuple[str, ...] = tuple(sorted(voices))  # as the hello lists them
        self._voices = voices  # checked when a stream opens: a live collection may grow
        self.sample_rate = sample_rate
        self.formats: tuple[str, ...] = tuple(formats)
        self.limits = limits if limits is not None else ProtocolLimits()
        lim = self.limits
        self._chars = _Bucket(lim.max_chars_per_second, lim.char_burst, lim.char_burst)
        self._messages = _Bucket(lim.max_messages_per_second, lim.message_burst, lim.message_burst)
        self._by_id: dict[StreamId, _Stream] = {}
        self._by_number: dict[int, _Stream] = {}
        self._last_number = 0  # stream numbers are 1, 2, 3, ... and never reused
        self._outbox: list[str | bytes] = []
        self._errors: list[str] = []  # codes of the error messages queued, not yet taken
        self._closed = False
        self._send(
            {
                "type": "hello",
                "protocol": PROTOCOL_VERSION,
                "model": model,
                "sample_rate": sample_rate,
                "voices": list(self.voices),
                "formats": list(self.formats),
                "sample_rates": {f: list(SAMPLE_RATES[f]) for f in self.formats},
                "limits": lim.as_dict(),
                **({"server": server} if server is not None else {}),
            }
        )

    # ---------------------------------------------------------------- state

    @property
    def open_streams(self) -> tuple[StreamSpec, ...]:
        """The streams open now, oldest first."""
        return tuple(s.spec for s in self._by_number.values())

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def is_open(self, stream: int) -> bool:
        return stream in self._by_number

    def data_to_send(self) -> list[str | bytes]:
        """Take everything queued for the client: JSON text frames (str), binary frames (bytes)."""
        out, self._outbox = self._outbox, []
        return out

    def take_errors(self) -> list[str]:
        """The codes of the ``error`` messages queued since the last call (for metrics)."""
        out, self._errors = self._errors, []
        return out

    def refuse(self, exc: BaseException) -> None:
        """The server will not serve this connection: one ``error`` (``id`` null) replaces the
        hello, and the session closes. The driver sends it, then closes the connection."""
        if self._by_number or self._closed:
            raise InternalError("refuse() is for a new session")
        self._outbox.clear()
        self.connection_error(exc)
        self._closed = True

    def close(self) -> list[Event]:
        """The connection is gone: close every stream; the driver stops each job."""
        events: list[Event] = [
            CancelStream(s.spec.id, s.spec.stream) for s in self._by_number.values()
        ]
        self._by_id.clear()
        self._by_number.clear()
        self._outbox.clear()
        self._closed = True
        return events

    # ---------------------------------------------------------------- client input

    def receive_text(self, data: str, now: float) -> list[Event]:
        """Handle one text frame received at ``now`` (seconds, any monotonic clock)."""
        if self._closed:
            return []
        try:
            return self._receive_text(data, now)
        except Exception:  # a bug here must not take the connection down
            self._send_error(None, "internal", _GENERIC_INTERNAL)
            return []

    def receive_bytes(self, data: bytes, now: float) -> list[Event]:
        """Handle one binary frame: clients send none, so this is always ``bad_request``."""
        if self._closed:
            return []
        if not self._messages.take(1, now):
            self._send_error(None, "limit", "too many messages; slow down")
        else:
            self._send_error(None, "bad_request", "binary frames are not accepted; send JSON text")
        return []

    def _receive_text(self, data: str, now: float) -> list[Event]:
        rate_ok = self._messages.take(1, now)
        try:
            msg = self._parse(data)
            kind = msg.get("type")
            if not isinstance(kind, str) or kind not in MESSAGE_KEYS:
                raise InvalidRequest(
                    f"type must be one of {sorted(MESSAGE_KEYS)}, got {_short_repr(kind)}"
                )
            if "id" not in msg:
                raise InvalidRequest("id is missing")
            sid = self._check_id(msg["id"])
        except InvalidRequest as exc:
            self._send_error(None, exc.code, str(exc))
            return []
        try:
            if not rate_ok:
                raise LimitExceeded("too many messages; slow down")
            unknown = set(msg) - MESSAGE_KEYS[kind]
            if unknown:
                names = ", ".join(_clip(k, 32) for k in sorted(unknown)[:5])
                raise InvalidRequest(f"unknown field(s) in {kind}: {names}")
            if kind == "speak":
                return self._speak(sid, msg, now)
            stream = self._by_id.get(sid)
            if kind == "flush":
                if stream is None:
                    raise InvalidRequest("flush: no open stream with this id")
                return [] if stream.final else [FlushStream(sid, stream.spec.stream)]
            # cancel: an id that is not open has ended already (or never was); nothing to do
            if stream is None:
                return []
            self._close(stream)
            self._send({"type": "cancelled", "id": sid})
            return [CancelStream(sid, stream.spec.stream)]
        except StreamEngineError as exc:
            return self._reject(sid, exc)

    def _parse(self, data: str) -> dict[str, Any]:
        if not isinstance(data, str):
            raise InvalidRequest("a text frame must hold a JSON object")
        try:
            msg = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except _DuplicateKey:
            raise InvalidRequest("malformed JSON: duplicate key") from None
        except RecursionError:
            raise InvalidRequest("malformed JSON: nested too deeply") from None
        except ValueError:  # JSONDecodeError, NaN/Infinity, integers of more than 4300 digits
            raise InvalidRequest("malformed JSON") from None
        if not isinstance(msg, dict):
            raise InvalidRequest("a message must be a JSON object")
        return msg

    def _check_id(self, value: object) -> StreamId:
        if isinstance(value, str):
            if not 1 <= len(value) <= self.limits.max_id_chars:
                raise InvalidRequest(
                    f"a string id must hold 1 to {self.limits.max_id_chars} characters"
                )
            if _CONTROL_IN_ID.search(value) or _SURROGATE.search(value):
                raise InvalidRequest("an id must not hold control characters or lone surrogates")
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if -MAX_INT_ID <= value <= MAX_INT_ID:
                return value
            raise InvalidRequest(f"an integer id must be within ±{MAX_INT_ID}")
        raise InvalidRequest("id must be a string or an integer")

    def _speak(self, sid: StreamId, msg: dict[str, Any], now: float) -> list[Event]:
        final = msg.get("final", False)
        if not isinstance(final, bool):
            raise InvalidRequest("final must be true or false")
        text = msg.get("text", "")
        if not isinstance(text, str):
            raise InvalidRequest("text must be a string")
        stream = self._by_id.get(sid)
        if stream is None:
            return self._open(sid, msg, text, final, now)
        if any(k in msg for k in OPEN_KEYS):
            raise InvalidRequest(
                "voice, format, sample_rate, options and early_audio are only allowed on a "
                "stream's first speak"
            )
        if stream.final:
            raise InvalidRequest("speak after final: the stream takes no more text")
        text = self._check_text(text, stream.chars, now)
        stream.chars += len(text)
        stream.final = final
        if not text and not final:
            return []
        return [AppendText(sid, stream.spec.stream, text, final)]

    def _open(
        self, sid: StreamId, msg: dict[str, Any], text: str, final: bool, now: float
    ) -> list[Event]:
        voice = msg.get("voice")
        if voice is not None:
            if not isinstance(voice, str):
                raise InvalidRequest("voice must be a string or null")
            if voice not in self._voices:
                raise UnknownVoice(f"unknown voice {_short_repr(voice)}; see hello.voices")
        fmt = msg.get("format")
        fmt = DEFAULT_FORMAT if fmt is None else fmt
        if not isinstance(fmt, str):
            raise InvalidRequest("format must be a string or null")
        rate = msg.get("sample_rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int)):
            raise InvalidRequest("sample_rate must be an integer or null")
        if fmt not in self.formats:
            raise UnsupportedFormat(
                f"format must be one of {list(self.formats)}, got {_short_repr(fmt)}"
            )
        if rate is not None and rate not in SAMPLE_RATES[fmt]:
            raise UnsupportedFormat(
                f"{fmt} supports sample rates {list(SAMPLE_RATES[fmt])}, got {_short_repr(rate)}"
            )
        fmt, rate = check_format(fmt, rate)
        options = self._options(msg.get("options"))
        early = msg.get("early_audio", False)
        if early is None:
            early = False
        if not isinstance(early, bool):
            raise InvalidRequest("early_audio must be true, false or null")
        if len(self._by_id) >= self.limits.max_streams:
            raise LimitExceeded(f"at most {self.limits.max_streams} streams may be open at once")
        if self._last_number >= UINT32_MAX:
            raise LimitExceeded("no stream numbers left on this connection; reconnect")
        text = self._check_text(text, 0, now)
        self._last_number += 1
        spec = StreamSpec(sid, self._last_number, voice, fmt, rate, options, early)
        stream = _Stream(spec, final=final, chars=len(text))
        self._by_id[sid] = stream
        self._by_number[spec.stream] = stream
        self._send(
            {
                "type": "started",
                "id": sid,
                "stream": spec.stream,
                "voice": voice,
                "format": fmt,
                "sample_rate": rate,
                "early_audio": early,
            }
        )
        return [OpenStream(spec, text, final)]

    def _options(self, value: object) -> GenerationOptions:
        if value is None:
            return GenerationOptions()
        if not isinstance(value, dict):
            raise InvalidRequest("options must be an object or null")
        unknown = set(value) - set(OPTION_KEYS)
        if unknown:
            names = ", ".join(_clip(k, 32) for k in sorted(unknown)[:5])
            raise InvalidOption(f"unknown option(s): {names}; known: {', '.join(OPTION_KEYS)}")
        for key, v in value.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise InvalidOption(f"options.{key} must be a number or null")
            if isinstance(v, int) and abs(v) > _MAX_OPTION_INT:  # float(v) would overflow
                raise InvalidOption(f"options.{key} is out of range")
        return GenerationOptions.from_dict(value)

    def _check_text(self, text: str, have: int, now: float) -> str:
        """Limits, then the text as the engine gets it (control characters become spaces)."""
        if have + len(text) > self.limits.max_text_chars:
            raise LimitExceeded(
                f"a stream may hold at most {self.limits.max_text_chars} characters of text"
            )
        if _SURROGATE.search(text):
            raise InvalidRequest("text must not hold lone surrogates")
        if text and not self._chars.take(len(text), now):
            raise LimitExceeded(
                f"text arrives faster than {self.limits.max_chars_per_second:g} characters/s"
            )
        return text.translate(_TEXT_CONTROLS)

    def _reject(self, sid: StreamId, exc: StreamEngineError) -> list[Event]:
        """An error for ``sid``; if a stream with that id is open, the error closes it."""
        self._send_error(sid, exc.code, str(exc))
        stream = self._by_id.get(sid)
        if stream is None:
            return []
        self._close(stream)
        return [CancelStream(sid, stream.spec.stream)]

    # ---------------------------------------------------------------- driver input

    def _live(self, stream: int) -> _Stream | None:
        """The open stream numbered ``stream``; None if it was closed (calls are then no-ops)."""
        if isinstance(stream, bool) or not isinstance(stream, int):
            raise InternalError(f"stream must be a stream number, got {stream!r}")
        if self._closed:
            return None
        live = self._by_number.get(stream)
        if live is None and not 1 <= stream <= self._last_number:
            raise InternalError(f"stream {stream} was never opened")
        return live

    def segment(self, stream: int, index: int, text: str) -> bool:
        """Announce segment ``index`` (0, 1, 2, ... in order) before its audio.

        Returns False, doing nothing, if the stream is closed (stop its work).
        """
        live = self._live(stream)
        if live is None:
            return False
        if live.segment is not None:
            raise InternalError(f"segment {index} begun before segment {live.segment} ended")
        if isinstance(index, bool) or index != live.next_segment:
            raise InternalError(f"segment index must be {live.next_segment}, got {index!r}")
        if not isinstance(text, str):
            raise InternalError("segment text must be a string")
        if index > UINT32_MAX:
            raise InternalError("too many segments")
        live.segment = index
        live.next_segment += 1
        self._send({"type": "segment", "id": live.spec.id, "index": index, "text": text})
        return True

    def audio(self, stream: int, index: int, payload: bytes) -> bool:
        """Queue one binary frame of segment ``index`` (announced, not ended).

        ``payload`` holds whole samples (PCM), μ-law bytes, or exactly one Opus packet. An
        empty payload sends nothing. Returns False, doing nothing, if the stream is closed.
        """
        live = self._live(stream)
        if live is None:
            return False
        if live.segment is None or index != live.segment or isinstance(index, bool):
            raise InternalError(f"audio for segment {index!r}, but the open one is {live.segment}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise InternalError("audio payload must be bytes")
        payload = bytes(payload)
        if not payload:
            return True
        width = SAMPLE_BYTES[live.spec.format]
        if len(payload) % width:
            raise InternalError(f"{live.spec.format} payload must be whole {width}-byte samples")
        self._outbox.append(HEADER.pack(live.spec.stream, index, live.seq) + payload)
        live.seq = (live.seq + 1) & UINT32_MAX
        return True

    def segment_end(self, stream: int, index: int, audio_ms: float) -> bool:
        """Segment ``index`` has no more audio; it lasted ``audio_ms``."""
        live = self._live(stream)
        if live is None:
            return False
        if live.segment is None or index != live.segment or isinstance(index, bool):
            raise InternalError(f"segment_end {index!r}, but the open segment is {live.segment}")
        ms = _ms("audio_ms", audio_ms)
        live.segment = None
        self._send({"type": "segment_end", "id": live.spec.id, "index": index, "audio_ms": ms})
        return True

    def done(self, stream: int, audio_ms: float, ttfa_ms: float | None, rtf: float | None) -> bool:
        """The stream (final, every segment ended) has no more audio: ``done``; closes it.

        ``ttfa_ms``: from the stream's first speak to its first audio (None: there was none).
        ``rtf``: synthesis time / audio time (None: unknown).
        """
        live = self._live(stream)
        if live is None:
            return False
        if not live.final:
            raise InternalError("done before the client sent final")
        if live.segment is not None:
            raise InternalError(f"done while segment {live.segment} is open")
        message = {
            "type": "done",
            "id": live.spec.id,
            "audio_ms": _ms("audio_ms", audio_ms),
            "ttfa_ms": _ms("ttfa_ms", ttfa_ms, optional=True),
            "rtf": _ms("rtf", rtf, optional=True, digits=4),
        }
        self._close(live)
        self._send(message)
        return True

    def cancelled(self, stream: int) -> bool:
        """The server cancelled the stream itself (e.g. shutting down): ``cancelled``; closes it.

        Client cancels need no call: the session answers them at once.
        """
        live = self._live(stream)
        if live is None:
            return False
        self._close(live)
        self._send({"type": "cancelled", "id": live.spec.id})
        return True

    def fail(self, stream: int, exc: BaseException) -> bool:
        """The stream failed with ``exc``: one ``error`` for it (``cancelled`` for Cancelled).

        Codes come from the exception (:mod:`stream_engine.errors`); anything else, and every
        ``internal`` error, is sent as ``internal`` with a generic message. Closes the stream.
        """
        live = self._live(stream)
        if live is None:
            return False
        if isinstance(exc, Cancelled):
            return self.cancelled(stream)
        self._close(live)
        code, message = self._wire_error(exc)
        self._send_error(live.spec.id, code, message)
        return True

    def connection_error(self, exc: BaseException) -> None:
        """An error about no stream in particular (``id`` null), e.g. the server is busy."""
        if not self._closed:
            code, message = self._wire_error(exc)
            self._send_error(None, code, message)

    # ---------------------------------------------------------------- output

    @staticmethod
    def _wire_error(exc: BaseException) -> tuple[str, str]:
        if (
            isinstance(exc, StreamEngineError)
            and exc.code in ERROR_CODES
            and exc.code != "internal"
        ):
            return exc.code, str(exc) or exc.code
        return "internal", _GENERIC_INTERNAL

    def _close(self, stream: _Stream) -> None:
        del self._by_id[stream.spec.id]
        del self._by_number[stream.spec.stream]

    def _send(self, message: dict[str, Any]) -> None:
        if not self._closed:
            self._outbox.append(_dumps(message))

    def _send_error(self, sid: StreamId | None, code: str, message: str) -> None:
        if not self._closed:
            self._errors.append(code)
        self._send({"type": "error", "id": sid, "code": code, "message": _clip(message)})
