"""``POST /v1/audio/speech`` through the real ``openai`` SDK, on a real socket (tiny model)."""

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator

import av
import httpx
import numpy as np
import openai
import pytest
from faults import raise_on
from server_utils import settled

from stream_engine.client import synthesize

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(600)]

TEXT = "Good morning to you."
LONG_LAST = "And this last sentence goes on and on, " + "a very long way, " * 8 + "to the end."
THREE = f"Hello there. How are you today? {LONG_LAST}"


@contextlib.asynccontextmanager
async def client(srv, token: str = "unused") -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{srv.port}/v1", api_key=token, max_retries=0, timeout=300
    ) as api:
        yield api


async def speak(srv, **body) -> bytes:
    body.setdefault("model", "bark")
    body.setdefault("voice", "v2/en_speaker_1")
    extra = {k: body.pop(k) for k in list(body) if k in ("seed", "early_audio", "top_k")}
    async with (
        client(srv) as api,
        api.audio.speech.with_streaming_response.create(
            **body, extra_body=extra or None
        ) as response,
    ):
        assert response.status_code == 200
        return await response.read()


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Mono s16 samples and rate of a file in any container PyAV reads."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono")
        pieces = [
            out.to_ndarray().reshape(-1)
            for frame in container.decode(stream)
            for out in resampler.resample(frame)
        ]
        return np.concatenate(pieces), stream.rate


async def ws_pcm(srv, text: str, seed: int) -> np.ndarray:
    audio, rate = await synthesize(
        f"ws://127.0.0.1:{srv.port}", text, voice="v2/en_speaker_1", seed=seed, format="pcm_f32le"
    )
    assert rate == 24_000
    return np.rint(audio.astype(np.float64) * 32767).astype(np.int16)  # the s16 rule


async def test_every_format_decodes_to_the_websocket_audio(server):
    reference = await ws_pcm(server, TEXT, seed=3)
    assert reference.size > 0
    pcm = await speak(server, input=TEXT, response_format="pcm", seed=3)
    np.testing.assert_array_equal(np.frombuffer(pcm, "<i2"), reference)  # same stream, exactly
    for fmt in ("wav", "flac"):  # lossless: the same samples
        samples, rate = decode(await speak(server, input=TEXT, response_format=fmt, seed=3))
        assert rate == 24_000
        np.testing.assert_array_equal(samples, reference)
    for fmt in ("mp3", "opus", "aac"):  # lossy: the same length, give or take the codec's padding
        samples, _ = decode(await speak(server, input=TEXT, response_format=fmt, seed=3))
        rate = 48_000 if fmt == "opus" else 24_000  # Ogg Opus decodes at 48 kHz
        seconds = samples.size / rate
        assert reference.size / 24_000 <= seconds + 0.02 <= reference.size / 24_000 + 0.13, fmt
        assert np.abs(samples).max() > 0
    default = await speak(server, input=TEXT, seed=3)  # mp3, as OpenAI's default
    assert default[:3] == b"ID3" or default[0] == 0xFF


async def test_wav_streams_with_unknown_sizes(server):
    data = await speak(server, input=TEXT, response_format="wav", seed=3)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert data[4:8] == b"\xff\xff\xff\xff"  # the RIFF size: unknown when the header left
    assert data[36:40] == b"data" and data[40:44] == b"\xff\xff\xff\xff"


async def test_sse_events_carry_the_same_audio(server):
    pcm = await speak(server, input=TEXT, response_format="pcm", seed=5)
    async with (
        client(server) as api,
        api.audio.speech.with_streaming_response.create(
            model="bark",
            voice="v2/en_speaker_1",
            input=TEXT,
            response_format="pcm",
            stream_format="sse",
            extra_body={"seed": 5},
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.iter_lines()]
    events = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1] == {"type": "speech.audio.done"}
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == pcm


async def test_first_bytes_leave_before_the_last_segment_is_made(server):
    rt = server.service.engine.runtime
    started = time.monotonic()
    async with (
        client(server) as api,
        api.audio.speech.with_streaming_response.create(
            model="bark", voice="v2/en_speaker_1", input=THREE, response_format="pcm"
        ) as response,
    ):
        chunks = response.iter_bytes()
        first = await chunks.__anext__()
        first_at = time.monotonic() - started
        in_flight = [r.text for r in rt.requests.values()]
        rest = [chunk async for chunk in chunks]
        total_at = time.monotonic() - started
    assert first
    assert any(text.startswith("And this last sentence") for text in in_flight), in_flight
    assert first_at < total_at / 2
    assert len(first) + sum(len(c) for c in rest) > 2 * 24_000 * 3  # several seconds of audio


async def test_disconnect_frees_the_engine(server):
    async with (
        client(server) as api,
        api.audio.speech.with_streaming_response.create(
            model="bark", voice="v2/en_speaker_1", input=THREE, response_format="pcm"
        ) as response,
    ):
        await response.iter_bytes().__anext__()
        assert server.service.engine.runtime.requests  # work is in flight
    # leaving the block closed the connection mid-body
    assert await settled(server.service)
    metrics = server.service.metrics
    assert metrics.value("stream_engine_streams_total", outcome="cancelled") >= 1
    assert not server.service.speeches


async def test_errors_have_openai_shape_and_status(make_server):
    srv = await make_server()
    cases = {
        "missing input": ({"input": ""}, "input"),
        "unknown voice": ({"voice": "nobody"}, "voice"),
        "format": ({"response_format": "ogg"}, "response_format"),
        "speed": ({"speed": 1.5}, "speed"),
        "option": ({"extra_body": {"top_k": -1}}, "top_k"),
        "option type": ({"extra_body": {"seed": "x"}}, "seed"),
        "early audio": ({"extra_body": {"early_audio": "yes"}}, "early_audio"),
        "unknown field": ({"extra_body": {"volume": 11}}, "volume"),
        "too long": ({"input": "word " * 5_000}, "input"),
        "stream format": ({"extra_body": {"stream_format": "chunks"}}, "stream_format"),
    }
    for name, (change, param) in cases.items():
        body = {"model": "x", "voice": "v2/en_speaker_1", "input": "Hello.", **change}
        async with client(srv) as api:
            with pytest.raises(openai.BadRequestError) as info:
                await api.audio.speech.create(**body)
        error = info.value.response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["type"] == "invalid_request_error" and error["param"] == param, name
        assert "Traceback" not in error["message"], name
    unknown = (await _post(srv, {"input": "Hi.", "voice": "nobody"})).json()["error"]
    assert unknown["code"] == "unknown_voice" and "v2/en_speaker_1" in unknown["message"]
    for raw in (b"{bad json", b"[1, 2]", b'"text"', b"\xff\xfe"):
        response = await _post(srv, content=raw)
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    response = await _post(srv, content=b"{" + b" " * 70_000 + b"}")
    assert response.status_code == 413
    assert (await _post(srv, {"input": "...!!!"})).status_code == 400  # nothing speakable
    assert srv.service.metrics.value("stream_engine_speech_requests_total", status="400") >= 10


async def test_token_and_limits(make_server):
    srv = await make_server(token="s3cret", max_connections=1)
    async with client(srv, "wrong") as api:
        with pytest.raises(openai.AuthenticationError) as info:
            await api.audio.speech.create(model="x", voice="v2/en_speaker_1", input="Hi.")
    assert info.value.response.json()["error"]["type"] == "authentication_error"
    missing = await _post(srv, {"input": "Hi."})  # no Authorization header at all
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    async with client(srv, "s3cret") as api:
        async with api.audio.speech.with_streaming_response.create(
            model="x", voice="v2/en_speaker_1", input=THREE, response_format="pcm"
        ) as first:
            await first.iter_bytes().__anext__()
            with pytest.raises(openai.RateLimitError) as info:  # the one slot is taken
                await api.audio.speech.create(model="x", voice="v2/en_speaker_1", input="Hi.")
            assert info.value.response.json()["error"]["code"] == "limit"
        assert await settled(srv.service)
        speech = await api.audio.speech.create(model="x", voice="v2/en_speaker_1", input="Hi.")
        assert len(speech.content) > 0


async def test_voice_aliases_and_voice_objects(make_server):
    srv = await make_server(voice_aliases=(("alloy", "v2/en_speaker_1"),))
    aliased = await speak(srv, input=TEXT, voice="alloy", response_format="pcm", seed=3)
    named = await speak(
        srv, input=TEXT, voice={"id": "v2/en_speaker_1"}, response_format="pcm", seed=3
    )
    assert aliased == named
    listed = (await _get(srv, "/v1/voices")).json()["data"]
    assert {"id": "alloy", "object": "voice", "kind": "alias", "voice": "v2/en_speaker_1"} in listed


async def _post(srv, json_body=None, content=None, headers=None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}", timeout=300) as http:
        if json_body is not None:
            json_body = {"model": "x", "voice": "v2/en_speaker_1", **json_body}
        return await http.post("/v1/audio/speech", json=json_body, content=content, headers=headers)


async def _get(srv, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}", timeout=60) as http:
        return await http.get(path)


async def test_shutdown_finishes_a_speech_request(make_server):
    srv = await make_server()
    async with (
        client(srv) as api,
        api.audio.speech.with_streaming_response.create(
            model="x", voice="v2/en_speaker_1", input="Finish me. Then me.", response_format="pcm"
        ) as response,
    ):
        chunks = response.iter_bytes()
        first = await chunks.__anext__()
        stopping = asyncio.create_task(srv.stop(timeout=120))
        rest = b"".join([chunk async for chunk in chunks])
        await stopping
    assert len(first) + len(rest) > 24_000  # the whole of both sentences came


async def test_engine_failures_before_and_after_the_first_audio(server, monkeypatch):
    raise_on(monkeypatch, server.service.engine.runtime.stages["coarse"], message="secret /path")
    before = await _post(server, {"input": "This one says BOOM now.", "response_format": "pcm"})
    assert before.status_code == 500
    error = before.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal"
    assert "secret" not in error["message"]
    # after the first audio the status has gone: the body breaks off instead of ending whole
    text = {"input": "Hello there. Then it says BOOM at the end.", "response_format": "pcm"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=300) as http:
        async with http.stream("POST", "/v1/audio/speech", json={"voice": None, **text}) as r:
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                async for _ in r.aiter_bytes():
                    pass
        sse = await http.post(
            "/v1/audio/speech", json={"voice": None, "stream_format": "sse", **text}
        )
    events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "internal"
    assert "secret" not in json.dumps(events[-1])
    assert await settled(server.service)
