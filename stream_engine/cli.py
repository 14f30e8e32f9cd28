"""Command line: ``stream-engine serve`` and ``stream-engine say TEXT -o out.wav``."""

from __future__ import annotations

import argparse
import asyncio
import logging
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


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="suno/bark-small", help="hub id, HF directory or random:*")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="stream-engine")
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the streaming WebSocket server")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token", default=None, help="require this bearer token")
    serve.add_argument("--allow-origin", action="append", default=None, help="repeatable")
    serve.add_argument("--max-connections", type=int, default=64)
    serve.add_argument("--log-level", default="info")

    say = sub.add_parser("say", help="synthesize TEXT to a WAV file")
    say.add_argument("text")
    say.add_argument("-o", "--output", default="out.wav")
    _model_args(say)
    say.add_argument("--voice", default=None)
    say.add_argument("--seed", type=int, default=None)
    say.add_argument("--url", default=None, help="ask a running server (ws://HOST:PORT)")
    say.add_argument("--token", default=None)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .errors import StreamEngineError

    try:
        if args.command == "serve":
            return _serve(args)
        return _say(args)
    except StreamEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from .config import ServerConfig
    from .engine import Engine
    from .server.app import Server

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        host=args.host,
        port=args.port,
        token=args.token,
        allowed_origins=tuple(args.allow_origin) if args.allow_origin else None,
        max_connections=args.max_connections,
    )
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    asyncio.run(Server(engine, config).serve_forever())
    return 0


def _say(args: argparse.Namespace) -> int:
    if args.url:
        from .client import synthesize

        audio, rate = asyncio.run(
            synthesize(args.url, args.text, voice=args.voice, seed=args.seed, token=args.token)
        )
    else:
        from .engine import Engine

        engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
        speech = engine.generate(args.text, voice=args.voice, seed=args.seed)[0]
        audio, rate = speech.audio, speech.sample_rate
    write_wav(args.output, audio, rate)
    print(f"wrote {args.output}: {len(audio) / rate:.2f} s of audio")
    return 0
