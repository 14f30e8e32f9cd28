"""Collecting what the server sends, for the server tests, through the client's protocol core."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from stream_engine.client import Client
from stream_engine.protocol import (
    AudioReceived,
    SegmentEnded,
    SegmentStarted,
    Started,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
)

# each event's message type on the wire
TYPES = {
    Started: "started",
    SegmentStarted: "segment",
    SegmentEnded: "segment_end",
    StreamDone: "done",
    StreamCancelled: "cancelled",
    StreamError: "error",
}


def kind(event: object) -> str:
    return TYPES.get(type(event), type(event).__name__)


@dataclass
class Stream:
    id: str | int
    number: int | None = None
    messages: list = field(default_factory=list)  # this stream's events, audio aside
    audio: list[AudioReceived] = field(default_factory=list)
    order: list[object] = field(default_factory=list)  # messages and audio, as they came

    @property
    def types(self) -> list[str]:
        return [kind(m) for m in self.messages]

    @property
    def ended(self) -> bool:
        return bool(self.types) and self.types[-1] in ("done", "cancelled", "error")

    def of(self, event_type: type) -> list:
        return [m for m in self.messages if isinstance(m, event_type)]


async def collect(client: Client, ids: list, timeout: float = 240.0) -> dict:
    """Read until every stream in ``ids`` has ended; return id -> Stream. A protocol violation
    by the server fails the test."""
    streams = {i: Stream(i) for i in ids}

    async def run() -> None:
        async for event in client.events():
            assert not isinstance(event, Violation), event
            s = streams.get(getattr(event, "id", None))
            if s is None:
                continue
            if isinstance(event, AudioReceived):
                s.audio.append(event)
            else:
                if isinstance(event, Started):
                    s.number = event.stream
                s.messages.append(event)
            s.order.append(event)
            if all(x.ended for x in streams.values()):
                return

    await asyncio.wait_for(run(), timeout)
    return streams
