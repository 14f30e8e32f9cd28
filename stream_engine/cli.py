"""Command line: ``stream-engine serve`` and ``stream-engine say TEXT -o out.wav``.

``say`` speaks through the streaming client (:mod:`stream_engine.client`): on a running server
with ``--url``, else on a server it starts in this process with ``--model``. ``say -`` reads
standard input and sends the text as it arrives, so ``some-llm | stream-engine say - --url
ws://...`` talks while the LLM writes. ``--play`` pipes the audio to an audio player as it
arrives; the WAV file is written at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import threading
import time
import wave
from collections.abc import AsyncIterator, Callable
from typing import Any, TextIO

import numpy as np

from .config import SECTIONS, Settings, load_settings, setting_fields
from .server.scaling import Scaling


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    """Float samples in [-1, 1] as a 16-bit mono WAV file."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    write_wav_pcm16(path, pcm.tobytes(), sample_rate)


def write_wav_pcm16(path: str, pcm: bytes, sample_rate: int) -> None:
    """16-bit little-endian mono samples as a WAV file."""
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="suno/bark-small", help="hub id, HF directory or random:*")
    p.add_argument("--device", default=None, help="cuda when available, else cpu")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")


def _show_default(value: object) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _number_type(kind: str, optional: bool) -> Callable[[str], object]:
    convert: Callable[[str], object] = int if kind == "int" else float

    def number(text: str) -> object:
        if optional and text.lower() == "none":
            return None
        return convert(text)

    number.__name__ = kind  # argparse names it in "invalid int value"
    return number


def _split_type(sep: str) -> Callable[[str], tuple[str, ...]]:
    def split(text: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in text.split(sep) if part.strip())

    split.__name__ = "list"
    return split


def _pair(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_setting_flags(p: argparse.ArgumentParser, section: str, cls: type) -> None:
    """One flag per field of the settings dataclass ``cls`` (see stream_engine.config).

    The flag is ``--field-name`` unless the field's rule names it; its help is the field's.
    Nothing is repeated here: a flag that is not given is absent from the namespace (its dest
    is ``section.field``), so the dataclass default (or the config file) holds. Sets (the
    segmenter's abbreviations) are left to the config file.
    """
    group = p.add_argument_group(f"{section} settings ([{section}] in --config FILE)")
    for s in setting_fields(cls):
        if s.kind == "set":
            continue
        rule = s.rule
        help_text = f"{rule.help} (default: {_show_default(s.default)})".replace("%", "%%")
        kw: dict[str, Any] = {
            "dest": f"{section}.{s.name}",
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        if s.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif s.kind in ("int", "float"):
            kw["type"] = _number_type(s.kind, s.optional)
            kw["metavar"] = rule.metavar or ("N" if s.kind == "int" else "X")
        elif s.kind == "str":
            if rule.choices is not None:
                kw["choices"] = rule.choices
            else:
                kw["metavar"] = rule.metavar or "TEXT"
        elif s.kind == "strings" and rule.sep is not None:
            kw["type"] = _split_type(rule.sep)
            kw["metavar"] = rule.metavar or f"TEXT{rule.sep}..."
        elif s.kind in ("strings", "pairs"):
            kw["action"] = "append"
            kw["metavar"] = rule.metavar or "TEXT"
            if s.kind == "pairs":
                kw["type"] = _pair
        else:  # a kind this function does not know yet
            raise TypeError(f"{cls.__name__}.{s.name}: no flag for a {s.kind}")
        group.add_argument(rule.flag or "--" + s.name.replace("_", "-"), **kw)


def setting_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The settings given as flags, by section: ``{"server": {"port": 80}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, dot, name = dest.partition(".")
        if dot:
            out.setdefault(section, {})[name] = value
    return out


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="stream-engine")
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the streaming WebSocket server")
    _model_args(serve)
    serve.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="settings from a TOML file: tables [engine], [server], [limits], [segmenter], keys "
        "as the flags below with underscores; flags override it",
    )
    ray = serve.add_argument_group(
        "Ray Serve (pip install 'stream-engine[ray]'; docs/ray.md)",
        "--host and --port are then those of Serve's proxy, which spreads connections over "
        "the replicas; each replica loads the model",
    )
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve")
    ray.add_argument("--replicas", type=int, default=None, metavar="N", help="a fixed number")
    ray.add_argument("--min-replicas", type=int, default=None, metavar="N", help="autoscale")
    ray.add_argument("--max-replicas", type=int, default=None, metavar="N", help="autoscale")
    ray.add_argument(
        "--target-connections",
        type=float,
        default=None,
        metavar="X",
        help="open connections per replica that autoscaling aims at (default: "
        f"{Scaling.target_connections})",
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)",
    )
    serve.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="on exit, write the engine's last 200000 stage steps to FILE as a Chrome trace "
        "(open in https://ui.perfetto.dev or chrome://tracing)",
    )
    serve.add_argument("--log-level", default="info")
    for section, cls in SECTIONS.items():
        add_setting_flags(serve, section, cls)

    say = sub.add_parser("say", help="speak TEXT to a WAV file and/or the speakers")
    say.add_argument("text", help="the text; '-' reads standard input and speaks it as it comes")
    say.add_argument(
        "-o", "--output", default=None, help="WAV file (default out.wav; none with --play)"
    )
    say.add_argument(
        "--play",
        action="store_true",
        help=f"play as it arrives (needs one of {', '.join(PLAYERS)})",
    )
    _model_args(say)
    say.add_argument("--voice", default=None)
    say.add_argument("--seed", type=int, default=None)
    say.add_argument("--sample-rate", type=int, default=None, help="default: the server's (24000)")
    say.add_argument("--url", default=None, help="a running server (ws://HOST:PORT)")
    say.add_argument("--token", default=None)
    say.add_argument(
        "--flush-after",
        type=float,
        default=1.0,
        help="with '-': speak buffered text after the input pauses this long (s; 0: never)",
    )
    say.add_argument(
        "--early-audio",
        action="store_true",
        help="let a segment's audio start before it is generated whole (docs/protocol.md)",
    )
    say.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr (the default when stderr is a terminal)",
    )
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
    # every setting is checked before the model loads: a bad flag fails at once
    settings = load_settings(args.config, setting_overrides(args))
    if args.ray:
        return _serve_ray(args, settings)
    from .engine import Engine
    from .server.app import Server

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, config=settings.engine)
    trace = None
    if args.trace:
        from .runtime.trace import StepTrace

        trace = StepTrace(limit=200_000)
        engine.runtime.observers.append(trace)
    try:
        server = Server(engine, settings.server, settings.limits, segmenting=settings.segmenter)
        asyncio.run(server.serve_forever())
    finally:
        if trace is not None:
            n = trace.chrome(args.trace)
            logging.getLogger(__name__).info("wrote %d stage steps to %s", n, args.trace)
    return 0


def _serve_ray(args: argparse.Namespace, settings: Settings) -> int:
    from .errors import InvalidOption
    from .server.ray_serve import ReplicaArgs, run

    if args.trace:
        raise InvalidOption("--trace is for one process; on Ray Serve each replica has its own")
    if args.replicas is not None and (args.min_replicas or args.max_replicas):
        raise InvalidOption("--replicas, or --min-replicas/--max-replicas: not both")
    autoscale = args.min_replicas is not None or args.max_replicas is not None
    lo = args.min_replicas if args.min_replicas is not None else 1
    hi = args.max_replicas if args.max_replicas is not None else max(lo, 1)
    if min(lo, hi) < 1 or lo > hi or (args.replicas is not None and args.replicas < 1):
        raise InvalidOption("replica counts must be >= 1, and --min-replicas <= --max-replicas")
    scaling = Scaling(
        replicas=None if autoscale else (args.replicas or 1),
        min_replicas=lo,
        max_replicas=hi,
        target_connections=args.target_connections or Scaling.target_connections,
        graceful_shutdown_timeout_s=max(
            Scaling.graceful_shutdown_timeout_s, settings.server.shutdown_timeout_s + 30.0
        ),
    )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    tables = {name: dataclasses.asdict(getattr(settings, name)) for name in SECTIONS}
    replica = ReplicaArgs(args.model, args.device, args.dtype, tables)
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    run(replica, scaling, settings.server.host, settings.server.port, address)
    return 0


# -- say -------------------------------------------------------------------------------------

# audio players that read raw 16-bit mono PCM on standard input; {rate} is the sample rate
PLAYERS: dict[str, list[str]] = {
    "aplay": ["-q", "-t", "raw", "-f", "S16_LE", "-c", "1", "-r", "{rate}", "-"],
    "paplay": ["--raw", "--format=s16le", "--channels=1", "--rate={rate}"],
    "ffplay": [
        "-nodisp",
        "-autoexit",
        "-loglevel",
        "error",
        "-f",
        "s16le",
        "-ar",
        "{rate}",
        "-i",
        "-",
    ],
}


def find_player() -> str | None:
    """The first of :data:`PLAYERS` on PATH."""
    return next((name for name in PLAYERS if shutil.which(name)), None)


class Player:
    """Plays 16-bit mono PCM by piping it to an audio player process.

    :meth:`play` never waits: a task writes to the player at the pace it plays, so the
    stream is read as fast as it arrives (a server drops clients that fall far behind).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def play(self, pcm: bytes, sample_rate: int) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run(sample_rate))
        self.queue.put_nowait(pcm)

    async def _run(self, sample_rate: int) -> None:
        path = shutil.which(self.name) or self.name
        args = [a.format(rate=sample_rate) for a in PLAYERS[self.name]]
        self.proc = proc = await asyncio.create_subprocess_exec(
            path, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
        )
        assert proc.stdin is not None
        try:
            while (pcm := await self.queue.get()) is not None:
                proc.stdin.write(pcm)
                await proc.stdin.drain()
            proc.stdin.close()
            await proc.stdin.wait_closed()
        except (BrokenPipeError, ConnectionResetError):
            print(f"warning: {self.name} stopped; not playing the rest", file=sys.stderr)
        await proc.wait()

    async def close(self, wait: bool = True) -> None:
        """Let the player finish what it was given (``wait``), or stop it now."""
        if self.task is None:
            return
        if wait:
            self.queue.put_nowait(None)
        else:
            self.task.cancel()
            if self.proc is not None and self.proc.returncode is None:
                self.proc.kill()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if self.proc is not None and self.proc.returncode is None:
            await self.proc.wait()


class Progress:
    """Segments done, audio seconds and elapsed time, on stderr.

    On a terminal one line is rewritten in place; elsewhere a line is printed per segment.
    """

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self.started = time.monotonic()
        self.segments = -1
        self.shown_at = 0.0

    def update(self, segments: int, audio_s: float, force: bool = False) -> None:
        now = time.monotonic()
        if self.live:
            if not force and now - self.shown_at < 0.1:
                return
            elapsed = now - self.started
            self.out.write(
                f"\rsegments {segments} | audio {audio_s:6.1f} s | elapsed {elapsed:6.1f} s"
            )
        elif segments != self.segments or force:
            elapsed = now - self.started
            self.out.write(
                f"segments {segments} | audio {audio_s:.1f} s | elapsed {elapsed:.1f} s\n"
            )
        else:
            return
        self.segments = segments
        self.shown_at = now
        self.out.flush()

    def finish(self, segments: int, audio_s: float) -> None:
        self.update(segments, audio_s, force=True)
        if self.live:
            self.out.write("\n")
            self.out.flush()


async def read_text(fd: int) -> AsyncIterator[str]:
    """Text from a file descriptor as it arrives (UTF-8), read by a daemon thread.

    A thread, not the event loop's pipe reader, so that regular files and terminals work too;
    a daemon, so that a read that never returns does not keep the process alive.
    """
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

    def post(item: bytes | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(pieces.put_nowait, item)

    def reader() -> None:
        try:
            while data := os.read(fd, 65536):
                post(data)
            post(None)
        except OSError as e:
            post(e)

    threading.Thread(target=reader, name="stdin reader", daemon=True).start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        item = await pieces.get()
        if isinstance(item, BaseException):
            raise item
        text = decoder.decode(item or b"", final=item is None)
        if text:
            yield text
        if item is None:
            return


def _say(args: argparse.Namespace) -> int:
    player = None
    if args.play:
        name = find_player()
        if name is None:
            print(
                f"error: --play needs an audio player on PATH ({', '.join(PLAYERS)}); none found. "
                "Install one (e.g. alsa-utils for aplay) or write a file with -o.",
                file=sys.stderr,
            )
            return 2
        player = Player(name)
    output = args.output if args.output is not None else (None if args.play else "out.wav")
    show = args.progress or sys.stderr.isatty()
    progress = Progress(sys.stderr, live=sys.stderr.isatty()) if show else None
    try:
        pcm, rate = asyncio.run(_say_async(args, player, progress))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = len(pcm) / 2 / rate
    if output is not None:
        write_wav_pcm16(output, pcm, rate)
        print(f"wrote {output}: {seconds:.2f} s of audio")
    return 0


async def _say_async(
    args: argparse.Namespace, player: Player | None, progress: Progress | None
) -> tuple[bytes, int]:
    from websockets.exceptions import InvalidStatus

    from .client import connect
    from .errors import ServerError

    server = None
    url = args.url
    if url is None:
        from .server.app import Server

        server = await Server.start_local(args.model, args.device, args.dtype)
        url = server.url
    pcm: list[bytes] = []
    rate = args.sample_rate or 24_000
    audio_s = 0.0
    ok = False
    try:
        async with connect(url, token=args.token) as conn:
            stream = await conn.speak(
                voice=args.voice,
                format="pcm_s16le",
                sample_rate=args.sample_rate,
                options=None if args.seed is None else {"seed": args.seed},
                early_audio=args.early_audio,
            )
            if progress is not None:
                progress.started = time.monotonic()
            feeder = None
            if args.text == "-":
                feed = stream.feed(
                    read_text(sys.stdin.fileno()), flush_after=args.flush_after or None
                )
                feeder = asyncio.create_task(feed)
            else:
                await stream.end(args.text)
            try:
                async for chunk in stream:
                    rate = chunk.sample_rate
                    pcm.append(chunk.payload)
                    audio_s += chunk.duration
                    if player is not None:
                        player.play(chunk.payload, rate)
                    if progress is not None:
                        progress.update(len(stream.segments), audio_s)
            finally:
                if feeder is not None:
                    if not feeder.done():
                        feeder.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await feeder  # raises what the feeder failed with
            rate = stream.sample_rate or rate
            if progress is not None:
                progress.finish(len(stream.segments), audio_s)
            if stream.outcome == "cancelled":
                raise ServerError("cancelled", "the server cancelled the stream")
        ok = True
    except InvalidStatus as e:
        raise ServerError("refused", f"the server refused the connection: {e}") from e
    finally:
        if player is not None:
            await player.close(wait=ok)
        if server is not None:
            await server.stop(timeout=0)
    return b"".join(pcm), rate
