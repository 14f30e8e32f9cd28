"""A Python client for protocol v1 (``docs/protocol.md``), on websockets' asyncio API.

    async with await Client.connect("ws://127.0.0.1:8765") as c:
        await c.speak("s1", "Hello there. How are you?", final=True, voice="v2/en_speaker_6")
        async for item in c.events():
            ...  # dict messages, and Audio for binary frames

:func:`synthesize` speaks one text and returns the float audio.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from .errors import InternalError, StreamEngineError

HEADER = struct.Struct("<III")  # stream, segment index, sequence number


@dataclass(frozen=True)
class Audio:
    """One binary frame from the server."""

    stream: int
    segment: int
    seq: int
    payload: bytes

    @classmethod
    def parse(cls, frame: bytes) -> Audio:
        if len(frame) < HEADER.size:
            raise InternalError(f"binary frame of {len(frame)} bytes has no header")
        stream, segment, seq = HEADER.unpack_from(frame)
        return cls(stream, segment, seq, frame[HEADER.size :])


class ServerError(StreamEngineError):
    """An ``error`` message from the server, raised by :func:`synthesize`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Client:
    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello

    @classmethod
    async def connect(cls, url: str, token: str | None = None, **kwargs: Any) -> Client:
        url = url.rstrip("/")
        if not url.endswith("/v1/tts"):
            url += "/v1/tts"
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await connect(url, additional_headers=headers, max_size=None, **kwargs)
        hello = json.loads(await ws.recv())
        if hello.get("type") != "hello":
            await ws.close()
            raise InternalError(f"expected hello, got {hello.get('type')!r}")
        return cls(ws, hello)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def speak(
        self,
        id: str | int,
        text: str,
        final: bool = False,
        *,
        voice: str | None = None,
        format: str | None = None,
        sample_rate: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        """Open stream ``id`` (first call) or append text to it."""
        msg: dict[str, Any] = {"type": "speak", "id": id, "text": text, "final": final}
        for key, value in (
            ("voice", voice),
            ("format", format),
            ("sample_rate", sample_rate),
            ("options", options),
        ):
            if value is not None:
                msg[key] = value
        await self.send(msg)

    async def flush(self, id: str | int) -> None:
        await self.send({"type": "flush", "id": id})

    async def cancel(self, id: str | int) -> None:
        await self.send({"type": "cancel", "id": id})

    async def events(self) -> AsyncIterator[dict[str, Any] | Audio]:
        """Every message from the server, in order, until the connection closes."""
        async for frame in self.ws:
            if isinstance(frame, bytes):
                yield Audio.parse(frame)
            else:
                yield json.loads(frame)

    async def close(self) -> None:
        await self.ws.close()


def decode_pcm(payloads: list[bytes], format: str) -> np.ndarray:
    """PCM payloads of one stream as float32 samples."""
    data = b"".join(payloads)
    if format == "pcm_f32le":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if format == "pcm_s16le":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    raise InternalError(f"decode_pcm does not decode {format}")


async def synthesize(
    url: str,
    text: str,
    *,
    voice: str | None = None,
    seed: int | None = None,
    token: str | None = None,
    format: str = "pcm_f32le",
    sample_rate: int = 24_000,
) -> tuple[np.ndarray, int]:
    """Speak ``text`` on a running server; return (float32 audio, sample rate)."""
    options = {"seed": seed} if seed is not None else None
    async with await Client.connect(url, token=token) as c:
        await c.speak(
            "say", text, True, voice=voice, format=format, sample_rate=sample_rate, options=options
        )
        payloads: list[bytes] = []
        async for item in c.events():
            if isinstance(item, Audio):
                payloads.append(item.payload)
            elif item.get("type") == "error":
                raise ServerError(str(item.get("code")), str(item.get("message")))
            elif item.get("type") == "done":
                break
    return decode_pcm(payloads, format), sample_rate
