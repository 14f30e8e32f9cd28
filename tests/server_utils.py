"""Waiting for a server to settle, for the server tests."""

from __future__ import annotations

import asyncio
import time


async def settled(service, timeout: float = 120.0) -> bool:
    """Wait until the engine holds no request, no stage holds a slot, and no stream is open."""
    rt = service.engine.runtime
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        idle = not rt.requests and all(s.active == 0 for s in rt.stages.values())
        if idle and not service.owners and not any(c.jobs for c in service.clients):
            return True
        await asyncio.sleep(0.05)
    return False
