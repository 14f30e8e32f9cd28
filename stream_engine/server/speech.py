"""``POST /v1/audio/speech``: OpenAI's speech API shape, streamed (``docs/http.md``).

The request becomes one protocol v1 stream on a :class:`~.connection.Connection` of its own,
with this driver as its client: the protocol's client core
(:class:`~stream_engine.protocol.ClientSession`) builds the stream's ``speak`` (``final``),
which the connection's session validates exactly as a WebSocket client's (voice, options, text
limits), and reads what the connection sends back as typed events. The audio goes through a
:class:`~stream_engine.audio.containers.ContainerEncoder` (PyAV) into the HTTP body, as a
chunked body or as server-sent events.

The status is chosen when the first audio is ready (or an error comes first): errors before it
get OpenAI's error shape and status; an error after it ends the body without its last chunk,
so the client sees a broken transfer, never a short file that looks whole. A client that goes
away cancels its stream at the engine's next step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..audio.containers import RESPONSE_FORMATS, ContainerEncoder
from ..errors import HTTP_STATUS
from ..protocol import (
    OPTION_KEYS,
    AudioReceived,
    ClientSession,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
)
from ..protocol.client import Event
from .connection import Connection, Frame
from .http_errors import ApiError
from .service import Service

log = logging.getLogger(__name__)

STREAM_FORMATS = ("audio", "sse")
DEFAULT_RESPONSE_FORMAT = "mp3"  # as OpenAI's
BODY_FIELDS = frozenset(
    {"model", "input", "voice", "response_format", "speed", "stream_format", "instructions"}
)
EXTRA_FIELDS = frozenset({*OPTION_KEYS, "early_audio"})
_STREAM_ID = 1
# the request field each protocol error code is about
_PARAMS = {
    "unknown_voice": "voice",
    "unsupported_format": "response_format",
    "text_too_long": "input",
}


@dataclass(frozen=True)
class SpeechRequest:
    """A request body, its OpenAI fields checked; the rest the protocol session checks."""

    text: str
    voice: str | None  # aliases resolved
    options: dict[str, Any]  # Bark's options, as the body gave them
    early_audio: Any  # as the body gave it (None: absent)
    response_format: str
    stream_format: str


def parse_request(body: bytes, voices: dict[str, str]) -> SpeechRequest:
    """Check the body's JSON and OpenAI fields; ``voices`` maps aliases to voice names."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "the body must be a JSON object", code="bad_request") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="bad_request")
    unknown = sorted(set(data) - BODY_FIELDS - EXTRA_FIELDS)
    if unknown:
        known = ", ".join(sorted(BODY_FIELDS | EXTRA_FIELDS))
        shown = ", ".join(k[:32] for k in unknown[:5])
        raise ApiError(400, f"unknown field(s): {shown}; known: {known}", unknown[0])
    text = data.get("input")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "input must be a non-empty string", "input", "bad_request")
    voice = data.get("voice")
    if isinstance(voice, dict) and set(voice) == {"id"}:  # OpenAI's custom voice object
        voice = voice["id"]
    if voice is not None and not isinstance(voice, str):
        raise ApiError(400, 'voice must be a string or {"id": string}', "voice", "bad_request")
    fmt = data.get("response_format") or DEFAULT_RESPONSE_FORMAT
    if fmt not in RESPONSE_FORMATS:
        raise ApiError(
            400,
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}",
            "response_format",
            "unsupported_format",
        )
    stream_format = data.get("stream_format") or "audio"
    if stream_format not in STREAM_FORMATS:
        raise ApiError(400, "stream_format must be audio or sse", "stream_format", "bad_request")
    speed = data.get("speed", 1.0)
    if speed is not None and (
        isinstance(speed, bool) or not isinstance(speed, int | float) or speed != 1.0
    ):
        raise ApiError(
            400, "speed must be 1.0: Bark speaks at its own pace", "speed", "unsupported_speed"
        )
    if data.get("instructions"):
        raise ApiError(400, "instructions are not supported by Bark", "instructions", "bad_request")
    return SpeechRequest(
        text,
        voices.get(voice, voice) if voice is not None else None,
        {k: data[k] for k in OPTION_KEYS if k in data},
        data.get("early_audio"),
        fmt,
        stream_format,
    )


async def speech(request: Request) -> Response:
    service: Service = request.app.state.service
    try:
        return await _speech(request, service)
    except ApiError as exc:
        service.metrics.speech_requests.labels(str(exc.status)).inc()
        return exc.response()


async def _speech(request: Request, service: Service) -> Response:
    denied = service.check_access(request.headers)
    if denied is not None:
        code = "invalid_api_key" if denied.status == 401 else "origin_not_allowed"
        raise ApiError(denied.status, denied.message, code=code)
    limit = service.config.max_message_bytes
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the body is over {limit} bytes", code="limit")
    except ClientDisconnect:
        raise ApiError(400, "the client went away", code="bad_request") from None
    parsed = parse_request(bytes(body), service.voices.aliases)
    if len(parsed.text) > service.limits.max_text_chars:
        raise ApiError(
            400,
            f"input is over {service.limits.max_text_chars} characters",
            "input",
            "text_too_long",
        )
    voice = parsed.voice
    if voice is not None and voice not in service.voices.prompts:
        names = ", ".join(v["id"] for v in service.voices.describe())
        raise ApiError(
            400, f"unknown voice {voice[:64]!r}; voices: {names}", "voice", "unknown_voice"
        )
    address = request.client.host if request.client else "?"
    refused = service.admit(address, websocket=False)
    if refused is not None:  # shutting down: 503; over the connection limit: 429
        raise ApiError(503 if service.draining else 429, str(refused), code=refused.code)
    return SpeechResponse(service, parsed, address)


class SpeechResponse(Response):
    """Runs the stream while the response is sent (an ASGI response of its own, so that it can
    watch for the client going away while it waits for audio)."""

    def __init__(self, service: Service, parsed: SpeechRequest, address: str) -> None:
        self.service, self.parsed, self.address = service, parsed, address
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service, parsed = self.service, self.parsed
        gone = asyncio.Event()

        async def close(code: int, reason: str) -> None:  # too slow, or shutting down
            gone.set()

        conn = Connection(service.context, self.address, close)
        # this driver is the stream's client: the protocol's client core builds its speak and
        # reads what the connection sends back
        client = ClientSession()
        writer = _BodyWriter(send, parsed, client)
        service.speeches.add(conn)
        try:
            client.expect_hello(conn.session.data_to_send()[0])
            client.speak(
                _STREAM_ID,
                parsed.text,
                final=True,
                voice=parsed.voice,
                format="pcm_f32le",
                sample_rate=24_000,
                options=parsed.options or None,
                early_audio=parsed.early_audio,
            )
            for frame in client.data_to_send():
                conn.receive(frame)
            sender = asyncio.create_task(conn.send_loop(writer.write))
            watcher = asyncio.create_task(_disconnected(receive))
            closed = asyncio.create_task(gone.wait())
            tasks = (sender, watcher, closed)
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if closed in done and sender not in done:  # let the frame being written finish
                await asyncio.wait({sender}, timeout=2.0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if sender in done and not sender.cancelled():
                exc = sender.exception()
                if exc is not None and not isinstance(exc, _End | OSError):  # OSError: gone
                    log.error("speech request failed", exc_info=exc)
                    writer.error = writer.error or ApiError(500, "internal error", code="internal")
            if not writer.started and watcher not in done:
                error = writer.error or ApiError(503, "the stream ended early", code="busy")
                await error.response()(scope, receive, send)
                writer.status = error.status
        finally:
            conn.closed()  # cancels the stream if it is still running
            service.speeches.discard(conn)
            service.metrics.speech_requests.labels(str(writer.status)).inc()


async def _disconnected(receive: Receive) -> bool:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return True


class _End(Exception):
    """The body is complete (or failed): stop reading the connection's frames."""


class _BodyWriter:
    """Turns the connection's frames, read by the client core, into the HTTP response."""

    def __init__(self, send: Send, parsed: SpeechRequest, client: ClientSession) -> None:
        self.send = send
        self.client = client
        self.sse = parsed.stream_format == "sse"
        self.encoder = ContainerEncoder(parsed.response_format)
        self.content_type = "text/event-stream" if self.sse else self.encoder.content_type
        self.options = list(parsed.options)
        self.started = False
        self.status = 0  # the status sent (0: none yet)
        self.error: ApiError | None = None

    async def write(self, frame: Frame) -> None:
        if isinstance(frame, bytes):
            events = self.client.receive_bytes(frame)
        else:
            events = self.client.receive_text(frame)
        for event in events:
            await self._event_of(event)

    async def _event_of(self, event: Event) -> None:
        if isinstance(event, AudioReceived):
            await self._body(self.encoder.encode(np.frombuffer(event.payload, "<f4")))
        elif isinstance(event, StreamDone):
            if not self.started and not event.audio_ms:
                self.error = ApiError(400, "input has nothing to speak", "input", "bad_request")
                raise _End
            await self._body(self.encoder.close())
            if self.sse:
                await self._event({"type": "speech.audio.done"})
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
            raise _End
        elif isinstance(event, StreamError | StreamCancelled | Violation):
            self.error = self._error(event)
            if self.started:  # the status has gone: the body ends without its last chunk
                log.warning("speech request failed mid-stream: %s", self.error.message)
                if self.sse:  # an event says so, and the body ends whole
                    await self._event({"type": "error", **self.error.body()})
                    await self.send({"type": "http.response.body", "body": b"", "more_body": False})
            raise _End

    def _error(self, event: StreamError | StreamCancelled | Violation) -> ApiError:
        if isinstance(event, StreamCancelled):
            return ApiError(503, "server shutting down", code="busy")
        if isinstance(event, Violation):  # a bug of ours: the log has it, the client not
            log.error("speech request: the session broke the protocol: %s", event.what)
            return ApiError(500, "internal error", code="internal")
        param = _PARAMS.get(event.code)
        if event.code == "bad_request":
            param = next((k for k in self.options if k in event.message), None)
            if param is None and "early_audio" in event.message:
                param = "early_audio"
        return ApiError(HTTP_STATUS.get(event.code, 500), event.message, param, event.code)

    async def _body(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            self.status = 200
            headers = [
                (b"content-type", self.content_type.encode()),
                (b"cache-control", b"no-store"),
            ]
            await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        if not data:
            return
        if self.sse:
            await self._event(
                {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
            )
        else:
            await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def _event(self, event: dict[str, Any]) -> None:
        line = f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
        await self.send({"type": "http.response.body", "body": line, "more_body": True})
