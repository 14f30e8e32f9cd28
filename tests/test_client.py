"""The Python client (``stream_engine.client``) and ``stream-engine say``, against real servers."""

import asyncio
import os
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from stream_engine.client import Chunk, Done, ServerError, connect, synthesize
from stream_engine.errors import StreamEngineError

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
LONG = "This is a long sentence that takes a good while to say out loud. " * 4


@pytest_asyncio.fixture
async def server(make_server):
    return await make_server()


def url(srv):
    return f"ws://127.0.0.1:{srv.port}"


async def read_all(stream) -> list[Chunk]:
    return [chunk async for chunk in stream]


def check_order(chunks: list[Chunk], stream) -> None:
    """Sequence numbers 0, 1, 2, ...; segments in order; each chunk names its segment's text."""
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    segments = [c.segment for c in chunks]
    assert segments == sorted(segments)
    assert {c.stream for c in chunks} == {stream.number}
    texts = {s.index: s.text for s in stream.segments}
    assert [s.index for s in stream.segments] == list(range(len(stream.segments)))
    assert all(c.text == texts[c.segment] for c in chunks)
    arrivals = [c.arrived for c in chunks]
    assert arrivals == sorted(arrivals)
    assert all(c.elapsed > 0 for c in chunks)


async def test_several_streams_with_different_formats_on_one_connection(server):
    specs = {
        "s16": dict(format="pcm_s16le", sample_rate=22_050),
        "f32": dict(format="pcm_f32le", sample_rate=16_000),
        "ulaw": dict(format="mulaw"),
        "opus": dict(format="opus", sample_rate=48_000, decode=True),
        "raw-opus": dict(format="opus"),
    }
    async with connect(url(server)) as conn:
        assert conn.hello["model"] == "random:tiny" and "v2/en_speaker_3" in conn.voices
        streams = {}
        for n, (name, spec) in enumerate(specs.items()):
            streams[name] = await conn.speak(voice=conn.voices[n], options={"seed": n}, **spec)
        for name, stream in streams.items():  # opened lazily, in pieces, all at once
            await stream.send(f"Good morning, {name}. ")
        assert all(s.opened and not s.ended for s in streams.values())
        await asyncio.gather(*(s.end("The second sentence ends here.") for s in streams.values()))
        results = await asyncio.gather(*map(read_all, streams.values()))
        chunks = dict(zip(streams, results, strict=True))
        assert conn.streams == []  # all closed: nothing left to route
    assert len({s.number for s in streams.values()}) == len(specs)
    for name, stream in streams.items():
        got = chunks[name]
        assert stream.outcome == "done" and isinstance(stream.stats, Done)
        assert got, name
        check_order(got, stream)
        assert len(stream.segments) >= 2
        rate = specs[name].get("sample_rate", 8_000 if name == "ulaw" else 24_000)
        assert stream.sample_rate == rate and {c.sample_rate for c in got} == {rate}
        assert stream.format == specs[name]["format"]
        assert stream.voice == conn.voices[list(specs).index(name)]
        if name == "raw-opus":
            assert all(c.audio is None and c.payload for c in got)  # packets, not decoded
            assert len(got) * 20 == pytest.approx(stream.stats.audio_ms)
            continue
        audio = np.concatenate([c.audio for c in got])
        assert audio.dtype == np.float32 and np.isfinite(audio).all()
        assert np.abs(audio).max() > 0 and np.abs(audio).max() <= 1.0
        assert len(audio) / rate * 1000 == pytest.approx(stream.stats.audio_ms, abs=1)
        assert sum(s.audio_ms for s in stream.segments) == pytest.approx(
            stream.stats.audio_ms, abs=1
        )
        assert stream.stats.ttfa_ms > 0 and stream.stats.rtf > 0
        assert 0 < stream.ttfa <= got[-1].elapsed
    width = {"s16": 2, "f32": 4, "ulaw": 1}
    for name, w in width.items():
        assert all(len(c.payload) == w * len(c.audio) for c in chunks[name])
    # the streams were served side by side, not one after the other
    first = {n: c[0].arrived for n, c in chunks.items()}
    last = {n: c[-1].arrived for n, c in chunks.items()}
    assert min(last.values()) > min(first.values())
    assert sum(first[n] < min(last.values()) for n in chunks) >= 2


async def test_text_in_pieces_flush_and_segments(server):
    text = "Well then, here we go with a few words. And another sentence follows it"
    words = text.split(" ")
    async with connect(url(server)) as conn:
        stream = await conn.speak(format="pcm_f32le", options={"seed": 7})
        assert not stream.opened and stream.number is None
        await stream.flush()  # nothing sent yet: nothing to flush
        for word in words:
            await stream.send(word + " ")
        await stream.flush()  # the unfinished sentence becomes a segment now
        await stream.started()
        assert stream.number is not None and stream.format == "pcm_f32le"
        got = []

        async def until_flushed_text_speaks():
            async for chunk in stream:
                got.append(chunk)
                if chunk.text.endswith("follows it"):
                    return

        await asyncio.wait_for(until_flushed_text_speaks(), 120)
        assert not stream.ended  # still open: no final yet
        await stream.end("Last words.")
        got += await read_all(stream)
        with pytest.raises(StreamEngineError, match="after end"):
            await stream.send("too late")
    check_order(got, stream)
    texts = [s.text for s in stream.segments]
    assert " ".join(texts) == " ".join(words) + " Last words."
    assert texts[-1] == "Last words." and texts[-2].endswith("follows it")
    assert stream.outcome == "done"


async def test_feed_from_a_token_source(server):
    text = "Streaming text arrives token by token from a model. It should still sound whole."

    async def tokens():
        for i in range(0, len(text), 3):
            yield text[i : i + 3]
            await asyncio.sleep(0.001)

    async with connect(url(server)) as conn:
        stream = await conn.speak(voice="v2/en_speaker_2")
        feeding = asyncio.create_task(stream.feed(tokens(), min_interval=0.02))
        chunks = await read_all(stream)
        await feeding
    assert stream.outcome == "done" and chunks
    assert " ".join(s.text for s in stream.segments) == text


async def test_feed_flushes_when_the_source_pauses(server):
    release = asyncio.Event()

    async def thinking():
        yield "A thought without an end"  # no sentence end: the server would wait for more
        await release.wait()
        yield ", finished much later."

    async with connect(url(server)) as conn:
        stream = await conn.speak(options={"seed": 2})
        feeding = asyncio.create_task(stream.feed(thinking(), flush_after=0.2))
        first = await asyncio.wait_for(anext(stream), 120)  # audio while the source waits
        assert first.text == "A thought without an end" and not feeding.done()
        release.set()
        await read_all(stream)
        await feeding
    assert stream.outcome == "done"
    assert stream.segments[0].text == "A thought without an end"
    assert "finished much later" in stream.segments[-1].text


async def test_cancel_mid_stream_ends_that_stream_only(server):
    async with connect(url(server)) as conn:
        victim = await conn.speak(LONG, final=True, options={"seed": 1})
        other = await conn.speak("The other stream goes on. To its end.", final=True)
        first = await anext(victim)
        assert first.seq == 0
        await victim.cancel()
        assert victim.ended and victim.outcome == "cancelled" and victim.stats is None
        assert await read_all(victim) == []  # nothing after the cancel
        await victim.send("dropped")  # text for a cancelled stream goes nowhere
        chunks = await read_all(other)
        # the connection is fine: a new stream after the cancel works
        audio, rate = await conn.say("And a new one.", format="pcm_s16le")
    assert other.outcome == "done" and chunks
    check_order(chunks, other)
    assert sum(c.duration for c in chunks) * 1000 == pytest.approx(other.stats.audio_ms, abs=1)
    assert rate == 24_000 and len(audio) > 0


async def test_cancel_from_another_task_stops_the_reader(server):
    async with connect(url(server)) as conn:
        stream = await conn.speak(voice="v2/en_speaker_5")
        await stream.send(LONG)  # never final: only a cancel can end it
        seen = []

        async def listen():
            async for chunk in stream:
                seen.append(chunk)

        listener = asyncio.create_task(listen())
        while not seen:
            await asyncio.sleep(0.01)
        await stream.cancel()
        await asyncio.wait_for(listener, 30)
    assert stream.outcome == "cancelled" and seen


async def test_errors_raise_with_their_code(make_server):
    srv = await make_server(max_connections_per_ip=1)
    async with connect(url(srv)) as conn:
        cases = {
            "unknown_voice": dict(voice="../../etc/passwd"),
            "unsupported_format": dict(format="mulaw", sample_rate=48_000),
            "bad_request": dict(options={"temperature": 2}),
        }
        for code, spec in cases.items():
            stream = await conn.speak("Hello.", final=True, **spec)
            with pytest.raises(ServerError) as info:
                await read_all(stream)
            assert info.value.code == code and info.value.id == stream.id
            assert stream.outcome == "error" and stream.error is info.value
            with pytest.raises(ServerError) as again:
                await stream.send("more")  # the stream is over: its error again
            assert again.value is info.value
        with pytest.raises(ServerError) as info:
            await conn.say("Hi.", voice="nobody")
        assert info.value.code == "unknown_voice"
        s = await conn.speak("A good stream after the bad ones.", final=True)
        assert await s.wait() is not None and s.outcome == "done"
        # a connection the server turns away raises its error code too
        with pytest.raises(ServerError) as info:
            await connect(url(srv))
        assert info.value.code == "limit"


async def test_server_shutdown_ends_streams(make_server):
    srv = await make_server()
    conn = await connect(url(srv))
    stream = await conn.speak("This stream is never finished. ", voice="v2/en_speaker_1")
    await stream.started()
    await srv.stop(timeout=0)
    await read_all(stream)
    assert stream.outcome == "cancelled"
    await asyncio.wait_for(conn._reader, 30)
    with pytest.raises(ServerError) as info:
        await conn.speak("Hello?", final=True)
    assert info.value.code == "connection_closed"
    await conn.close()


async def test_unread_stream_fills_its_queue_and_close_does_not_hang(server):
    conn = await connect(url(server), queue_size=2)
    unread = await conn.speak(LONG, final=True, format="pcm_s16le", sample_rate=8_000)
    deadline = time.monotonic() + 120
    while not unread._queue.full():  # the reader waits for someone to read this stream
        assert time.monotonic() < deadline and not unread.ended
        await asyncio.sleep(0.02)
    await asyncio.wait_for(conn.close(), 30)
    with pytest.raises(ServerError) as info:
        await read_all(unread)
    assert info.value.code == "connection_closed" and unread.outcome == "error"


async def test_synthesize_and_say(server):
    audio, rate = await synthesize(url(server), "Short and sweet.", seed=3, sample_rate=16_000)
    assert rate == 16_000 and audio.dtype == np.float32 and np.abs(audio).max() > 0
    async with connect(url(server)) as conn:
        again, _ = await conn.say(
            "Short and sweet.", format="pcm_f32le", sample_rate=16_000, options={"seed": 3}
        )
        opus, opus_rate = await conn.say("Short and sweet.", format="opus", options={"seed": 3})
    np.testing.assert_array_equal(audio, again)  # same seed, same audio
    assert opus_rate == 24_000 and opus.dtype == np.float32 and np.abs(opus).max() > 0


# ---------------------------------------------------------------------------- the CLI


async def run_cli(*args, env=None, feed=None):
    """``stream-engine ARGS`` as a subprocess; ``feed(proc)`` writes its stdin."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stream_engine",
        *args,
        stdin=asyncio.subprocess.PIPE if feed else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    if feed is not None:
        await feed(proc)
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    return proc.returncode, out.decode(), err.decode()


def read_wav(path):
    with wave.open(str(path), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth()) == (1, 2)
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
        return pcm, f.getframerate()


async def test_say_stdin_speaks_as_the_text_arrives(server, tmp_path):
    out = tmp_path / "out.wav"

    async def feed(proc):
        # an LLM writing: the first sentence goes in, and its audio comes out before the
        # rest of the text exists
        proc.stdin.write(b"Hello from standard input, one sentence at a time. ")
        await proc.stdin.drain()
        deadline = time.monotonic() + 240
        while not any(j.sent for c in server.service.connections for j in c.jobs.values()):
            assert time.monotonic() < deadline, "no audio before the end of the input"
            await asyncio.sleep(0.05)
        # the last two writes split the UTF-8 of "é"
        for piece in [b"The second", b" sentence comes", b" later. Caf\xc3", b"\xa9!"]:
            proc.stdin.write(piece)
            await proc.stdin.drain()
            await asyncio.sleep(0.05)
        proc.stdin.close()

    rc, stdout, stderr = await run_cli(
        "say", "-", "--url", url(server), "-o", str(out), "--seed", "5", "--progress", feed=feed
    )
    assert rc == 0, stderr
    assert f"wrote {out}" in stdout
    assert "segments 3 | audio" in stderr  # the progress display, forced on
    pcm, rate = read_wav(out)
    assert rate == 24_000 and len(pcm) > rate // 2 and np.abs(pcm).max() > 0
    seconds = float(stdout.split(":")[-1].split()[0])
    assert seconds == pytest.approx(len(pcm) / rate, abs=0.01)


async def test_say_early_audio_writes_the_same_length(server, tmp_path):
    text = "A first sentence that goes on for a good while before it is over."
    lengths = []
    for flag in ([], ["--early-audio"]):
        out = tmp_path / f"out{len(flag)}.wav"
        rc, _, stderr = await run_cli(
            "say", text, "--url", url(server), "-o", str(out), "--seed", "3", *flag
        )
        assert rc == 0, stderr
        lengths.append(len(read_wav(out)[0]))
    assert lengths[0] == lengths[1] > 0
    assert (
        server.service.metrics.value("stream_engine_previews_total") >= 1
    )  # the second run used previews


async def test_say_without_a_server_starts_one_in_its_process(tmp_path):
    out = tmp_path / "local.wav"
    rc, stdout, stderr = await run_cli(
        "say", "Hello there.", "--model", "random:tiny", "--device", "cpu", "-o", str(out)
    )
    assert rc == 0, stderr
    audio, rate = read_wav(out)
    assert rate == 24_000 and len(audio) > 0 and "wrote" in stdout


async def test_say_text_errors_and_exit_codes(server, tmp_path):
    out = tmp_path / "x.wav"
    rc, _, err = await run_cli("say", "Hi there.", "--url", url(server), "--voice", "nope")
    assert rc == 2 and "unknown_voice" in err and not out.exists()
    rc, _, err = await run_cli(
        "say", "Hi there.", "--url", url(server), "-o", str(out), "--sample-rate", "16000"
    )
    assert rc == 0, err
    assert err == ""  # no progress display when stderr is not a terminal
    pcm, rate = read_wav(out)
    assert rate == 16_000 and np.abs(pcm).max() > 0


async def test_say_play_without_a_player_fails_clearly(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty))
    rc, _, err = await run_cli("say", "Hi.", "--play", "--url", "ws://127.0.0.1:9", env=env)
    assert rc == 2
    assert "--play needs an audio player" in err and "aplay" in err


async def test_say_play_pipes_pcm_to_the_player(server, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    played, argv = tmp_path / "played.raw", tmp_path / "argv"
    fake = bin_dir / "aplay"
    fake.write_text(f'#!/bin/sh\necho "$@" > {argv}\ncat > {played}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    out = tmp_path / "also.wav"
    rc, _, err = await run_cli(
        "say", "Play me now.", "--url", url(server), "--play", "-o", str(out), env=env
    )
    assert rc == 0, err
    assert argv.read_text() == "-q -t raw -f S16_LE -c 1 -r 24000 -\n"
    pcm, _ = read_wav(out)
    assert played.read_bytes() == pcm.tobytes() and len(pcm) > 0
