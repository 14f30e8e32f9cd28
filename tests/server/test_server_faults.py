"""Faults: disconnects, mass cancels, a stage that raises, invalid frames; the server goes on."""

import asyncio

import pytest
from faults import raise_on
from server_utils import settled
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from wire import collect

from stream_engine.client import Client
from stream_engine.config import ServerConfig
from stream_engine.protocol import (
    ProtocolLimits,
    Started,
    StreamCancelled,
    StreamDone,
    StreamError,
)
from stream_engine.server.app import Server

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(600)]

ENDS = {StreamCancelled: "cancelled", StreamDone: "done", StreamError: "error"}


def url(srv):
    return f"ws://127.0.0.1:{srv.port}"


async def test_disconnect_mid_segment_frees_every_stage(server):
    c = await Client.connect(url(server))
    await c.speak("gone", "A long sentence that the client will not wait for at all. " * 3)
    await c.speak("gone", "", final=True)
    async for item in c.events():
        if isinstance(item, Started):
            break
    await asyncio.sleep(0.3)
    assert server.service.engine.runtime.requests  # work is in flight
    c.ws.transport.abort()  # no close handshake: the network just went away
    assert await settled(server.service)
    async with await Client.connect(url(server)) as other:  # and the server still serves
        await other.speak("ok", "Still working.", final=True)
        assert (await collect(other, ["ok"]))["ok"].types[-1] == "done"


async def test_a_thousand_cancels_in_flight(tiny):
    limits = ProtocolLimits(
        max_messages_per_second=100_000,
        message_burst=100_000,
        max_chars_per_second=1e6,
        char_burst=1_000_000,
    )
    srv = Server(tiny, ServerConfig(port=0), limits=limits)
    await srv.start()
    try:
        async with (
            await Client.connect(url(srv)) as canceller,
            await Client.connect(url(srv)) as bystander,
        ):
            await bystander.speak("b", "I keep talking while others cancel.", final=True)
            for i in range(1000):
                await canceller.speak(i, f"Number {i} is cancelled.", final=True)
                await canceller.cancel(i)
            closing = {"cancelled": 0, "done": 0, "error": 0}
            codes: list[str] = []

            async def read_canceller():
                async for item in canceller.events():
                    if type(item) in ENDS:
                        closing[ENDS[type(item)]] += 1
                        if isinstance(item, StreamError):
                            codes.append(item.code)
                        if sum(closing.values()) == 1000:
                            return

            done_b, _ = await asyncio.gather(
                collect(bystander, ["b"]), asyncio.wait_for(read_canceller(), 300)
            )
        assert done_b["b"].types[-1] == "done"
        assert closing["error"] == 0, codes
        assert closing["cancelled"] + closing["done"] == 1000
        assert closing["cancelled"] >= 990  # a cancel can only lose the race to a done
        assert await settled(srv.service)
    finally:
        await srv.stop(timeout=0)


async def test_stage_failure_reaches_only_its_stream(server, monkeypatch):
    stage = server.service.engine.runtime.stages["coarse"]
    raise_on(monkeypatch, stage, message="simulated kernel failure with a secret /path/in/trace")
    async with await Client.connect(url(server)) as c:
        await c.speak("bad", "This one says BOOM now.", final=True)
        await c.speak("good", "This one is fine.", final=True)
        streams = await collect(c, ["bad", "good"])
    err = streams["bad"].messages[-1]
    assert isinstance(err, StreamError) and err.code == "internal"
    assert "secret" not in err.message and "Traceback" not in err.message
    assert streams["good"].types[-1] == "done"
    assert await settled(server.service)


async def test_invalid_utf8_and_path_voices(server):
    ws = await connect(f"{url(server)}/v1/tts")
    await ws.recv()  # hello
    # a text frame that is not UTF-8: the WebSocket layer closes with 1007
    ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe{}"))
    ws.send_data()
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1007
    async with await Client.connect(url(server)) as c:
        for i, voice in enumerate(["/etc/passwd", "https://evil.example/v.npz", "../v2/x", "v2"]):
            await c.speak(f"v{i}", "Hello.", voice=voice)
        streams = await collect(c, [f"v{i}" for i in range(4)])
    assert all(s.messages[-1].code == "unknown_voice" for s in streams.values())
    assert all("Traceback" not in s.messages[-1].message for s in streams.values())
