"""A Pipecat voice agent's speaking half, with stream-engine as its text-to-speech.

A scripted "LLM" writes three answers word by word, as a real LLM streams tokens, into a
Pipecat pipeline; ``StreamEngineTTSService`` speaks them as they are written (the server cuts
the text into sentences); a speaker plays the audio in real time into a WAV file (and to the
sound card with ``--play``). Midway through the second answer the user barges in: an
``InterruptionFrame``, what Pipecat's turn-taking sends when the user starts talking. The LLM
stops, the rest of answer 2 is cancelled on the server and never heard, and answer 3 replies.

    python clients/voice-agent/agent.py --url ws://127.0.0.1:8765 -o agent.wav [--play]
    python clients/voice-agent/agent.py -o agent.wav      # no server: start one here

See README.md beside this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import warnings
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loguru import logger

with warnings.catch_warnings():  # Pipecat 1.14's own deprecation warnings, on import
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    warnings.filterwarnings("ignore", "`AudioContextTTSService` is deprecated", DeprecationWarning)
    from pipecat.frames.frames import (
        EndFrame,
        Frame,
        InterruptionFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.workers.runner import WorkerRunner

from stream_engine.cli import Player, find_player
from stream_engine.integrations.pipecat import StreamEngineTTSService

ANSWERS = [
    "Hi! I'm your travel assistant. Ask me anything about your trip to Lisbon.",
    "Lisbon is built on seven hills, so bring comfortable shoes. The old yellow trams are "
    "the best way to see the city, and tram twenty eight goes past most of the sights. In "
    "the evening, head to the Alfama for dinner and fado music, and don't miss the custard "
    "tarts in Belem, they are famous for a reason.",
    "Oh, sorry! Go ahead, what would you like to know?",
]


@dataclass
class Turn:
    """One answer: what the LLM meant to say and what the listener heard of it."""

    text: str
    written: str = ""  # the words the LLM got out before it stopped
    heard_s: float = 0.0  # seconds of its audio played
    first_audio_s: float | None = None  # from its first word to its first audio played
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)


class Speaker(FrameProcessor):
    """Plays the bot's audio in real time, as a transport's output would: each audio frame
    goes to the WAV (and the player) and takes its duration to play. Audio still waiting when
    an interruption comes is dropped unheard (a processor drops its queued frames then).

    The WAV is what a listener heard, the silences between turns included.
    """

    def __init__(self, player: Player | None, realtime: bool = True) -> None:
        super().__init__()
        self.player = player
        self.realtime = realtime
        self.pcm = bytearray()
        self.sample_rate = 0
        self.turn: Turn | None = None  # the answer being spoken now
        self.playing = asyncio.Event()  # the current turn's audio has started
        self.finished = asyncio.Event()  # the current turn's TTSStoppedFrame came
        self._clock: float | None = None  # when the audio written so far ends, in real time

    def next_turn(self, turn: Turn) -> None:
        self.turn = turn
        self.playing.clear()
        self.finished.clear()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            await self.play(frame)
        elif isinstance(frame, TTSStoppedFrame):
            self.finished.set()
        await self.push_frame(frame, direction)

    async def play(self, frame: TTSAudioRawFrame) -> None:
        now = time.monotonic()
        self.sample_rate = frame.sample_rate
        if self._clock is not None and self.realtime and now > self._clock:  # a silence
            self.pcm += bytes(2 * int((now - self._clock) * frame.sample_rate))
        self.pcm += frame.audio
        if self.player is not None:
            self.player.play(frame.audio, frame.sample_rate)
        seconds = len(frame.audio) / 2 / frame.sample_rate
        self._clock = max(now, self._clock or now) + seconds
        if self.turn is not None:
            if self.turn.first_audio_s is None:
                self.turn.first_audio_s = now - self.turn.started
            self.turn.heard_s += seconds
        self.playing.set()
        if self.realtime:
            await asyncio.sleep(seconds)  # cancelled if an interruption comes meanwhile


async def llm(text: str, words_per_second: float) -> AsyncIterator[str]:
    """The scripted LLM: ``text`` a word at a time."""
    for i, word in enumerate(text.split(" ")):
        await asyncio.sleep(1.0 / words_per_second)
        yield word if i == 0 else " " + word


async def answer(worker: PipelineWorker, turn: Turn, words_per_second: float) -> None:
    """Stream one answer into the pipeline, as Pipecat's LLM services push it."""
    await worker.queue_frame(LLMFullResponseStartFrame())
    async for word in llm(turn.text, words_per_second):
        await worker.queue_frame(LLMTextFrame(word))
        turn.written += word
    await worker.queue_frame(LLMFullResponseEndFrame())


async def converse(
    worker: PipelineWorker, speaker: Speaker, words_per_second: float, interrupt_after: float
) -> list[Turn]:
    turns = [Turn(text) for text in ANSWERS]
    first, second, third = turns

    speaker.next_turn(first)  # answer 1, heard whole
    await answer(worker, first, words_per_second)
    await speaker.finished.wait()

    speaker.next_turn(second)  # answer 2: the user barges in
    second.started = time.monotonic()
    writing = asyncio.create_task(answer(worker, second, words_per_second))
    while not (speaker.playing.is_set() or speaker.finished.is_set()):  # it is talking
        await asyncio.sleep(0.01)
    await asyncio.sleep(interrupt_after)
    writing.cancel()  # the LLM stops writing ...
    with contextlib.suppress(asyncio.CancelledError):
        await writing
    second.interrupted = True
    await worker.queue_frame(InterruptionFrame())  # ... and what it wrote is not spoken

    speaker.next_turn(third)  # answer 3
    third.started = time.monotonic()
    await answer(worker, third, words_per_second)
    await speaker.finished.wait()
    return turns


async def run(args: argparse.Namespace) -> list[Turn]:
    server = None
    url = args.url
    if url is None:  # no server given: start one in this process
        from stream_engine.server.app import Server

        server = await Server.start_local(args.model, args.device)
        url = server.url
    player = Player(args.player) if args.player else None
    try:
        # the one line that adds stream-engine to a Pipecat pipeline:
        tts = StreamEngineTTSService(url=url, voice=args.voice, token=args.token)
        speaker = Speaker(player, realtime=not args.fast)
        worker = PipelineWorker(
            Pipeline([tts, speaker]),  # a real agent: [input, stt, context, llm, tts, output]
            params=PipelineParams(audio_out_sample_rate=args.rate),
            idle_timeout_secs=None,
        )
        started, connected = asyncio.Event(), asyncio.Event()

        @worker.event_handler("on_pipeline_started")
        async def on_started(_worker: PipelineWorker, _frame: Frame) -> None:
            started.set()

        @tts.event_handler("on_connected")
        async def on_connected(service: StreamEngineTTSService) -> None:
            connected.set()

        async def talk() -> list[Turn]:
            try:
                await started.wait()  # the service has tried to connect by now
                if not connected.is_set():
                    raise ConnectionError(f"cannot connect to {url}")
                return await converse(worker, speaker, args.words_per_second, args.interrupt_after)
            finally:
                await worker.queue_frame(EndFrame())  # the pipeline ends once all is played

        runner = WorkerRunner(handle_sigint=True)
        await runner.add_workers(worker)
        conversation = asyncio.create_task(talk())
        await runner.run()
        if not conversation.done():  # the pipeline stopped first (Ctrl-C)
            conversation.cancel()
        turns = await conversation
        write_wav(args.output, bytes(speaker.pcm), speaker.sample_rate or args.rate)
        return turns
    finally:
        if player is not None:
            await player.close()
        if server is not None:
            await server.stop(timeout=0)


def write_wav(path: str, pcm: bytes, sample_rate: int) -> None:
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server; default: start one here")
    p.add_argument("--token", default=None, help="the server's --token")
    p.add_argument("--model", default="random:tiny", help="the model of the in-process server")
    p.add_argument("--device", default=None, help="the in-process server's device")
    p.add_argument("--voice", default="v2/en_speaker_6")
    p.add_argument("--rate", type=int, default=24_000, help="the pipeline's audio rate (Hz)")
    p.add_argument("-o", "--output", default="agent.wav", help="the WAV file to write")
    p.add_argument("--play", action="store_true", help="also play it (aplay, paplay or ffplay)")
    p.add_argument("--words-per-second", type=float, default=6.0, help="the LLM's pace")
    p.add_argument("--interrupt-after", type=float, default=1.0, help="seconds of answer 2 heard")
    p.add_argument("--fast", action="store_true", help="don't play in real time (tests)")
    p.add_argument("-v", "--verbose", action="store_true", help="Pipecat's debug log")
    args = p.parse_args(argv)
    args.player = None
    if args.play:
        args.player = find_player()
        if args.player is None:
            p.error("--play needs aplay, paplay or ffplay on PATH")
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "WARNING")

    try:
        turns = asyncio.run(run(args))
    except ConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for n, turn in enumerate(turns, 1):
        cut = " (interrupted)" if turn.interrupted else ""
        first = f", first audio after {turn.first_audio_s:.2f} s" if turn.first_audio_s else ""
        print(f"answer {n}: {turn.heard_s:.2f} s heard{cut}{first}")
        print(f"    {turn.written!r}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
