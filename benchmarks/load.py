"""Load test: N concurrent streaming clients against our server and a naive one, in one run.

Each client has its own WebSocket connection and speaks one paragraph of ``--sentences``
sentences, sent word by word (the way a language model produces text: each word with its
trailing space is one ``speak`` message, the last one ``final``), and reads all its audio
(``pcm_s16le`` at 24 kHz). All clients of a round start together. Per stream we measure:

* **TTFA**: time from sending the first word to receiving the first binary audio frame;
* **RTF**: time from the first word to ``done``, divided by the seconds of audio received
  (below 1: the audio arrived faster than it plays);

and per round the **throughput**: audio seconds received by all clients / wall seconds from
the first word sent to the last ``done``.

Both servers run in this process, on the engine's one copy of the weights, one after the other
for each N (never at the same time): ours (``stream_engine.server.app.Server``) and the naive
baseline (``benchmarks/naive_server.py``: one ``BarkModel.generate`` call per sentence, one
call at a time, with the same sampling settings and, on ``random:*`` models, the same
semantic-token cap per text as our engine). Every client of a round gets a different paragraph
(sentences cycle through ``common.SENTENCES``, or short ones with ``--short``), and
each round (``--rounds``) other paragraphs; both servers get the same ones. With
``--early-audio`` a third side, ``early``, runs the same rounds on our server with clients that
open their streams with ``early_audio`` (audio of a segment before it is generated whole).

The side ``http`` (on by default; ``--no-http`` leaves it out) runs the same rounds, with the
same paragraphs per client, against our server's ``POST /v1/audio/speech`` (``docs/http.md``)
through the real ``openai`` SDK, one ``AsyncOpenAI`` client per simulated client (closed
after the round): each client sends its whole paragraph as one request (``response_format
"pcm"``: s16le at 24 kHz, ``stream_format "audio"``, the same voice, no options, as the
WebSocket side) and reads the body as it streams. TTFA: request sent -> first non-empty body
chunk (this includes the loopback TCP connect, which the WebSocket side makes before the
round); RTF: request sent -> body complete, over the audio seconds received (bytes / 2 /
24000); throughput as above. **The two sides do not send text the same way**: the WebSocket
sides send it word by word, the HTTP side has the whole paragraph at once (the table's
``text`` column says which). That favours HTTP slightly: the segmenter sees the end of the
first segment at once instead of when its last word arrives. The segments are the same either
way (the segmenter cuts the same text the same, whatever pieces it comes in).

Order: for each N, round by round, our two sides run next to each other so that what they are
compared on runs close in time, ``ours`` then ``http`` in even rounds and ``http`` then
``ours`` in odd ones (a drift of the machine's speed over two rounds hits both alike), then
``early``, then ``naive``.

With ``--ray`` a side ``ray`` runs the same rounds (the same clients, word by word over the
WebSocket) through Ray Serve's proxy to one replica of the same model (local Ray; the replica
is a process of its own with as many torch threads as this one): the table's ``ray/ours``
line is what the proxy hop costs. Its engine is not this process's, so its rounds have no
engine summary.

Goals (printed as PASS/FAIL, computed from this run):

* our throughput at 4 clients >= 1.8x our throughput at 1 client;
* our TTFA (p50) at 1 client, 3-sentence paragraph, <= 0.5x the naive server's;
* over HTTP, TTFA (p50) at 1 client <= 1.10x the WebSocket's (``ours``);
* over HTTP, throughput at 4 clients within +-10% of the WebSocket's ("equal within noise":
  10% is the bound beyond which the speed check below warns that two rounds ran at
  different speeds on this shared machine). It is judged at equal machine speed: the
  ratio divided by how much faster the HTTP rounds ran (window work per audio second, as
  below; the segments, and so the window work per audio second, are the same on both sides).

The 4-client line also says how fast the machine ran in each round (window work per audio
second, which batching does not change) and the ratio at equal speed, with a warning when the
two rounds ran more than 10% apart.

Usage:
    python benchmarks/load.py --model random:small --clients 1 4 16 --sentences 3 \\
        [--rounds 1] [--warmup 1] [--no-http] \\
        [--out benchmarks/results/load-cpu-random-small.json]
    # smoke run: --model random:tiny --clients 1 2 --short
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from common import SENTENCES, add_engine_args, load_engine, machine_info, machine_line
from naive_server import NaiveServer

from stream_engine import Engine
from stream_engine.client import Client
from stream_engine.config import ServerConfig
from stream_engine.protocol import (
    AudioReceived,
    SegmentStarted,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
)
from stream_engine.runtime.trace import StepTrace
from stream_engine.server.app import Server

if TYPE_CHECKING:  # imported where the HTTP side runs: gpu_check.py uses the rest without it
    import openai

# Short sentences (about one second of speech each) for smoke runs (--short).
SHORT_SENTENCES = (
    "Good morning.",
    "The bus is late.",
    "I like green tea.",
    "See you soon.",
    "It rained all day.",
    "Close the door.",
    "We won the game.",
    "Call me later.",
)


def paragraph(client: int, sentences: int, pool: tuple[str, ...]) -> str:
    """Client ``client``'s paragraph: ``sentences`` consecutive sentences of the pool."""
    return " ".join(pool[(client * sentences + j) % len(pool)] for j in range(sentences))


def word_pieces(text: str) -> list[str]:
    """The text as an LLM streams it: each word with the whitespace after it."""
    return re.findall(r"\S+\s*", text)


@dataclass
class StreamResult:
    client: int
    text: str
    sent_at: float  # first word sent, or the HTTP request (perf_counter)
    first_audio_at: float | None = None
    ended_at: float | None = None
    end: str | None = None  # done, error, cancelled, or closed (connection lost)
    error: str | None = None
    samples: int = 0
    segments: int = 0
    server_ttfa_ms: float | None = None
    server_rtf: float | None = None
    protocol_errors: int = 0  # frames out of order or for another stream; HTTP: a bad body

    @property
    def audio_s(self) -> float:
        return self.samples / 24_000

    @property
    def ttfa_s(self) -> float | None:
        return None if self.first_audio_at is None else self.first_audio_at - self.sent_at

    @property
    def rtf(self) -> float | None:
        if self.ended_at is None or self.samples == 0:
            return None
        return (self.ended_at - self.sent_at) / self.audio_s


async def run_client(
    client: Client,
    number: int,
    text: str,
    voice: str | None,
    piece_delay: float,
    go: asyncio.Event,
    early_audio: bool = False,
) -> StreamResult:
    await go.wait()
    sid = f"c{number}"
    res = StreamResult(number, text, time.perf_counter())

    async def read() -> None:
        async for event in client.events():  # the client core checks the protocol
            if isinstance(event, Violation) or getattr(event, "id", sid) != sid:
                res.protocol_errors += 1
            elif isinstance(event, AudioReceived):
                if res.first_audio_at is None:
                    res.first_audio_at = time.perf_counter()
                res.samples += len(event.payload) // 2
            elif isinstance(event, SegmentStarted):
                res.segments += 1
            elif isinstance(event, StreamDone | StreamError | StreamCancelled):
                res.ended_at = time.perf_counter()
                res.end = {StreamDone: "done", StreamError: "error"}.get(type(event), "cancelled")
                if isinstance(event, StreamDone):
                    res.server_ttfa_ms, res.server_rtf = event.ttfa_ms, event.rtf
                if isinstance(event, StreamError):
                    res.error = f"{event.code}: {event.message}"
                return
        res.end = "closed"

    reader = asyncio.create_task(read())
    pieces = word_pieces(text)
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        if i == 0:
            await client.speak(
                sid,
                piece,
                last,
                voice=voice,
                format="pcm_s16le",
                sample_rate=24_000,
                early_audio=early_audio or None,
            )
        else:
            await client.speak(sid, piece, last)
        if piece_delay > 0 and not last:
            await asyncio.sleep(piece_delay)
    await reader
    return res


async def run_round(
    url: str, texts: list[str], voice: str | None, piece_delay: float, early_audio: bool = False
) -> tuple[list[StreamResult], float]:
    """All clients connect, then start together; returns their results and the round's wall."""
    clients = await asyncio.gather(*(Client.connect(url) for _ in texts))
    return await start_together(
        clients,
        texts,
        lambda c, i, t, go: run_client(c, i, t, voice, piece_delay, go, early_audio),
    )


async def start_together(
    clients: list[Any], texts: list[str], run: Callable[..., Awaitable[StreamResult]]
) -> tuple[list[StreamResult], float]:
    """Run ``run(client, i, text, go)`` for every client, all released at once by ``go``;
    close the clients; return the results and the round's wall time."""
    go = asyncio.Event()
    try:
        tasks = [
            asyncio.create_task(run(c, i, t, go))
            for i, (c, t) in enumerate(zip(clients, texts, strict=True))
        ]
        go.set()
        results = await asyncio.gather(*tasks)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    start = min(r.sent_at for r in results)
    end = max(r.ended_at or time.perf_counter() for r in results)
    return results, end - start


async def run_http_client(
    api: openai.AsyncOpenAI, number: int, text: str, voice: str | None, go: asyncio.Event
) -> StreamResult:
    """One ``POST /v1/audio/speech`` with the whole paragraph, its PCM body read as it streams."""
    import openai

    await go.wait()
    res = StreamResult(number, text, time.perf_counter())
    received = 0
    try:
        async with api.audio.speech.with_streaming_response.create(
            model="bark",  # any value: the server speaks with the model it loaded
            input=text,
            voice=voice,  # type: ignore[arg-type]  # a Bark voice name, or null for none
            response_format="pcm",
            stream_format="audio",
        ) as response:
            if response.headers.get("content-type") != "audio/pcm":
                res.protocol_errors += 1
            async for chunk in response.iter_bytes():
                if not chunk:
                    continue
                if res.first_audio_at is None:
                    res.first_audio_at = time.perf_counter()
                received += len(chunk)
        res.ended_at = time.perf_counter()
        res.end = "done"
    except openai.APIStatusError as exc:  # an error status before the first audio
        res.ended_at, res.end = time.perf_counter(), "error"
        res.error = f"{exc.status_code}: {exc.message}"
    except (openai.APIError, httpx.HTTPError) as exc:  # e.g. a body cut off mid-stream
        res.ended_at, res.end = time.perf_counter(), "closed"
        res.error = f"{type(exc).__name__}: {exc}"
    res.samples = received // 2
    res.protocol_errors += received % 2  # s16 samples are whole
    return res


async def run_http_round(
    base_url: str, texts: list[str], voice: str | None
) -> tuple[list[StreamResult], float]:
    """``run_round`` over HTTP: one SDK client per simulated client, all requests at once."""
    import openai

    apis = [
        openai.AsyncOpenAI(
            base_url=base_url,
            api_key="unused",
            max_retries=0,
            # no read timeout: under load the first audio can take many minutes (as on the
            # WebSocket side, which waits as long as it takes)
            timeout=httpx.Timeout(None, connect=30.0),
        )
        for _ in texts
    ]
    return await start_together(
        apis, texts, lambda api, i, t, go: run_http_client(api, i, t, voice, go)
    )


async def run_side(
    name: str, port: int, texts: list[str], voice: str | None, piece_delay: float
) -> tuple[list[StreamResult], float]:
    """One round of side ``name`` (``ours``, ``early``, ``naive`` or ``http``)."""
    if name == "http":
        return await run_http_round(f"http://127.0.0.1:{port}/v1", texts, voice)
    return await run_round(f"ws://127.0.0.1:{port}", texts, voice, piece_delay, name == "early")


# how each side sends its text (the table's "text" column, and the JSON's)
SENT = {"ours": "words", "early": "words", "naive": "words", "http": "whole", "ray": "words"}


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def engine_summary(trace: StepTrace, start: float, end: float) -> dict[str, Any]:
    """What our engine did during a round: busy share, seconds and mean batch per stage."""
    s = trace.summary(start, end)
    stages = ", ".join(
        f"{name} {v['seconds']:.1f} s (mean batch {v['mean_batch']:.2f})"
        for name, v in s["stages"].items()
    )
    print(
        f"  engine busy {s['busy']:.0%} of {s['span_s']:.1f} s, window work {s['window_s']:.1f} s:"
        f" {stages}",
        flush=True,
    )
    return s


def summarize(
    rounds: list[tuple[list[StreamResult], float]], engine: list[dict[str, Any]], sent: str
) -> dict[str, Any]:
    streams = [r for results, _ in rounds for r in results]
    ttfa = [r.ttfa_s for r in streams if r.ttfa_s is not None]
    rtf = [r.rtf for r in streams if r.rtf is not None]
    audio = sum(r.audio_s for r in streams)
    wall = sum(w for _, w in rounds)
    return {
        # words: one WebSocket speak per word; whole: the paragraph in one POST
        "text_sent": sent,
        "streams": len(streams),
        "done": sum(r.end == "done" for r in streams),
        "failures": [
            f"client {r.client}: {r.end} {r.error or ''}" for r in streams if r.end != "done"
        ],
        "protocol_errors": sum(r.protocol_errors for r in streams),
        "ttfa_p50_s": percentile(ttfa, 50),
        "ttfa_p95_s": percentile(ttfa, 95),
        "rtf_median": statistics.median(rtf) if rtf else None,
        "rtf_max": max(rtf) if rtf else None,
        "audio_s": audio,
        "wall_s": wall,
        "audio_s_per_wall_s": audio / wall if wall > 0 else None,
        "round_walls_s": [w for _, w in rounds],
        # our engine's steps in each round (runtime/trace.py); empty for the naive server
        "engine": engine,
        "per_stream": [
            {**asdict(r), "ttfa_s": r.ttfa_s, "rtf": r.rtf, "audio_s": r.audio_s} for r in streams
        ],
    }


def fmt(x: float | None, spec: str = "8.2f") -> str:
    return format(x, spec) if x is not None else format("-", spec[: spec.index(".")] + "s")


def print_table(n: int, sentences: int, sides: dict[str, dict[str, Any]]) -> None:
    print(f"\nN = {n} client(s), {sentences} sentence(s) each")
    print(
        f"{'server':>8} {'text':>5} {'TTFA p50 s':>10} {'TTFA p95 s':>10} {'RTF/stream':>10} "
        f"{'RTF max':>8} {'audio s':>8} {'wall s':>8} {'audio s/wall s':>14} {'done':>6}"
    )
    for name, s in sides.items():
        print(
            f"{name:>8} {s['text_sent']:>5} {fmt(s['ttfa_p50_s'], '10.2f')} {fmt(s['ttfa_p95_s'], '10.2f')} "
            f"{fmt(s['rtf_median'], '10.3f')} {fmt(s['rtf_max'], '8.3f')} "
            f"{s['audio_s']:8.2f} {s['wall_s']:8.2f} {fmt(s['audio_s_per_wall_s'], '14.3f')} "
            f"{s['done']:>3}/{s['streams']:<2}"
        )
    if "ours" in sides and "naive" in sides:
        o, v = sides["ours"], sides["naive"]
        if o["ttfa_p50_s"] and v["ttfa_p50_s"]:
            print(f"TTFA p50 ours/naive {o['ttfa_p50_s'] / v['ttfa_p50_s']:.2f}", end="; ")
        if o["audio_s_per_wall_s"] and v["audio_s_per_wall_s"]:
            ratio = o["audio_s_per_wall_s"] / v["audio_s_per_wall_s"]
            print(f"throughput ours/naive {ratio:.2f}", end="")
        print()
    for other in ("http", "ray"):
        if "ours" in sides and other in sides:
            o, h = sides["ours"], sides[other]
            if o["ttfa_p50_s"] and h["ttfa_p50_s"]:
                print(f"TTFA p50 {other}/ours {h['ttfa_p50_s'] / o['ttfa_p50_s']:.2f}", end="; ")
            if o["audio_s_per_wall_s"] and h["audio_s_per_wall_s"]:
                ratio = h["audio_s_per_wall_s"] / o["audio_s_per_wall_s"]
                print(f"throughput {other}/ours {ratio:.2f}", end="")
            print()
    print("text: words = sent word by word over the WebSocket; whole = the paragraph in one POST")


def goals(by_n: dict[int, dict[str, dict[str, Any]]], sentences: int) -> list[dict[str, Any]]:
    out = []
    one, four = by_n.get(1, {}).get("ours"), by_n.get(4, {}).get("ours")
    goal = "throughput at 4 clients >= 1.8x one client (ours)"
    if one and four and one["audio_s_per_wall_s"] and four["audio_s_per_wall_s"]:
        ratio = four["audio_s_per_wall_s"] / one["audio_s_per_wall_s"]
        g4: dict[str, Any] = {"goal": goal, "value": ratio, "target": 1.8, "pass": ratio >= 1.8}
        # window work (prefills, fine passes, EnCodec) costs about the sum of its requests
        # however they are batched: with it alone, were every decode step free, the 4-client
        # throughput could be at most this many times the 1-client one
        window = sum(e["window_s"] for e in four.get("engine", []))
        if window > 0:
            g4["bound_if_decode_free"] = four["audio_s"] / window / one["audio_s_per_wall_s"]
        # the same window work takes the same time at any load (it is not shared), so its
        # seconds per audio second in each round say how fast the machine ran then: this
        # 2-core machine drifts by 20-40% between hours, and a ratio of two rounds that ran at
        # different speeds measures the drift as much as the server
        window_one = sum(e["window_s"] for e in one.get("engine", []))
        if window > 0 and window_one > 0:
            per_audio = {"1": window_one / one["audio_s"], "4": window / four["audio_s"]}
            speed = per_audio["1"] / per_audio["4"]  # > 1: the 4-client round ran faster
            g4["window_s_per_audio_s"] = per_audio
            g4["speed_4_over_1"] = speed
            g4["value_at_equal_speed"] = ratio / speed
            g4["bound_at_equal_speed"] = g4["bound_if_decode_free"] / speed
            # judged where the rounds can be compared: at the machine's equal speed
            g4["pass"] = g4["value_at_equal_speed"] >= 1.8
            g4["judged"] = "value_at_equal_speed"
        out.append(g4)
    else:
        out.append({"goal": goal, "value": None, "pass": None, "why": "needs --clients 1 4"})
    naive = by_n.get(1, {}).get("naive")
    goal = "TTFA p50 at 1 client <= 0.5x the naive server's (3-sentence paragraph)"
    if one and naive and one["ttfa_p50_s"] and naive["ttfa_p50_s"]:
        ratio = one["ttfa_p50_s"] / naive["ttfa_p50_s"]
        g: dict[str, Any] = {"goal": goal, "value": ratio, "target": 0.5, "pass": ratio <= 0.5}
        if sentences != 3:
            g["why"] = f"measured with {sentences}-sentence paragraphs, not 3"
        out.append(g)
    else:
        out.append({"goal": goal, "value": None, "pass": None, "why": "needs 1 client and --naive"})
    out.extend(http_goals(by_n))
    return out


def window_per_audio_s(side: dict[str, Any]) -> float | None:
    """A side's window work per audio second over its rounds: how slowly the machine ran."""
    window = sum(e["window_s"] for e in side.get("engine", []))
    return window / side["audio_s"] if window > 0 and side["audio_s"] > 0 else None


HTTP_TTFA_TARGET = 1.10  # HTTP TTFA p50 at most 10% above the WebSocket's
HTTP_THROUGHPUT_BAND = (0.90, 1.10)  # "equal within noise": the speed check's 10% bound


def http_goals(by_n: dict[int, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The HTTP side against the WebSocket side (``ours``), from this run."""
    out: list[dict[str, Any]] = []
    ws, http = by_n.get(1, {}).get("ours"), by_n.get(1, {}).get("http")
    goal = "TTFA p50 at 1 client over HTTP <= 1.10x the WebSocket's (ours)"
    if ws and http and ws["ttfa_p50_s"] and http["ttfa_p50_s"]:
        ratio = http["ttfa_p50_s"] / ws["ttfa_p50_s"]
        out.append(
            {
                "goal": goal,
                "value": ratio,
                "target": HTTP_TTFA_TARGET,
                "pass": ratio <= HTTP_TTFA_TARGET,
            }
        )
    else:
        out.append({"goal": goal, "value": None, "pass": None, "why": "needs 1 client and --http"})
    ws, http = by_n.get(4, {}).get("ours"), by_n.get(4, {}).get("http")
    goal = "throughput at 4 clients over HTTP within 10% of the WebSocket's (ours)"
    if ws and http and ws["audio_s_per_wall_s"] and http["audio_s_per_wall_s"]:
        ratio = http["audio_s_per_wall_s"] / ws["audio_s_per_wall_s"]
        g: dict[str, Any] = {"goal": goal, "value": ratio, "target": list(HTTP_THROUGHPUT_BAND)}
        judged, g["judged"] = ratio, "value"
        # as for the 4-client goal: the same work per audio second on both sides (the same
        # segments), so its seconds say how fast the machine ran in each side's rounds
        per_audio = {"ws": window_per_audio_s(ws), "http": window_per_audio_s(http)}
        if per_audio["ws"] and per_audio["http"]:
            speed = per_audio["ws"] / per_audio["http"]  # > 1: the HTTP rounds ran faster
            g["window_s_per_audio_s"] = per_audio
            g["speed_http_over_ws"] = speed
            g["value_at_equal_speed"] = judged = ratio / speed
            g["judged"] = "value_at_equal_speed"
        lo, hi = HTTP_THROUGHPUT_BAND
        g["pass"] = lo <= judged <= hi
        out.append(g)
    else:
        out.append(
            {"goal": goal, "value": None, "pass": None, "why": "needs --clients 4 and --http"}
        )
    return out


def round_order(sides: list[str], r: int) -> list[str]:
    """The sides in round ``r``: ours and http next to each other, in turn first (ours, http;
    http, ours; ...), so that the machine's drift hits both alike; then early, then naive."""
    pair = [s for s in ("ours", "http") if s in sides]
    if r % 2:
        pair.reverse()
    return pair + [s for s in sides if s not in pair]


async def bench(args: argparse.Namespace, engine: Engine) -> dict[int, dict[str, dict[str, Any]]]:
    top = max(args.clients)
    ours = Server(
        engine,
        ServerConfig(port=0, max_connections=max(64, top), max_connections_per_ip=max(16, top)),
    )
    await ours.start()
    servers: dict[str, Any] = {"ours": ours}
    if args.http:
        servers["http"] = ours  # the same server, through POST /v1/audio/speech
    if args.early_audio:
        servers["early"] = ours  # the same server; its clients ask for early_audio
    if args.naive:
        naive = NaiveServer(engine)
        await naive.start()
        servers["naive"] = naive
    ray_proxy = None
    if args.ray:
        ray_proxy = await asyncio.to_thread(RayProxy.start, args, top)
        servers["ray"] = ray_proxy
    pool = SHORT_SENTENCES if args.short else SENTENCES
    by_n: dict[int, dict[str, dict[str, Any]]] = {}
    trace = StepTrace()
    engine.runtime.observers.append(trace)
    try:
        for name, srv in servers.items():
            for _ in range(args.warmup):  # first calls pay one-time costs (allocations, ...)
                await run_side(name, srv.port, [paragraph(0, args.sentences, pool)], args.voice, 0)
                print(f"warm-up round on {name} done", flush=True)
        for n in args.clients:
            rounds: dict[str, list[tuple[list[StreamResult], float]]] = {k: [] for k in servers}
            steps: dict[str, list[dict[str, Any]]] = {k: [] for k in servers}
            for r in range(args.rounds):  # the sides alternate: a slow spell hits both
                # each round its own paragraphs (the same for both servers)
                texts = [paragraph(r * n + i, args.sentences, pool) for i in range(n)]
                for name in round_order(list(servers), r):
                    if name == "naive" and n > args.naive_max_clients:
                        continue
                    srv = servers[name]
                    t0 = time.perf_counter()
                    rounds[name].append(
                        await run_side(name, srv.port, texts, args.voice, args.piece_delay)
                    )
                    t1 = time.perf_counter()
                    print(f"N={n} {name}: round took {t1 - t0:.1f} s", flush=True)
                    if name not in ("naive", "ray"):  # those engines are not this process's
                        steps[name].append(engine_summary(trace, t0, t1))
                        if args.trace:
                            path = f"{args.trace}-{name}-{n}c-r{r}.json"
                            trace.chrome(path, t0, t1)
                            print(f"  trace: {path}")
            by_n[n] = {
                name: summarize(r, steps[name], SENT[name]) for name, r in rounds.items() if r
            }
            print_table(n, args.sentences, by_n[n])
    finally:
        await ours.stop(timeout=0)
        if args.naive:
            await servers["naive"].stop()
        if ray_proxy is not None:
            await asyncio.to_thread(ray_proxy.stop)
    return by_n


class RayProxy:
    """Our server on Ray Serve, in local Ray: one replica of the same model behind Serve's
    proxy (the side ``ray``; the replica is a process of its own, with its own engine)."""

    def __init__(self, port: int) -> None:
        self.port = port

    @classmethod
    def start(cls, args: argparse.Namespace, clients: int) -> RayProxy:
        import socket
        import tempfile

        import ray
        import torch
        from ray import serve

        from stream_engine.server.ray_serve import APP_NAME, ReplicaArgs, Scaling, application

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        threads = torch.get_num_threads()  # the replica gets as many as this process
        ray.init(
            num_cpus=threads,
            _temp_dir=tempfile.mkdtemp(prefix="ray-"),
            include_dashboard=False,
            log_to_driver=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine: dict[str, Any] = {}
        if args.decode_kernel is not None:
            engine["cpu_decode_kernel"] = args.decode_kernel
        settings = {"engine": engine, "server": {"max_connections": max(64, clients)}}
        replica = ReplicaArgs(args.model, args.device, args.dtype, settings)
        scaling = Scaling(replicas=1, num_cpus=threads, max_connections=max(16, clients))
        serve.run(application(replica, scaling), name=APP_NAME, route_prefix="/")
        return cls(port)

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--sentences", type=int, default=3, help="sentences per paragraph")
    ap.add_argument("--short", action="store_true", help="short sentences (~1 s): smoke runs")
    ap.add_argument("--voice", default="v2/en_speaker_6", help="'none' for no voice preset")
    ap.add_argument("--piece-delay", type=float, default=0.0, help="seconds between words")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per N and server")
    ap.add_argument("--warmup", type=int, default=1, help="untimed 1-client rounds per server")
    ap.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--http",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a side 'http': our server through POST /v1/audio/speech (openai SDK)",
    )
    ap.add_argument(
        "--ray",
        action="store_true",
        help="also a side 'ray': the same clients through Ray Serve's proxy to one replica",
    )
    ap.add_argument(
        "--naive-max-clients",
        type=int,
        default=1_000_000,
        help="skip the naive server above this N (it serves one sentence at a time)",
    )
    ap.add_argument(
        "--early-audio",
        action="store_true",
        help="also a side 'early': our server with clients that ask for early_audio",
    )
    ap.add_argument(
        "--trace",
        default=None,
        metavar="PREFIX",
        help="write each round of our server as a Chrome trace, PREFIX-SIDE-Nc-rR.json",
    )
    ap.add_argument("--check-goals", action="store_true", help="exit 1 when a goal fails")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if min(args.clients) < 1 or args.sentences < 1 or args.rounds < 1:
        ap.error("--clients, --sentences and --rounds must be positive")
    voice = None if args.voice.lower() == "none" else args.voice
    args.voice = voice

    engine = load_engine(args)
    if voice is not None and voice not in engine.voices:
        ap.error(f"unknown voice {voice!r}; available: {sorted(engine.voices)}")
    machine = machine_info(engine)
    print(
        f"model {args.model}, clients {args.clients}, {args.sentences} sentence(s) per "
        f"paragraph, voice {voice}, piece delay {args.piece_delay} s, rounds {args.rounds}"
    )
    print(machine_line(machine))

    by_n = asyncio.run(bench(args, engine))

    results = goals(by_n, args.sentences)
    print()
    for g in results:
        verdict = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[g["pass"]]
        target = g.get("target")
        if isinstance(target, list):
            target = f"{target[0]:.2f}-{target[1]:.2f}"
        value = "" if g["value"] is None else f": {g['value']:.2f} (target {target})"
        note = f" ({g['why']})" if "why" in g else ""
        if "bound_if_decode_free" in g:
            note += (
                f" (window work alone bounds it at {g['bound_if_decode_free']:.2f}x, were every"
                " decode step free)"
            )
        if "speed_4_over_1" in g:
            note += f"; at equal machine speed {g['value_at_equal_speed']:.2f}, judged on this"
        if "speed_http_over_ws" in g:
            w = g["window_s_per_audio_s"]
            note += (
                f"; at equal machine speed {g['value_at_equal_speed']:.2f}, judged on this (window"
                f" work {w['ws']:.2f} s per audio second over the WebSocket, {w['http']:.2f} over"
                " HTTP)"
            )
        print(f"{verdict} {g['goal']}{value}{note}")
        if abs(g.get("speed_http_over_ws", 1.0) - 1) > 0.1:
            print(
                f"  WARNING the HTTP rounds ran {g['speed_http_over_ws']:.2f}x as fast as the "
                "WebSocket ones (window work per audio second): the ratio as measured holds that "
                "drift too; the verdict uses the ratio at equal speed"
            )
        speed = g.get("speed_4_over_1")
        if speed is not None and abs(speed - 1) > 0.1:
            w = g["window_s_per_audio_s"]
            print(
                f"  WARNING the rounds ran at different machine speeds: window work took "
                f"{w['1']:.2f} s per audio second at 1 client, {w['4']:.2f} at 4 (the same work); "
                f"at equal speed the ratio is about {g['value_at_equal_speed']:.2f}x (the verdict "
                f"uses it) and the bound {g['bound_at_equal_speed']:.2f}x"
            )
    failures = [
        f"N={n} {side}: {f}"
        for n, sides in by_n.items()
        for side, s in sides.items()
        for f in s["failures"]
    ]
    protocol = sum(s["protocol_errors"] for sides in by_n.values() for s in sides.values())
    for f in failures:
        print(f"ERROR stream did not end with done: {f}")
    if protocol:
        print(f"ERROR {protocol} frame(s) out of order or about another stream")

    if args.out:
        record = {
            "benchmark": "load",
            "command": " ".join(sys.argv),
            "model": args.model,
            "machine": machine,
            "clients": args.clients,
            "sentences": args.sentences,
            "short": args.short,
            "voice": voice,
            "piece_delay_s": args.piece_delay,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "http": args.http,
            "results": {str(n): sides for n, sides in by_n.items()},
            "goals": results,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    if failures or protocol:
        return 1
    if args.check_goals and any(g["pass"] is False for g in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
