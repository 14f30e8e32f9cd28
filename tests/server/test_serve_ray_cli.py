"""``stream-engine serve --ray`` as a process: Ray, Serve's proxy, one replica, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from stream_engine.client import connect

pytest.importorskip("ray")

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(600)]


async def test_serve_ray_serves_and_stops_on_sigterm():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths live under it
    env.update(PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_engine", "serve", "--ray", "--replicas", "1"]
        + ["--model", "random:tiny", "--device", "cpu", "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300
        assert proc.stderr is not None
        ready = False
        while not ready and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stderr.readline)
            if not line:
                break
            ready = re.search(r"on Ray Serve at ws://[\d.]+:\d+/v1/tts", line) is not None
        assert ready, "serve --ray did not report that it serves"
        async with connect(f"ws://127.0.0.1:{port}") as conn:
            assert conn.hello["server"]  # the replica's name
            audio, _ = await conn.say("Hello from Ray.", options={"seed": 1})
            assert audio.size > 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
