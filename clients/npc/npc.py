"""Game NPCs talking over one stream-engine connection.

A tavern scene: four characters, each with their own voice, share ONE WebSocket connection;
every line is one stream. The innkeeper and the bard talk at the same time; the merchant's
sales pitch is written word by word (as a dialogue model would write it) and spoken as it is
written, until the guard cuts him off mid-sentence: the merchant's stream is cancelled and the
guard's line starts on a new stream. The merchant then answers on another new stream.

Each character's audio goes to ``OUT/<name>.wav`` (their lines one after another) and a
summary of every line to ``OUT/scene.json``.

    python clients/npc/npc.py --url ws://127.0.0.1:8765 --out npc_out
    python clients/npc/npc.py --model random:tiny --out npc_out   # no server: start one here

See README.md beside this file for how a game engine would do the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream_engine.client import Connection, Stream, connect

GAP_S = 0.3  # silence between a character's lines in their WAV file


@dataclass
class Line:
    """One spoken line: what was meant, what was said, and how it ended."""

    character: str
    text: str
    stream: int | None = None  # the stream number on the connection
    outcome: str | None = None  # done, cancelled or error
    spoken: str = ""  # the text of the segments whose audio arrived
    audio_s: float = 0.0
    first_audio_s: float | None = None  # from the line's first text to its first audio
    interrupted: bool = False
    start_s: float = 0.0  # when the line began and ended, in seconds into the scene
    end_s: float = 0.0


@dataclass
class Character:
    name: str
    voice: str | None
    seed: int
    t0: float = field(default_factory=time.monotonic)  # the scene's start
    audio: list[np.ndarray] = field(default_factory=list)
    sample_rate: int = 24_000
    current: Stream | None = None
    lines: list[Line] = field(default_factory=list)

    async def say(
        self,
        conn: Connection,
        text: str,
        *,
        fmt: str = "pcm_s16le",
        sample_rate: int | None = None,
        pace: float | None = None,
        on_audio: asyncio.Event | None = None,
    ) -> Line:
        """Speak one line on a new stream; return when it ends (done or cancelled).

        ``pace``: words per second at which the text is written (a dialogue model writing the
        line); ``None``: the whole line at once. ``on_audio`` is set at the first audio.
        """
        line = Line(self.name, text, start_s=round(time.monotonic() - self.t0, 3))
        self.lines.append(line)
        stream = await conn.speak(
            voice=self.voice,
            format=fmt,
            sample_rate=sample_rate,
            options={"seed": self.seed + len(self.lines)},
            decode=True,  # Opus packets decoded to float32 too (a game could decode itself)
        )
        self.current = stream
        writer = None
        if pace is None:
            await stream.end(text)
        else:
            writer = asyncio.create_task(stream.feed(words(text, pace)))
        parts = []
        last = None
        try:
            async for chunk in stream:
                last = chunk
                # a game engine pushes this into the character's audio source queue here
                assert chunk.audio is not None
                parts.append(chunk.audio)
                self.sample_rate = chunk.sample_rate
                if line.first_audio_s is None:
                    line.first_audio_s = round(chunk.elapsed, 3)
                    if on_audio is not None:
                        on_audio.set()
        finally:
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
        line.end_s = round(time.monotonic() - self.t0, 3)
        line.stream = stream.number
        line.outcome = stream.outcome
        line.spoken = " ".join(s.text for s in stream.segments)
        if last is not None and last.segment >= len(stream.segments):  # cut off mid-segment
            line.spoken = f"{line.spoken} {last.text}".strip()
        line.audio_s = round(sum(len(p) for p in parts) / self.sample_rate, 3)
        if parts:
            self.audio.append(np.concatenate(parts))
        return line

    async def interrupt(self) -> None:
        """Stop the line being spoken (its stream is cancelled; nothing more arrives)."""
        if self.current is not None and not self.current.ended:
            await self.current.cancel()
            self.lines[-1].interrupted = True


async def words(text: str, per_second: float) -> AsyncIterator[str]:
    """``text`` a word at a time, as a dialogue model would write it."""
    for i, word in enumerate(text.split(" ")):
        yield word if i == 0 else " " + word
        await asyncio.sleep(1.0 / per_second)


# -- the scene -------------------------------------------------------------------------------

CAST = {  # name -> the voice each would like (any other voice will do if the server lacks it)
    "innkeeper": "v2/en_speaker_6",
    "bard": "v2/en_speaker_9",
    "merchant": "v2/en_speaker_1",
    "guard": "v2/en_speaker_3",
}
GREETING = "Welcome, traveller! Sit by the fire, the stew is hot and the ale is cold."
SONG = "Gather round, friends, and hear the ballad of the lost crown."
PITCH = (
    "Fine silks from the east, spices from the south, and a sword that once belonged to a "
    "king. Only three gold pieces, a bargain you will never see again, I swear it on the "
    "grave of my dear old mother, may she rest in peace, and on the honour of my family."
)
HALT = "Enough! That sword is stolen property."
REPLY = "Stolen? Surely there is some mistake, officer."


def pick_voices(available: list[str]) -> dict[str, str | None]:
    """Each character's voice: their favourite if the server has it, else a distinct other."""
    chosen: dict[str, str | None] = {}
    spare = [v for v in available if v not in CAST.values()]
    for name, favourite in CAST.items():
        if favourite in available:
            chosen[name] = favourite
        else:
            chosen[name] = spare.pop(0) if spare else None
    return chosen


async def run_scene(
    url: str,
    out: Path,
    *,
    token: str | None = None,
    fmt: str = "pcm_s16le",
    pace: float = 6.0,
    interrupt_after: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Play the scene against the server at ``url``; write the WAVs and scene.json to ``out``.

    The guard cuts in ``interrupt_after`` seconds after the merchant's first audio arrives.
    """
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    async with connect(url, token=token) as conn:  # ONE connection for the whole scene
        voices = pick_voices(conn.voices)
        cast = {
            n: Character(n, v, seed + 100 * i, started) for i, (n, v) in enumerate(voices.items())
        }
        inn, bard, merchant, guard = (cast[n] for n in CAST)

        # two characters at once: two streams on the connection at the same time
        await asyncio.gather(inn.say(conn, GREETING, fmt=fmt), bard.say(conn, SONG, fmt=fmt))

        # the merchant talks while his line is being written ...
        heard = asyncio.Event()
        pitch = asyncio.create_task(merchant.say(conn, PITCH, fmt=fmt, pace=pace, on_audio=heard))
        await heard.wait()
        await asyncio.sleep(interrupt_after)
        # ... until the guard cuts him off: cancel his stream, open the guard's
        await merchant.interrupt()
        await guard.say(conn, HALT, fmt=fmt)
        await pitch
        await merchant.say(conn, REPLY, fmt=fmt)

    summary: dict[str, Any] = {"url": url, "format": fmt, "characters": {}, "lines": []}
    for c in cast.values():
        path = out / f"{c.name}.wav"
        write_wav(path, c.audio, c.sample_rate)
        summary["characters"][c.name] = {
            "voice": c.voice,
            "wav": str(path),
            "sample_rate": c.sample_rate,
            "lines": len(c.lines),
        }
    lines = sorted((ln for c in cast.values() for ln in c.lines), key=lambda ln: ln.stream or 0)
    summary["lines"] = [asdict(ln) for ln in lines]
    summary["seconds"] = round(time.monotonic() - started, 2)
    (out / "scene.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def write_wav(path: Path, lines: list[np.ndarray], sample_rate: int) -> None:
    gap = np.zeros(int(GAP_S * sample_rate), np.float32)
    parts = [p for line in lines for p in (line, gap)][:-1]
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = None
    url = args.url
    if url is None:  # no server given: start one in this process
        from stream_engine.server.app import Server

        server = await Server.start_local(args.model, args.device)
        url = server.url
    try:
        return await run_scene(
            url,
            Path(args.out),
            token=args.token,
            fmt=args.format,
            pace=args.pace,
            interrupt_after=args.interrupt_after,
            seed=args.seed,
        )
    finally:
        if server is not None:
            await server.stop(timeout=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server; default: start one here")
    p.add_argument("--token", default=None)
    p.add_argument("--model", default="random:tiny", help="the model of the in-process server")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="npc_out", help="directory for the WAVs and scene.json")
    p.add_argument("--format", default="pcm_s16le", choices=["pcm_s16le", "pcm_f32le", "opus"])
    p.add_argument("--pace", type=float, default=6.0, help="words per second of the pitch")
    p.add_argument("--interrupt-after", type=float, default=0.5, help="seconds of the pitch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = asyncio.run(run(args))
    for ln in summary["lines"]:
        cut = " (interrupted)" if ln["interrupted"] else ""
        print(f"[{ln['stream']}] {ln['character']:>9}: {ln['outcome']}{cut}, {ln['audio_s']} s")
        print(f"            {ln['spoken']!r}")
    print(f"wrote {len(summary['characters'])} WAVs and scene.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
