"""Shutdown, slow clients, and the server as a process (SIGTERM)."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from wire import collect, kind

from stream_engine.client import Client
from stream_engine.protocol import AudioReceived, SegmentStarted

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(600)]


def url(srv):
    return f"ws://127.0.0.1:{srv.port}"


async def test_stop_finishes_final_streams_and_cancels_the_rest(make_server):
    srv = await make_server()
    async with await Client.connect(url(srv)) as c:
        await c.speak("fin", "This one is complete.", final=True)
        await c.speak("open", "This one never gets its final message.")
        await asyncio.sleep(0.2)
        stopping = asyncio.create_task(srv.stop(timeout=120))
        streams = await collect(c, ["fin", "open"])
        with pytest.raises(ConnectionClosed) as info:
            await c.ws.recv()
        await stopping
    assert streams["fin"].types[-1] == "done"
    assert streams["open"].types[-1] == "cancelled"
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert not srv.service.pipeline.running


async def test_slow_reader_is_disconnected_and_others_are_served(make_server):
    srv = await make_server(max_unsent_bytes=64 * 1024)
    # a slow network: small kernel buffers on both sides (accepted sockets inherit the
    # listening socket's send buffer size)
    srv.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    slow_sock = socket.create_connection(("127.0.0.1", srv.port))
    slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow = await connect(f"{url(srv)}/v1/tts", sock=slow_sock, max_queue=1)
    text = "A sentence long enough to make plenty of audio for the test. " * 2
    msg = {"type": "speak", "id": "s", "text": text, "final": True, "format": "pcm_f32le"}
    await slow.send(json.dumps({**msg, "sample_rate": 48_000}))
    async with await Client.connect(url(srv)) as ok:
        await ok.speak("k", "I read my audio.", final=True)
        good = (await collect(ok, ["k"]))["k"]
    assert good.types[-1] == "done"
    deadline = time.monotonic() + 300
    slow_clients = "stream_engine_slow_clients_total"
    while not srv.service.metrics.value(slow_clients) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert srv.service.metrics.value(slow_clients) == 1
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(slow.recv(), 30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert not any(c.jobs for c in srv.service.connections)


async def test_sigterm_stops_the_process_cleanly(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_engine",
            "serve",
            "--model",
            "random:tiny",
            "--device",
            "cpu",
            "--port",
            "0",
            "--trace",
            str(tmp_path / "trace.json"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        port = None
        deadline = time.monotonic() + 300
        assert proc.stderr is not None
        while port is None and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stderr.readline)
            if not line:
                break
            m = re.search(r"on ws://[\d.]+:(\d+)/v1/tts", line)
            if m:
                port = int(m.group(1))
        assert port is not None, "the server did not report its port"
        async with await Client.connect(f"ws://127.0.0.1:{port}") as c:
            await c.speak("t", "Finish me before you go.", final=True)
            first = None
            async for item in c.events():
                if isinstance(item, AudioReceived | SegmentStarted):
                    first = item
                    break
            assert first is not None
            proc.send_signal(signal.SIGTERM)
            types = [kind(m) async for m in c.events() if not isinstance(m, AudioReceived)]
        assert types[-1] == "done"
        assert await asyncio.to_thread(proc.wait, 120) == 0
        # --trace: the steps of that stream, every stage
        events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
        stepped = {e["name"].split(" ")[0] for e in events if e["ph"] == "X"}
        assert stepped == {"semantic", "coarse", "fine", "codec"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
