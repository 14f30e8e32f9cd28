"""The LiveKit Agents plugin (``stream_engine.integrations.livekit``), with the real
``livekit-agents`` package against a real server on ``random:tiny``."""

import asyncio
import socket
import time

import numpy as np
import pytest
import pytest_asyncio

pytest.importorskip("livekit.agents")

from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError
from livekit.agents.tts import SynthesizedAudio
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT
from server_utils import settled

from stream_engine.client import connect
from stream_engine.integrations.livekit import TTS

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]

VOICE = "v2/en_speaker_1"
LONG = "This is a long sentence that takes a good while to say out loud. " * 4


@pytest_asyncio.fixture
async def server(make_server):
    return await make_server()


def url(srv) -> str:
    return f"ws://127.0.0.1:{srv.port}"


def cancelled_streams(srv) -> float:
    return srv.service.metrics.value("stream_engine_streams_total", outcome="cancelled")


async def until_cancelled(srv, before: float) -> None:
    deadline = time.monotonic() + 30
    while cancelled_streams(srv) == before:
        assert time.monotonic() < deadline, "the stream was not cancelled on the server"
        await asyncio.sleep(0.02)
    assert cancelled_streams(srv) == before + 1


def samples(events: list[SynthesizedAudio]) -> np.ndarray:
    return np.concatenate([np.frombuffer(ev.frame.data.tobytes(), np.int16) for ev in events])


def transcripts(events: list[SynthesizedAudio]) -> list:
    return [t for ev in events for t in ev.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])]


async def direct(srv, text: str, seed: int, rate: int) -> tuple[np.ndarray, list[str]]:
    """The same text spoken by the Python client: int16 samples and the segments' texts."""
    async with connect(url(srv)) as conn:
        stream = await conn.speak(
            text,
            final=True,
            voice=VOICE,
            format="pcm_s16le",
            sample_rate=rate,
            options={"seed": seed},
        )
        payloads = [chunk.payload async for chunk in stream]
    assert stream.outcome == "done"
    return np.frombuffer(b"".join(payloads), np.int16), [s.text for s in stream.segments]


def check_stream(events: list[SynthesizedAudio], rate: int, text: str) -> None:
    """One LiveKit segment, the last frame final, mono frames at ``rate``, and sentence-level
    transcripts: the server's segments in order, starting at increasing audio times."""
    assert events
    assert {ev.frame.sample_rate for ev in events} == {rate}
    assert {ev.frame.num_channels for ev in events} == {1}
    assert len({ev.segment_id for ev in events}) == 1
    assert [ev.is_final for ev in events] == [False] * (len(events) - 1) + [True]
    timed = transcripts(events)
    assert "".join(timed).strip() == text
    starts = [t.start_time for t in timed]
    assert starts[0] == 0.0 and starts == sorted(set(starts))
    assert starts[-1] < sum(ev.frame.duration for ev in events)


async def test_stream_push_flush_end_gives_audio_in_order(server):
    text = "Hello there. How are you today?"
    rate, seed = 16_000, 5
    tts = TTS(url=url(server), voice=VOICE, sample_rate=rate, options={"seed": seed})
    try:
        stream = tts.stream()
        for piece in ("Hello there. ", "How are ", "you today?"):
            stream.push_text(piece)
            await asyncio.sleep(0.05)
        stream.flush()  # the text so far speaks now, before end_input
        first = await asyncio.wait_for(anext(stream), 120)
        stream.end_input()
        events = [first] + await asyncio.wait_for(collect(stream), 120)
        await stream.aclose()
    finally:
        await tts.aclose()
    check_stream(events, rate, text)
    expected, segments = await direct(server, text, seed, rate)
    assert [str(t) for t in transcripts(events)] == [t + " " for t in segments]
    np.testing.assert_array_equal(samples(events), expected)  # same seed: the same audio


async def collect(stream) -> list[SynthesizedAudio]:
    return [ev async for ev in stream]


async def test_synthesize_gives_a_chunked_stream(server):
    text = "Short and sweet. Another one."
    tts = TTS(url=url(server), voice=VOICE, options={"seed": 3})
    try:
        events = await asyncio.wait_for(collect(tts.synthesize(text)), 120)
    finally:
        await tts.aclose()
    assert {ev.frame.sample_rate for ev in events} == {24_000}
    assert events[-1].is_final
    assert "".join(transcripts(events)).strip() == text
    expected, segments = await direct(server, text, 3, 24_000)
    assert [str(t) for t in transcripts(events)] == [t + " " for t in segments]
    np.testing.assert_array_equal(samples(events), expected)


async def test_aclose_mid_stream_cancels_it_on_the_server(server):
    tts = TTS(url=url(server), voice=VOICE, options={"seed": 1})
    metrics = []
    tts.on("metrics_collected", metrics.append)
    try:
        before = cancelled_streams(server)
        stream = tts.stream()
        stream.push_text(LONG)
        stream.end_input()
        await asyncio.wait_for(anext(stream), 120)
        await stream.aclose()
        assert await collect(stream) == []  # nothing more after aclose
        await until_cancelled(server, before)
        while tts._cancelling:  # the connection goes back to the pool after ``cancelled``
            await asyncio.sleep(0.01)
        assert await settled(server.service)  # its slots are free
        # the next stream reuses the connection
        events = await asyncio.wait_for(collect(tts.synthesize("And a new one.")), 120)
    finally:
        await tts.aclose()
    assert events and events[-1].is_final
    assert metrics[-1].connection_reused


async def test_tts_aclose_cancels_its_open_streams(server):
    tts = TTS(url=url(server), voice=VOICE)
    before = cancelled_streams(server)
    stream = tts.stream()
    stream.push_text(LONG)  # never ended: only a close ends it
    stream.flush()
    await asyncio.wait_for(anext(stream), 120)
    await tts.aclose()
    await until_cancelled(server, before)
    assert await settled(server.service)
    assert await collect(stream) == []


async def test_server_error_raises_status_error_without_retrying(server):
    tts = TTS(url=url(server), voice="v2/nobody")
    errors = []
    tts.on("error", errors.append)
    try:
        stream = tts.stream()
        stream.push_text("Hello there.")
        stream.end_input()
        with pytest.raises(APIStatusError) as raised:
            await asyncio.wait_for(collect(stream), 60)
    finally:
        await tts.aclose()
    assert raised.value.status_code == 400 and raised.value.body == "unknown_voice"
    assert not raised.value.retryable
    assert [e.recoverable for e in errors] == [False]  # one attempt: not retried


async def test_token(make_server):
    srv = await make_server(token="secret")
    good, bad = TTS(url=url(srv), token="secret"), TTS(url=url(srv), token="wrong")
    try:
        assert await asyncio.wait_for(collect(good.synthesize("With the token.")), 120)
        with pytest.raises(APIStatusError) as raised:
            await asyncio.wait_for(collect(bad.synthesize("Without it.")), 60)
    finally:
        await good.aclose()
        await bad.aclose()
    assert raised.value.status_code == 401 and not raised.value.retryable


async def test_connection_errors_are_retried_then_raised():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tts = TTS(url=f"ws://127.0.0.1:{port}")
    errors = []
    tts.on("error", errors.append)
    options = APIConnectOptions(max_retry=1, retry_interval=0.01, timeout=5)
    try:
        with pytest.raises(APIConnectionError):
            await asyncio.wait_for(collect(tts.synthesize("Hello.", conn_options=options)), 60)
    finally:
        await tts.aclose()
    assert [e.recoverable for e in errors] == [True, False]


async def test_two_streams_at_once_on_one_tts(server):
    texts = ["The first speaker talks here.", "A second voice says something else."]
    tts = TTS(url=url(server), voice=VOICE, options={"seed": 9})

    async def speak(text: str) -> list[SynthesizedAudio]:
        stream = tts.stream()
        for word in text.split(" "):
            stream.push_text(word + " ")
            await asyncio.sleep(0)
        stream.end_input()
        try:
            return await collect(stream)
        finally:
            await stream.aclose()

    try:
        results = await asyncio.wait_for(asyncio.gather(*(speak(t) for t in texts)), 180)
    finally:
        await tts.aclose()
    assert results[0][0].request_id != results[1][0].request_id
    for text, events in zip(texts, results, strict=True):
        check_stream(events, 24_000, text)
        expected, segments = await direct(server, text, 9, 24_000)
        assert [str(t) for t in transcripts(events)] == [t + " " for t in segments]
        np.testing.assert_array_equal(samples(events), expected)  # nothing of the other
