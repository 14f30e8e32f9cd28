"""``/v1/tts``: protocol v1 over a WebSocket, a thin driver around :class:`.Connection`.

Before the handshake: the origin allow-list and the token (refused with an HTTP 403 or 401,
through the ASGI WebSocket denial-response extension). After it: a client over a limit gets one
``error`` (code ``limit``) and close code 1013. Then frames go to the connection, and the
connection's frames come back, until either side closes. The WebSocket layer (uvicorn with the
``websockets`` package) enforces ``max_message_bytes`` (close code 1009) and UTF-8 (1007).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from .connection import CLOSE_TRY_AGAIN, Connection, Frame
from .service import Service

log = logging.getLogger(__name__)

# What a send to a client that has gone away raises (by ASGI server and Starlette version).
_GONE = (WebSocketDisconnect, OSError, RuntimeError)


async def tts_socket(ws: WebSocket) -> None:
    service: Service = ws.app.state.service
    denied = service.check_access(ws.headers, ws.query_params.get("token"))
    if denied is not None:
        await ws.send_denial_response(
            PlainTextResponse(denied.message + "\n", denied.status, headers=_NO_STORE)
        )
        return
    await ws.accept()
    address = ws.client.host if ws.client else None

    async def close(code: int, reason: str) -> None:
        with contextlib.suppress(*_GONE):
            await ws.close(code, reason)

    conn = Connection(service.context, address or "?", close)
    refused = service.admit(address, websocket=True)
    if refused is not None:
        conn.session.refuse(refused)
        conn.pump()
        with contextlib.suppress(*_GONE):
            for frame in conn.frames:
                await _send(ws, frame)
        await close(CLOSE_TRY_AGAIN, str(refused))
        return
    service.connections.add(conn)
    sender = asyncio.create_task(_send_all(ws, conn))
    conn.pump()  # the hello
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            conn.receive(text if text is not None else message.get("bytes") or b"")
    finally:
        conn.closed()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        service.connections.discard(conn)


async def _send_all(ws: WebSocket, conn: Connection) -> None:
    with contextlib.suppress(*_GONE):
        await conn.send_loop(lambda frame: _send(ws, frame))


async def _send(ws: WebSocket, frame: Frame) -> None:
    if isinstance(frame, str):
        await ws.send_text(frame)
    else:
        await ws.send_bytes(frame)


_NO_STORE = {"Cache-Control": "no-store"}
