"""The Pipecat plugin (stream_engine.integrations.pipecat) in real Pipecat pipelines, against a
real server with the tiny model: frames in, frames out, and what the server saw."""

from __future__ import annotations

import asyncio
import sys
import warnings
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from server_utils import settled
from websockets.asyncio.client import connect

with warnings.catch_warnings():
    # Pipecat 1.14 warns about itself, once, on import: pipecat.audio.utils imports audioop
    # (deprecated since Python 3.11) and tts_service subclasses its own deprecated class
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    warnings.filterwarnings("ignore", "`AudioContextTTSService` is deprecated", DeprecationWarning)
    from pipecat.frames.frames import (
        EndFrame,
        ErrorFrame,
        Frame,
        InterruptionFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        MetricsFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSSpeakFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
        TTSUpdateSettingsFrame,
    )
    from pipecat.metrics.metrics import TTFBMetricsData
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.services.settings import TTSSettings
    from pipecat.tests.utils import run_test
    from pipecat.workers.runner import WorkerRunner

    from stream_engine.integrations.pipecat import StreamEngineTTSService

from stream_engine.protocol import PATH, AudioReceived, ClientSession, StreamDone

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]

VOICE = "v2/en_speaker_1"
REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "clients" / "voice-agent" / "agent.py"


def url(srv) -> str:
    return f"ws://127.0.0.1:{srv.port}"


def speech_frames(frames: list[Frame]) -> list[Frame]:
    return [
        f for f in frames if isinstance(f, TTSStartedFrame | TTSAudioRawFrame | TTSStoppedFrame)
    ]


def one_turn(frames: list[Frame], rate: int) -> bytes:
    """The PCM of the one turn in ``frames``: started, audio at ``rate``, stopped, one context."""
    speech = speech_frames(frames)
    assert isinstance(speech[0], TTSStartedFrame) and isinstance(speech[-1], TTSStoppedFrame)
    audio = [f for f in speech[1:-1] if isinstance(f, TTSAudioRawFrame)]
    assert audio and len(audio) == len(speech) - 2
    assert {f.context_id for f in speech} == {speech[0].context_id}
    assert all(f.sample_rate == rate and f.num_channels == 1 for f in audio)
    return b"".join(f.audio for f in audio)


async def reference_pcm(srv, text: str, rate: int, seed: int) -> bytes:
    """What the server sends for ``text`` in one speak, straight over the protocol."""
    session = ClientSession()
    pcm = bytearray()
    async with connect(url(srv) + PATH) as ws:
        session.receive_text(str(await ws.recv()))
        session.speak(
            "ref", text, final=True, voice=VOICE, sample_rate=rate, options={"seed": seed}
        )
        for out in session.data_to_send():
            await ws.send(out)
        async for frame in ws:
            if isinstance(frame, bytes):
                events = session.receive_bytes(frame)
            else:
                events = session.receive_text(frame)
            for event in events:
                if isinstance(event, AudioReceived):
                    pcm += event.payload
                elif isinstance(event, StreamDone):
                    return bytes(pcm)
                else:
                    assert type(event).__name__ in ("Started", "SegmentStarted", "SegmentEnded")
    raise AssertionError("no done")


# -- a pipeline driven step by step ----------------------------------------------------------


class Recorder(FrameProcessor):
    """Passes every frame on; records those going ``direction`` in the order they pass."""

    def __init__(self, direction: FrameDirection) -> None:
        super().__init__(enable_direct_mode=True)
        self.direction = direction
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == self.direction and not isinstance(frame, StartFrame):
            self.frames.append(frame)
        await self.push_frame(frame, direction)

    async def wait_for(self, kind: type[Frame], count: int = 1, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while sum(isinstance(f, kind) for f in self.frames) < count:
                await asyncio.sleep(0.01)


Send = Callable[[Frame], Awaitable[None]]
Script = Callable[[Send, Recorder, Recorder], Awaitable[None]]


async def drive(tts: StreamEngineTTSService, script: Script, rate: int = 16_000):
    """Run ``[up, tts, down]`` in a Pipecat worker; ``script(send, up, down)`` queues frames
    (and waits for what comes out); an EndFrame follows. Returns the two recorders."""
    up, down = Recorder(FrameDirection.UPSTREAM), Recorder(FrameDirection.DOWNSTREAM)
    worker = PipelineWorker(
        Pipeline([up, tts, down]),
        params=PipelineParams(audio_out_sample_rate=rate),
        cancel_on_idle_timeout=False,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(worker, frame):
        started.set()

    async def run_script() -> None:
        await asyncio.wait_for(started.wait(), 30)
        try:
            await script(worker.queue_frame, up, down)
        except BaseException:
            await worker.cancel(reason="the test failed")
            raise
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), run_script())
    return up, down


# -- the tests -------------------------------------------------------------------------------


async def test_speak_frame_is_spoken_at_the_pipelines_rate(make_server):
    srv = await make_server()
    text = "Hello there. How are you?"
    tts = StreamEngineTTSService(url=url(srv), voice=VOICE, options={"seed": 7})
    down, up = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame(text)],
        pipeline_params=PipelineParams(audio_out_sample_rate=16_000),
    )
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    pcm = one_turn(list(down), 16_000)
    # every byte the server made, in order: the same as asking the server directly
    assert pcm == await reference_pcm(srv, text, 16_000, seed=7)
    assert srv.service.metrics.value("stream_engine_streams_total", outcome="done") == 2


async def test_llm_text_stream_is_one_stream_with_ttfb(make_server):
    srv = await make_server()
    text = "Sure thing. The tavern opens at noon, and the stew is hot by one."
    words = text.split(" ")
    tts = StreamEngineTTSService(url=url(srv), voice=VOICE)
    down, up = await run_test(
        tts,
        frames_to_send=[
            LLMFullResponseStartFrame(),
            *(LLMTextFrame(w if i == 0 else " " + w) for i, w in enumerate(words)),
            LLMFullResponseEndFrame(),
        ],
        pipeline_params=PipelineParams(audio_out_sample_rate=22_050, enable_metrics=True),
    )
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    pcm = one_turn(list(down), 22_050)
    assert len(pcm) > 2 * 22_050 // 4  # a quarter of a second at least
    # the whole turn was one protocol stream, and all its text was spoken
    assert srv.service.metrics.value("stream_engine_streams_total", outcome="done") == 1
    assert not any(c.jobs for c in srv.service.connections)
    ttfb = [
        d
        for f in down
        if isinstance(f, MetricsFrame)
        for d in f.data
        if isinstance(d, TTFBMetricsData) and d.value > 0
    ]
    assert len(ttfb) == 1 and ttfb[0].processor == tts.name


async def test_interruption_cancels_the_stream_and_drops_its_audio(make_server):
    srv = await make_server()
    long_turn = " ".join(
        f"This is sentence number {n}, and it goes on for a little while." for n in range(12)
    )
    tts = StreamEngineTTSService(url=url(srv), voice=VOICE)

    async def script(send: Send, up: Recorder, down: Recorder) -> None:
        await send(LLMFullResponseStartFrame())
        for i, w in enumerate(long_turn.split(" ")):
            await send(LLMTextFrame(w if i == 0 else " " + w))
        await send(LLMFullResponseEndFrame())
        await down.wait_for(TTSAudioRawFrame)  # the bot is talking ...
        await send(InterruptionFrame())  # ... and the user barges in
        assert await settled(srv.service, timeout=30)  # every slot of the stream is free
        await asyncio.sleep(0.3)  # anything still on the wire would be here by now
        await send(TTSSpeakFrame("Sorry, go ahead."))  # and the service goes on
        await down.wait_for(TTSStoppedFrame)

    up, down = await drive(tts, script)
    metrics = srv.service.metrics
    assert metrics.value("stream_engine_streams_total", outcome="cancelled") == 1
    assert metrics.value("stream_engine_streams_total", outcome="done") == 1
    cut = next(i for i, f in enumerate(down.frames) if isinstance(f, InterruptionFrame))
    before, after = speech_frames(down.frames[:cut]), speech_frames(down.frames[cut:])
    old = before[0].context_id
    assert isinstance(before[0], TTSStartedFrame) and any(
        isinstance(f, TTSAudioRawFrame) for f in before
    )
    assert not any(isinstance(f, TTSStoppedFrame) for f in before)  # it never finished
    assert old not in {f.context_id for f in after}
    one_turn(after, 16_000)  # the next turn, whole
    assert not [f for f in up.frames if isinstance(f, ErrorFrame)]


async def test_server_error_becomes_an_error_frame(make_server):
    srv = await make_server()
    tts = StreamEngineTTSService(url=url(srv), voice="nobody")

    async def script(send: Send, up: Recorder, down: Recorder) -> None:
        await send(TTSSpeakFrame("Hello."))
        await up.wait_for(ErrorFrame)
        async with asyncio.timeout(30):  # the turn has ended and been accounted for
            while tts.get_audio_contexts():
                await asyncio.sleep(0.01)
        # the error made the service unusable; a new voice is what Pipecat lets fix that
        await send(TTSUpdateSettingsFrame(delta=TTSSettings(voice=VOICE)))
        await send(TTSSpeakFrame("Hello."))
        await down.wait_for(TTSStoppedFrame, count=2)

    up, down = await drive(tts, script)
    errors = [f for f in up.frames if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "unknown_voice" in errors[0].error
    speech = speech_frames(down.frames)
    failed = speech[:2]  # the turn with the bad voice: started, stopped, no audio
    assert [type(f) for f in failed] == [TTSStartedFrame, TTSStoppedFrame]
    one_turn(speech[2:], 16_000)
    assert await settled(srv.service)


async def test_reconnects_after_the_connection_is_lost(make_server):
    srv = await make_server()
    tts = StreamEngineTTSService(url=url(srv), voice=VOICE)
    connected = []

    @tts.event_handler("on_connected")
    async def on_connected(service):
        connected.append(service)

    async def script(send: Send, up: Recorder, down: Recorder) -> None:
        await send(TTSSpeakFrame("One."))
        await down.wait_for(TTSStoppedFrame)
        for conn in list(srv.service.connections):  # the server drops the connection
            conn.abort(1011, "test")
        async with asyncio.timeout(30):
            while len(connected) < 2:
                await asyncio.sleep(0.01)
        await send(TTSSpeakFrame("Two."))
        await down.wait_for(TTSStoppedFrame, count=2)

    up, down = await drive(tts, script)
    assert not [f for f in up.frames if isinstance(f, ErrorFrame)]
    speech = speech_frames(down.frames)
    cut = next(i for i, f in enumerate(speech) if isinstance(f, TTSStoppedFrame)) + 1
    one_turn(speech[:cut], 16_000)
    one_turn(speech[cut:], 16_000)
    assert srv.service.metrics.value("stream_engine_streams_total", outcome="done") == 2


async def test_a_rate_the_server_does_not_offer_is_an_error_at_start(make_server):
    srv = await make_server()
    tts = StreamEngineTTSService(url=url(srv), voice=VOICE, sample_rate=44_100)

    async def script(send: Send, up: Recorder, down: Recorder) -> None:
        await send(TTSSpeakFrame("Hello."))
        await down.wait_for(TTSStoppedFrame)

    up, down = await drive(tts, script)
    errors = [f.error for f in up.frames if isinstance(f, ErrorFrame)]
    assert errors and "44100 Hz" in errors[0] and "16000" in errors[0]
    assert not any(isinstance(f, TTSAudioRawFrame) for f in down.frames)


async def test_token_goes_as_a_bearer_header(make_server):
    srv = await make_server(token="s3cret")
    good = StreamEngineTTSService(url=url(srv), voice=VOICE, token="s3cret")
    down, up = await run_test(
        good,
        frames_to_send=[TTSSpeakFrame("Hello.")],
        pipeline_params=PipelineParams(audio_out_sample_rate=16_000),
    )
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    one_turn(list(down), 16_000)
    bad = StreamEngineTTSService(url=url(srv), voice=VOICE, token="guess")
    down, up = await run_test(
        bad,
        frames_to_send=[TTSSpeakFrame("Hello.")],
        pipeline_params=PipelineParams(audio_out_sample_rate=16_000),
    )
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert errors and "401" in errors[0].error and not bad.is_usable
    assert not any(isinstance(f, TTSAudioRawFrame) for f in down)


async def test_voice_agent_example(make_server, tmp_path):
    srv = await make_server()
    out = tmp_path / "agent.wav"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(AGENT),
        "--url",
        url(srv),
        "-o",
        str(out),
        "--fast",  # no real-time playback: as fast as the audio comes
        "--words-per-second",
        "12",  # answer 2 takes 5 s to write: the interruption comes long before its end
        "--interrupt-after",
        "0.3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 150)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    with wave.open(str(out), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 24_000)
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    assert len(pcm) > 24_000  # over a second of speech
    assert np.sqrt(np.mean((pcm / 32768) ** 2)) > 1e-3
    metrics = srv.service.metrics
    assert metrics.value("stream_engine_streams_total", outcome="cancelled") == 1  # turn 2
    assert metrics.value("stream_engine_streams_total", outcome="done") == 2  # turns 1, 3
    assert "interrupted" in stdout.decode()
