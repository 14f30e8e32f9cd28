"""Command line: ``stream-engine say TEXT -o out.wav`` (in-process synthesis)."""

from __future__ import annotations

import argparse
import sys
import wave

import numpy as np


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stream-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    say = sub.add_parser("say", help="synthesize TEXT to a WAV file")
    say.add_argument("text")
    say.add_argument("-o", "--output", default="out.wav")
    say.add_argument("--model", default="suno/bark-small")
    say.add_argument("--voice", default=None)
    say.add_argument("--device", default=None)
    say.add_argument("--dtype", default=None)
    say.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    from .engine import Engine
    from .errors import StreamEngineError

    try:
        engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
        speech = engine.generate(args.text, voice=args.voice, seed=args.seed)[0]
    except StreamEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_wav(args.output, speech.audio, speech.sample_rate)
    print(f"wrote {args.output}: {speech.duration_s:.2f} s of audio")
    return 0
