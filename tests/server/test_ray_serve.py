"""The server on Ray Serve: real Ray, local, on the CPU, two replicas of random:tiny.

One Ray instance for the module (its session files in a temporary directory): Serve's proxy
on a free port in front of two replicas, each with its own engine.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request

import numpy as np
import openai
import pytest
import pytest_asyncio
import torch
from prometheus_client.parser import text_string_to_metric_families

from stream_engine.client import ServerError, connect
from stream_engine.errors import StreamEngineError

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from stream_engine.server.ray_serve import (  # noqa: E402
    APP_NAME,
    DEPLOYMENT_NAME,
    ReplicaArgs,
    Scaling,
    application,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(600)]

TEXT = "Hello there, this is a test. It has two sentences."
LONG = "This sentence goes on for a good while before it ends, " * 6 + "and now it does."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return int(status.replica_states.get("RUNNING", 0))


METRICS_PORT = free_port()  # Ray's metrics export, where Prometheus scrapes the replicas


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """Ray, Serve's proxy on a free port, and the app with two replicas: the proxy's URL."""
    port = free_port()
    ray.init(
        _metrics_export_port=METRICS_PORT,
        num_cpus=2 * torch.get_num_threads(),
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ReplicaArgs(model="random:tiny", device="cpu")
        # two threads a replica, as this process's torch has: the same reduction order, so
        # the same floating-point results as a direct server
        scaling = Scaling(replicas=2, num_cpus=torch.get_num_threads())
        serve.run(application(args, scaling), name=APP_NAME, route_prefix="/")
        yield f"ws://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest_asyncio.fixture
async def direct(make_server):
    return f"ws://127.0.0.1:{(await make_server()).port}"


async def speak(url: str, text: str, seed: int, **kwargs) -> tuple[str, np.ndarray]:
    """(the replica's name, the stream's audio)."""
    async with connect(url) as conn:
        stream = await conn.speak(
            text, final=True, voice="v2/en_speaker_1", options={"seed": seed}, **kwargs
        )
        return str(conn.hello.get("server")), await stream.collect()


async def test_clients_spread_over_replicas_and_hear_what_one_server_says(proxy, direct):
    results = await asyncio.gather(*(speak(proxy, TEXT, seed=i) for i in range(8)))
    names = {name for name, _ in results}
    assert len(names) >= 2, names  # both replicas took connections
    assert all(audio.size > 0 for _, audio in results)
    _, reference = await speak(direct, TEXT, seed=3)  # the same stream on a direct server
    np.testing.assert_array_equal(results[3][1], reference)


async def test_the_speech_endpoint_streams_through_the_proxy(proxy, direct):
    async def pcm(url: str) -> tuple[bytes, float, float]:
        base = url.replace("ws://", "http://") + "/v1"
        started = time.monotonic()
        async with (
            openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as api,
            api.audio.speech.with_streaming_response.create(
                model="bark",
                voice="v2/en_speaker_1",
                input=LONG + " " + TEXT,
                response_format="pcm",
                extra_body={"seed": 5},
            ) as response,
        ):
            chunks, first_at = [], None
            async for chunk in response.iter_bytes():
                first_at = first_at or time.monotonic() - started
                chunks.append(chunk)
        return b"".join(chunks), first_at or 0.0, time.monotonic() - started

    through, first_at, total = await pcm(proxy)
    assert first_at < total / 2  # streamed, not buffered by the proxy
    assert through == (await pcm(direct))[0]


async def test_every_replicas_metrics_reach_rays_export(proxy):
    await asyncio.gather(*(speak(proxy, TEXT, seed=i) for i in range(4)))
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    deadline, found = time.monotonic() + 90, set()
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == "ray_stream_engine_streams_total" and sample.value > 0:
                    found.add(sample.labels["replica"])
        if len(found) >= 2:
            break
        await asyncio.sleep(2)
    assert len(found) >= 2, found  # both replicas' own counts, tagged with the replica


async def test_a_replica_that_dies_ends_its_streams_and_is_replaced(proxy):
    conns = [await connect(proxy) for _ in range(6)]
    try:
        by_replica: dict[str, list] = {}
        for conn in conns:
            by_replica.setdefault(str(conn.hello["server"]), []).append(conn)
        assert len(by_replica) == 2, by_replica.keys()
        victim, survivor = sorted(by_replica)
        doomed = await by_replica[victim][0].speak(LONG, final=True)
        spared = await by_replica[survivor][0].speak(TEXT, final=True)
        await anext(aiter(doomed))  # its audio has begun
        name = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{victim}"
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        killed = time.monotonic()
        with pytest.raises((ServerError, StreamEngineError)):
            async for _ in doomed:
                pass
        assert time.monotonic() - killed < 10  # its clients know within seconds
        assert (await spared.collect()).size > 0  # the other replica's stream is untouched
        assert spared.outcome == "done"
    finally:
        for conn in conns:
            await conn.close()
    deadline = time.monotonic() + 180
    while running_replicas() < 2 and time.monotonic() < deadline:
        await asyncio.sleep(1)
    assert running_replicas() == 2  # Serve started a replacement
    names = {name for name, _ in await asyncio.gather(*(speak(proxy, TEXT, 1) for _ in range(6)))}
    assert victim not in names and len(names) >= 1  # new connections work


async def test_scaling_down_lets_the_removed_replicas_streams_finish(proxy):
    """Serve removes a replica: its streams in progress end with done, not cut."""
    conns: list = []
    try:
        by_replica: dict[str, object] = {}
        deadline = time.monotonic() + 60  # until the proxy routes to the replacement too
        while len(by_replica) < 2 and time.monotonic() < deadline:
            conns.append(await connect(proxy))
            by_replica.setdefault(str(conns[-1].hello["server"]), conns[-1])
            await asyncio.sleep(0.2)
        assert len(by_replica) == 2
        streams = [await c.speak(LONG, final=True) for c in by_replica.values()]  # type: ignore[attr-defined]
        for stream in streams:
            await anext(aiter(stream))  # both are speaking
        args = ReplicaArgs(model="random:tiny", device="cpu")
        scaling = Scaling(replicas=1, num_cpus=torch.get_num_threads())
        # serve.run returns once the removed replica is gone, which waits for its connections
        scaled = asyncio.create_task(
            asyncio.to_thread(
                serve.run, application(args, scaling), name=APP_NAME, route_prefix="/"
            )
        )
        for stream in streams:
            assert (await stream.collect()).size > 0
            assert stream.outcome == "done"  # no utterance cut in the middle
    finally:
        for conn in conns:
            await conn.close()
    await scaled
    deadline = time.monotonic() + 120
    while running_replicas() != 1 and time.monotonic() < deadline:
        await asyncio.sleep(1)
    assert running_replicas() == 1
