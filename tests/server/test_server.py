"""The server end to end: real sockets, the tiny model, every format decoded."""

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np
import opuslib
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from wire import collect

from stream_engine.client import Client
from stream_engine.protocol import (
    HEADER,
    AudioReceived,
    SegmentEnded,
    SegmentStarted,
    Started,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(600)]

PARAGRAPH = "Hello there, friend. The weather is fine today! Shall we go out?"


def url(srv):
    return f"ws://127.0.0.1:{srv.port}"


async def send_in_pieces(c, id, text, size=7, **open_args):
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    await c.speak(id, pieces[0], **open_args)
    for p in pieces[1:]:
        await c.speak(id, p)
    await c.speak(id, "", final=True)


async def test_stream_of_small_pieces_end_to_end(server):
    async with await Client.connect(url(server)) as c:
        assert c.hello["protocol"] == 1 and c.hello["model"] == "random:tiny"
        assert "v2/en_speaker_6" in c.hello["voices"] and "opus" in c.hello["formats"]
        await send_in_pieces(c, "p", PARAGRAPH, voice="v2/en_speaker_6")
        s = (await collect(c, ["p"]))["p"]
    assert s.types[0] == "started" and s.types[-1] == "done"
    segs, ends = s.of(SegmentStarted), s.of(SegmentEnded)
    assert [m.index for m in segs] == list(range(len(segs))) == [m.index for m in ends]
    assert len(segs) >= 3  # a short first segment, then sentences
    assert " ".join(m.text for m in segs) == PARAGRAPH
    # order: segment I, its audio, segment_end I, then segment I+1
    current = None
    for item in s.order:
        if isinstance(item, AudioReceived):
            assert item.segment == current and item.stream == s.number
        elif isinstance(item, SegmentStarted):
            current = item.index
        elif isinstance(item, SegmentEnded):
            assert item.index == current
            current = None
    assert [a.seq for a in s.audio] == list(range(len(s.audio)))
    # pcm_s16le at 24 kHz by default; audio_ms adds up
    total_ms = sum(len(a.payload) for a in s.audio) / 2 / 24_000 * 1000
    done = s.messages[-1]
    assert done.audio_ms == pytest.approx(total_ms, abs=1)
    assert sum(m.audio_ms for m in ends) == pytest.approx(total_ms, abs=1)
    assert done.ttfa_ms > 0 and done.rtf > 0
    assert all(len(a.payload) <= 2 * 2400 for a in s.audio)  # at most 100 ms each


async def test_every_format_decodes(server):
    specs = {
        "f32": dict(format="pcm_f32le", sample_rate=16_000),
        "s16": dict(format="pcm_s16le", sample_rate=22_050),
        "ulaw": dict(format="mulaw", sample_rate=8_000),
        "opus": dict(format="opus", sample_rate=48_000),
    }
    async with await Client.connect(url(server)) as c:
        for id, spec in specs.items():
            await c.speak(id, "Good morning.", final=True, options={"seed": 3}, **spec)
        streams = await collect(c, list(specs))
    for id, spec in specs.items():
        s = streams[id]
        assert s.types[-1] == "done", s.messages
        rate = spec["sample_rate"]
        ms = s.messages[-1].audio_ms
        if spec["format"] == "opus":
            dec = opuslib.Decoder(rate, 1)
            frame = rate // 50
            pcm = [np.frombuffer(dec.decode(a.payload, frame), dtype="<i2") for a in s.audio]
            assert all(len(p) == frame for p in pcm)  # one 20 ms frame per packet
            assert len(s.audio) * 20 == pytest.approx(ms)
            assert np.abs(np.concatenate(pcm)).max() > 0
        else:
            width = {"pcm_f32le": 4, "pcm_s16le": 2, "mulaw": 1}[spec["format"]]
            n = sum(len(a.payload) for a in s.audio) // width
            assert n / rate * 1000 == pytest.approx(ms, abs=1)
            if spec["format"] == "pcm_f32le":
                x = np.frombuffer(b"".join(a.payload for a in s.audio), dtype="<f4")
                assert np.isfinite(x).all() and np.abs(x).max() <= 1.0 and np.abs(x).max() > 0


async def test_two_connections_interleaved_errors_stay_in_their_stream(server):
    async with (
        await Client.connect(url(server)) as a,
        await Client.connect(url(server)) as b,
    ):
        await a.speak("a1", "First one here.", voice="v2/en_speaker_1")
        await b.speak(1, "Second client talks.", final=True)
        await a.speak("bad", "x", voice="../../etc/passwd")
        await a.speak("a2", "Another stream.", final=True, format="opus", sample_rate=24_000)
        await a.speak("a1", " Finished now.", final=True)
        await b.send({"type": "nonsense"})
        sa, sb = await asyncio.gather(collect(a, ["a1", "bad", "a2"]), collect(b, [1]))
    assert sa["bad"].messages[-1].code == "unknown_voice"
    assert "started" not in sa["bad"].types
    assert sa["a1"].types[-1] == "done" and sa["a2"].types[-1] == "done"
    assert sb[1].types[-1] == "done"
    assert sa["a1"].number != sa["a2"].number
    assert {x.stream for x in sa["a2"].audio} == {sa["a2"].number}


async def test_cancel_mid_segment_stops_audio(server):
    async with await Client.connect(url(server)) as c:
        long_text = "This is a long sentence that takes a good while to say out loud. " * 3
        await c.speak("x", long_text, final=True)
        await c.speak("y", "Short and sweet.", final=True)
        seen, ended = [], set()
        async for item in c.events():
            seen.append(item)
            if isinstance(item, Started) and item.id == "x":
                await asyncio.sleep(0.5)
                await c.cancel("x")
            if isinstance(item, StreamDone | StreamCancelled | StreamError):
                ended.add(item.id)
                if ended == {"x", "y"}:
                    break
    x_stream = next(m.stream for m in seen if isinstance(m, Started) and m.id == "x")
    assert not any(isinstance(m, Violation) for m in seen)  # e.g. audio after `cancelled`
    cancelled_at = seen.index(StreamCancelled("x"))
    after = seen[cancelled_at + 1 :]
    assert not any(isinstance(m, AudioReceived) and m.stream == x_stream for m in after)
    assert not any(getattr(m, "id", None) == "x" for m in after)
    assert not server.service.engine.runtime.requests or all(
        r.text != long_text.strip() for r in server.service.engine.runtime.requests.values()
    )


async def test_bad_frames_get_bad_request_and_connection_lives(server):
    async with await Client.connect(url(server)) as c:
        await c.ws.send(b"\x00\x01binary")
        await c.ws.send("{not json")
        await c.ws.send("[" * 10_000 + "]" * 10_000)
        await c.speak("ok", "Still here.", final=True)
        errors, done = [], None
        async for item in c.events():
            if isinstance(item, StreamError):
                errors.append(item)
            if isinstance(item, StreamDone):
                done = item
                break
    assert [e.code for e in errors] == ["bad_request"] * 3
    assert all(e.id is None for e in errors)
    assert done.id == "ok"


async def test_oversized_message_closes_with_1009(make_server):
    srv = await make_server(max_message_bytes=4096)
    async with await Client.connect(url(srv)) as c:
        await c.speak("big", "a" * 10_000)
        with pytest.raises(ConnectionClosed) as info:
            async for _ in c.events():
                pass
            await c.ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


def http_get(srv, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}{path}", timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


async def test_http_endpoints(server):
    async with await Client.connect(url(server)) as c:
        await c.speak("m", "Count me.", final=True)
        await collect(c, ["m"])
    status, ctype, body = await asyncio.to_thread(http_get, server, "/healthz")
    assert status == 200 and ctype == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok" and health["model"] == "random:tiny"
    assert health["server"] == c.hello["server"] == server.service.name
    status, ctype, body = await asyncio.to_thread(http_get, server, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    samples = {  # prometheus_client's own parser reads it
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("stream_engine_streams_total", (("outcome", "done"),))] == 1
    assert samples[("stream_engine_ttfa_seconds_count", ())] == 1
    assert samples[("stream_engine_queue_depth", (("stage", "semantic"),))] == 0
    assert samples[("stream_engine_active_streams", ())] == 0
    assert samples[("stream_engine_connections", ())] == 0
    for stage in ("semantic", "coarse", "fine", "codec"):
        assert samples[("stream_engine_stage_seconds_total", (("stage", stage),))] > 0
        assert samples[("stream_engine_stage_steps_total", (("stage", stage),))] >= 1
    # the codec's last step: the one stream
    assert samples[("stream_engine_batch_size", (("stage", "codec"),))] == 1
    mode = server.service.engine.decode_mode()
    assert health["engine"] == mode and mode["fallbacks"] == []
    decode = [k for k in samples if k[0] == "stream_engine_decode_mode"]
    assert len(decode) == 1 and ("attn", mode["attn"]) in decode[0][1]
    status, _, _ = await asyncio.to_thread(http_get, server, "/nope")
    assert status == 404


async def test_token_and_origin(make_server):
    srv = await make_server(token="s3cret", allowed_origins=("https://ok.example",))
    with pytest.raises(InvalidStatus) as info:
        await Client.connect(url(srv))
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:
        await Client.connect(url(srv), token="wrong")
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:
        await Client.connect(url(srv), token="s3cret", origin="https://evil.example")
    assert info.value.response.status_code == 403
    async with await Client.connect(url(srv), token="s3cret", origin="https://ok.example") as c:
        assert c.hello["type"] == "hello"
    ws = await connect(f"{url(srv)}/v1/tts?token=s3cret")  # browsers: query parameter
    assert json.loads(await ws.recv())["type"] == "hello"
    await ws.close()


async def test_connection_limit_per_address(make_server):
    srv = await make_server(max_connections_per_ip=1)
    async with await Client.connect(url(srv)):
        ws = await connect(f"{url(srv)}/v1/tts")
        msg = json.loads(await ws.recv())
        assert msg["type"] == "error" and msg["code"] == "limit"
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd.code == 1013
    assert srv.service.metrics.value("stream_engine_errors_total", code="limit") == 1


async def refused(srv, forwarded_for: str) -> bool:
    ws = await connect(f"{url(srv)}/v1/tts", additional_headers={"X-Forwarded-For": forwarded_for})
    try:
        return json.loads(await ws.recv())["type"] == "error"
    finally:
        await ws.close()


async def test_forwarded_addresses_count_only_from_trusted_proxies(make_server):
    trusting = await make_server(max_connections_per_ip=1, forwarded_allow_ips=("127.0.0.1",))
    ignoring = await make_server(max_connections_per_ip=1)
    for srv in (trusting, ignoring):
        async with connect(
            f"{url(srv)}/v1/tts", additional_headers={"X-Forwarded-For": "203.0.113.7"}
        ) as first:
            assert json.loads(await first.recv())["type"] == "hello"
            other_player = await refused(srv, "198.51.100.9")
            same_player = await refused(srv, "203.0.113.7")
        assert same_player
        assert other_player == (srv is ignoring)  # untrusted: everyone is 127.0.0.1


async def test_one_address_with_64_connections_by_default(server):
    """A game server or a proxy: 64 connections from 127.0.0.1, 2 streams each, all finish."""

    async def player(i: int) -> list[str]:
        async with await Client.connect(url(server)) as c:
            await c.speak("a", f"Player {i} says hi.", final=True, options={"seed": i})
            await c.speak("b", "And goodbye.", final=True, options={"seed": i})
            streams = await collect(c, ["a", "b"], timeout=500)
        return [s.types[-1] for s in streams.values()]

    outcomes = await asyncio.gather(*(player(i) for i in range(64)))
    assert outcomes == [["done", "done"]] * 64


async def test_binary_header_layout(server):
    async with await Client.connect(url(server)) as c:
        await c.speak("h", "Header check.", final=True, format="mulaw", sample_rate=8000)
        raw = []
        async for frame in c.ws:
            if isinstance(frame, bytes):
                raw.append(frame)
            elif json.loads(frame)["type"] == "done":
                break
    stream, index, seq = HEADER.unpack_from(raw[0])
    assert (index, seq) == (0, 0) and stream >= 1
    assert len(raw[0]) > HEADER.size


async def test_unspeakable_huge_and_control_text(server):
    async with await Client.connect(url(server)) as c:
        await c.speak("punct", "...!!! 🙂 —", final=True)
        for i in range(10):  # 100 KB in 10 KB messages: over the per-stream text limit
            await c.speak("huge", "word " * 2_000, final=i == 9)
        await c.speak("ctl", "Bell\x07 and\x00 null\x1b.", final=True)
        streams = await collect(c, ["punct", "huge", "ctl"])
    punct = streams["punct"]
    assert punct.types == ["started", "done"] and punct.messages[-1].audio_ms == 0
    assert streams["huge"].messages[-1].code == "limit"
    ctl = streams["ctl"]
    assert ctl.types[-1] == "done" and ctl.messages[-1].audio_ms > 0
    seg = ctl.of(SegmentStarted)[0]
    assert not any(ord(ch) < 32 for ch in seg.text)


async def test_early_audio_sends_previews_then_the_exact_rest(make_server):
    """A stream with early_audio gets its first segment's audio in pieces: from previews, then
    from the whole segment. The protocol is unchanged, the sample count is the segment's, and
    the end of the segment is exactly what a stream without early audio gets."""
    srv = await make_server(early_audio_frames=30)
    text = "This first sentence runs on for quite a long while before it ends. Then another."
    opts = {"seed": 11}
    async with await Client.connect(url(srv)) as c:
        await c.speak("early", text, final=True, options=opts, early_audio=True)
        await c.speak("plain", text, final=True, options=opts)
        got = await collect(c, ["early", "plain"])
    early, plain = got["early"], got["plain"]
    assert early.of(Started)[0].early_audio is True
    assert plain.of(Started)[0].early_audio is False
    assert early.types[-1] == plain.types[-1] == "done"
    assert early.types == plain.types  # same segments, same messages
    assert (
        srv.service.metrics.value("stream_engine_previews_total") >= 2
    )  # a 2-3 s first segment: several previews

    def pcm(s, index):
        return np.concatenate(
            [np.frombuffer(a.payload, "<i2") for a in s.audio if a.segment == index]
        )

    first_early, first_plain = pcm(early, 0), pcm(plain, 0)
    assert first_early.size == first_plain.size  # every sample of the segment, once
    # after the last preview (at least one coarse window before the end) all is exact
    np.testing.assert_array_equal(first_early[-30 * 320 :], first_plain[-30 * 320 :])
    np.testing.assert_array_equal(pcm(early, 1), pcm(plain, 1))  # no previews: not awaited
    assert [a.seq for a in early.audio] == list(range(len(early.audio)))
    ends = early.of(SegmentEnded)
    assert ends[0].audio_ms == pytest.approx(first_early.size / 24, abs=1)


async def test_early_audio_must_be_a_boolean(server):
    async with await Client.connect(url(server)) as c:
        await c.speak("x", "Hello.", final=True, early_audio="yes")  # type: ignore[arg-type]
        s = (await collect(c, ["x"]))["x"]
    assert s.types[-1] == "error" and s.messages[-1].code == "bad_request"
    assert "early_audio" in s.messages[-1].message
