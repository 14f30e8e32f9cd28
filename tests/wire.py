"""Collecting what the server sends, for the server tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from stream_engine.client import Audio, Client


@dataclass
class Stream:
    id: str | int
    number: int | None = None
    messages: list[dict] = field(default_factory=list)  # this stream's JSON messages
    audio: list[Audio] = field(default_factory=list)
    order: list[object] = field(default_factory=list)  # messages and audio, as they came

    @property
    def types(self) -> list[str]:
        return [m["type"] for m in self.messages]

    @property
    def ended(self) -> bool:
        return bool(self.types) and self.types[-1] in ("done", "cancelled", "error")


async def collect(client: Client, ids: list, timeout: float = 240.0) -> dict:
    """Read until every stream in ``ids`` has ended; return id -> Stream."""
    streams = {i: Stream(i) for i in ids}
    by_number: dict[int, Stream] = {}

    async def run() -> None:
        async for item in client.events():
            if isinstance(item, Audio):
                s = by_number[item.stream]
                s.audio.append(item)
                s.order.append(item)
                continue
            s = streams.get(item.get("id"))
            if s is None:
                continue
            if item["type"] == "started":
                s.number = item["stream"]
                by_number[item["stream"]] = s
            s.messages.append(item)
            s.order.append(item)
            if all(x.ended for x in streams.values()):
                return

    await asyncio.wait_for(run(), timeout)
    return streams
