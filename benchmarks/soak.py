"""Soak test: many connections, streams started and cancelled for minutes; nothing may leak.

``--connections`` WebSocket clients each run ``--streams`` streams at a time against a server in
this process (default 64 x 2 on ``random:tiny`` for 300 s). Each stream sends a short
paragraph in pieces of 1-8 characters (a language model's pace: a random pause of up to
``--piece-delay`` between pieces), in a random format and voice, sometimes with a ``flush``,
reads everything to its end, and starts again, with a fresh id or (``--reuse-rate``) the id of
the stream that just ended. All choices come from ``--seed``. Midway (while its text is still
coming, right after ``final``, or at its first audio) a share of the streams is cancelled
(``--cancel-rate``), and for another share (``--drop-rate``) the client drops the whole
connection, half the time with a clean close and half the time by cutting the TCP connection;
it then connects again and goes on. When ``--duration`` is over no stream starts again; those
still running get ``--drain`` seconds to finish and are then cancelled.

Checks (any failure: a line saying which, and exit status 1):

* **protocol**: every frame passes the client core's checks
  (:class:`stream_engine.protocol.ClientSession`: a known type, naming a stream of its
  connection; ``started`` first, with stream numbers 1, 2, 3, ... per connection and the
  format, rate and voice asked for; every binary frame in a started, not yet ended stream's
  open segment, with the next sequence number; PCM frames of whole samples; segments 0, 1,
  2, ..., each ``segment_end`` with the ``audio_ms`` of the PCM received; nothing about a
  stream after its terminal message); and here: ``cancelled`` only answers a ``cancel``; no
  error without an id; the server never closes a connection;
* **endings**: every stream ends with ``done``, ``cancelled`` or an ``error`` (counted by
  code; an error whose code is not in ``--allow`` fails the run; ``busy`` and ``limit`` are
  allowed only when named there), or goes with a connection its client dropped; a finished
  stream's segments say its whole text (unless it sent a ``flush``);
* **memory**: the server process's resident memory (VmRSS from ``/proc/self/status``: the
  server runs in this process, sampled twice a second) grows less than 10% from after the
  warm-up (``--warmup`` seconds) to the end: compared are medians over windows of
  ``max(5, min(30, duration / 6))`` seconds (RSS swings by 10-15% with every batch as
  buffers are freed and taken again), the first starting when the warm-up ends, the second
  ending with ``--duration``; the RSS once everything settled must be under the same bound;
* **no leaks**: after the last stream ended, ``GET /metrics`` reports
  ``stream_engine_active_streams 0`` and no queued requests, and the engine's runtime holds no
  request, no queued request and no occupied stage slot (``engine.runtime``), and the server
  holds no job; the server's count of ``done`` streams equals the clients' count.

Also printed: TTFA p50/p95 (first piece sent -> first audio frame received, per stream),
streams per outcome, audio seconds received.

The core (:class:`SoakConfig`, :func:`run_soak`) is importable: ``tests/test_soak.py`` runs a
30-second version against the test server.

Usage:
    python benchmarks/soak.py [--connections 64] [--streams 2] [--duration 300] [--seed 0]
        [--out benchmarks/results/soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from common import machine_info, machine_line
from websockets.exceptions import ConnectionClosed

from stream_engine import Engine
from stream_engine.client import Client
from stream_engine.config import EngineConfig, ServerConfig
from stream_engine.protocol import (
    AudioReceived,
    ProtocolLimits,
    SegmentEnded,
    SegmentStarted,
    Started,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
)
from stream_engine.protocol.client import Event
from stream_engine.server.app import Server

PARAGRAPHS = (
    "Hi there. How are you today?",
    "Good morning, friend. The sun is out.",
    "Wait a moment. I will be right back!",
    "Thanks a lot. See you tomorrow.",
    "Is it raining? Take an umbrella.",
    "The train is late again. Let us walk.",
    "Dinner is ready. Wash your hands, please.",
    "Well, that was fun. Shall we go home?",
)
# (format, sample rate, bytes per sample for PCM or None)
FORMATS = (
    ("pcm_s16le", 24_000, 2),
    ("pcm_s16le", 16_000, 2),
    ("pcm_f32le", 24_000, 4),
    ("pcm_f32le", 48_000, 4),
    ("mulaw", 8_000, None),
    ("opus", 48_000, None),
)


@dataclass
class SoakConfig:
    connections: int = 64
    streams: int = 2  # streams at a time on each connection
    duration: float = 300.0  # seconds during which streams (re)start
    seed: int = 0
    cancel_rate: float = 0.2  # share of streams cancelled midway
    drop_rate: float = 0.03  # share of streams whose connection the client drops midway
    reuse_rate: float = 0.2  # share of streams that reuse the id of the slot's last stream
    flush_rate: float = 0.1  # share of streams that send a flush mid-text
    early_rate: float = 0.3  # share of streams opened with early_audio (previews)
    piece_delay: float = 0.03  # most seconds between two pieces of text
    warmup: float | None = None  # memory baseline after this; None: min(60, duration / 3)
    drain: float = 120.0  # after duration: time running streams get before being cancelled
    end_timeout: float = 60.0  # for terminals after the last cancels, and for the server to settle
    allowed_errors: frozenset[str] = frozenset()  # error codes that do not fail the run
    max_rss_growth: float = 0.10
    rss_window: float | None = None  # None: max(5, min(30, duration / 6)) seconds

    @property
    def warmup_s(self) -> float:
        return self.warmup if self.warmup is not None else min(60.0, self.duration / 3)

    @property
    def rss_window_s(self) -> float:
        """Memory is compared as medians over windows this long (it swings with each batch)."""
        if self.rss_window is not None:
            return self.rss_window
        return max(5.0, min(30.0, self.duration / 6))


def window_median(series: list[tuple[float, int]], lo: float, hi: float) -> int | None:
    """Median of the samples taken between ``lo`` and ``hi`` seconds."""
    values = [b for t, b in series if lo <= t <= hi]
    return int(np.median(values)) if values else None


def rss_bytes() -> int:
    """Resident memory of this process (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _key(id: Any) -> tuple[str, Any]:
    return (type(id).__name__, id)  # 1 and "1" are different ids


@dataclass
class StreamState:
    conn: int
    id: str | int
    text: str
    format: str
    sample_rate: int
    sample_bytes: int | None
    voice: str | None
    opened_at: float
    early_audio: bool = False
    number: int | None = None
    final_sent: bool = False
    cancel_sent: bool = False
    flushed: bool = False
    first_audio_at: float | None = None
    total_ms: float = 0.0  # sum of segment_end audio_ms
    audio_bytes: int = 0
    texts: list[str] = field(default_factory=list)
    end: str | None = None  # done, cancelled, error:<code>
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    got_audio: asyncio.Event = field(default_factory=asyncio.Event)


class Checker:
    """The soak's bookkeeping for one connection's events.

    The protocol's rules (ordering, sequence numbers, sizes, what follows a stream's end) are
    the client core's (:class:`~stream_engine.protocol.ClientSession`): it reports a broken
    one as a :class:`Violation`, which counts here. On top of them the soak checks what only it
    knows: the segments say the text it sent, ``cancelled`` comes only after its cancel, no
    error outside ``allowed_errors``.
    """

    def __init__(self, index: int, report: SoakReport) -> None:
        self.index = index
        self.report = report
        self.by_id: dict[tuple[str, Any], StreamState] = {}

    def violation(self, what: str, st: StreamState | None = None) -> None:
        where = f"connection {self.index}" + (f", stream id {st.id!r}" if st else "")
        self.report.violations.append(f"{where}: {what}")

    def open(self, st: StreamState) -> None:
        self.by_id[_key(st.id)] = st

    def event(self, e: Event, now: float) -> None:
        if isinstance(e, Violation):
            return self.violation(e.what, None if e.id is None else self.by_id.get(_key(e.id)))
        if isinstance(e, StreamError) and e.id is None:
            self.report.count(f"error:{e.code} (id null)")
            return self.violation(f"an error with id null: {e.code}: {e.message}")
        st = self.by_id.get(_key(e.id)) if hasattr(e, "id") and e.id is not None else None
        if st is None or st.end is not None:
            return self.violation(f"{type(e).__name__} for id {getattr(e, 'id', None)!r}")
        if isinstance(e, Started):
            st.number = e.stream
        elif isinstance(e, AudioReceived):
            st.audio_bytes += len(e.payload)
            if st.first_audio_at is None:
                st.first_audio_at = now
                st.got_audio.set()
        elif isinstance(e, SegmentStarted):
            st.texts.append(e.text)
        elif isinstance(e, SegmentEnded):
            st.total_ms += e.audio_ms
        elif isinstance(e, StreamDone):
            spoken = " ".join(st.texts)
            if not st.flushed and spoken != " ".join(st.text.split()):
                self.violation(f"segments say {spoken!r}", st)
            self._end(st, "done", now)
        elif isinstance(e, StreamCancelled):
            if not st.cancel_sent:
                self.violation("cancelled without a cancel", st)
            self._end(st, "cancelled", now)
        elif isinstance(e, StreamError):
            self._end(st, f"error:{e.code}", now, rejected=st.number is None)

    def _end(self, st: StreamState, end: str, now: float, rejected: bool = False) -> None:
        st.end = end
        st.ended.set()
        st.got_audio.set()  # a stream waiting for audio to cancel it stops waiting
        self.report.count(end + (" (rejected at open)" if rejected else ""))
        code = end.partition(":")[2]
        if code and code not in self.report.config.allowed_errors:
            self.violation(f"ended with an error: {end}", st)
        if st.first_audio_at is not None:
            self.report.ttfa.append(st.first_audio_at - st.opened_at)
        if st.sample_bytes is not None:
            self.report.audio_s += st.audio_bytes / st.sample_bytes / st.sample_rate
        self.report.ended += 1


@dataclass
class SoakReport:
    config: SoakConfig
    violations: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # failed checks (violations summarized)
    outcomes: dict[str, int] = field(default_factory=dict)
    ttfa: list[float] = field(default_factory=list)
    opened: int = 0
    ended: int = 0
    cancels_sent: int = 0
    drops: int = 0  # connections the clients dropped midway (and opened again)
    audio_s: float = 0.0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    rss_warm: int | None = None
    rss_loaded_end: int | None = None
    rss_final: int | None = None
    server_before: dict[str, Any] = field(default_factory=dict)
    server_after: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    @property
    def passed(self) -> bool:
        return not self.failures

    def ttfa_percentile(self, q: float) -> float | None:
        return float(np.percentile(self.ttfa, q)) if self.ttfa else None

    def summary(self) -> str:
        c = self.config
        mib = 1024 * 1024

        def ms(x: float | None) -> str:
            return "-" if x is None else f"{x * 1000:.0f} ms"

        lines = [
            f"soak: {c.connections} connections x {c.streams} streams, {c.duration:.0f} s "
            f"(seed {c.seed}, cancel rate {c.cancel_rate}), took {self.wall_s:.1f} s",
            f"streams opened {self.opened}, ended {self.ended}, cancels sent "
            f"{self.cancels_sent}, connections dropped by clients {self.drops}, audio "
            f"received {self.audio_s:.1f} s",
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            f"TTFA p50 {ms(self.ttfa_percentile(50))}, p95 {ms(self.ttfa_percentile(95))} "
            f"({len(self.ttfa)} streams with audio)",
        ]
        if self.rss_warm:
            w = c.rss_window_s
            peak = max(b for _, b in self.rss)
            lines.append(
                f"RSS (median over {w:.0f} s) after warm-up ({c.warmup_s:.0f}-"
                f"{c.warmup_s + w:.0f} s) {self.rss_warm / mib:.1f} MiB, at the end of the load "
                f"{(self.rss_loaded_end or 0) / mib:.1f} MiB; settled "
                f"{(self.rss_final or 0) / mib:.1f} MiB; peak {peak / mib:.1f} MiB"
            )
        if self.server_after:
            s = self.server_after
            lines.append(
                f"server after: active streams {s.get('active_streams')}, runtime requests "
                f"{s.get('runtime_requests')}, queued {s.get('queued')}, stage slots in use "
                f"{s.get('stage_active')}, jobs {s.get('jobs')}, owners {s.get('owners')}"
            )
        for v in self.violations[:20]:
            lines.append(f"  violation: {v}")
        if len(self.violations) > 20:
            lines.append(f"  ... and {len(self.violations) - 20} more violations")
        lines += [f"FAIL {f}" for f in self.failures]
        lines.append("PASS" if self.passed else f"FAILED ({len(self.failures)} check(s))")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "config": {
                **{k: getattr(c, k) for k in c.__dataclass_fields__ if k != "allowed_errors"},
                "allowed_errors": sorted(c.allowed_errors),
                "warmup_s": c.warmup_s,
            },
            "passed": self.passed,
            "failures": self.failures,
            "violations": self.violations[:200],
            "violation_count": len(self.violations),
            "outcomes": self.outcomes,
            "opened": self.opened,
            "ended": self.ended,
            "cancels_sent": self.cancels_sent,
            "drops": self.drops,
            "audio_s": self.audio_s,
            "ttfa_p50_s": self.ttfa_percentile(50),
            "ttfa_p95_s": self.ttfa_percentile(95),
            "rss_warm_bytes": self.rss_warm,
            "rss_loaded_end_bytes": self.rss_loaded_end,
            "rss_final_bytes": self.rss_final,
            "rss_series": self.rss,
            "server_before": self.server_before,
            "server_after": self.server_after,
            "wall_s": self.wall_s,
        }


# -- the server's state --------------------------------------------------------------------


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def server_state(server: Server) -> dict[str, Any]:
    metrics = await asyncio.to_thread(_metrics, server.port)
    rt = server.service.engine.runtime
    with rt.changed:
        state = {
            "active_streams": metrics.get("stream_engine_active_streams"),
            "connections": metrics.get("stream_engine_connections"),
            "queue_depth_metric": sum(
                v for k, v in metrics.items() if k.startswith("stream_engine_queue_depth")
            ),
            "done_metric": metrics.get('stream_engine_streams_total{outcome="done"}', 0.0),
            "runtime_requests": len(rt.requests),
            "queued": sum(len(q) for q in rt.queues.values()),
            "removals": sum(len(q) for q in rt.removals.values()),
            "stage_active": {n: s.active for n, s in rt.stages.items()},
            "jobs": sum(len(c.jobs) for c in server.service.connections),
            "owners": len(server.service.owners),
        }
    return state


def _settled(s: dict[str, Any]) -> bool:
    return (
        s["active_streams"] == 0
        and s["queue_depth_metric"] == 0
        and s["runtime_requests"] == 0
        and s["queued"] == 0
        and s["removals"] == 0
        and not any(s["stage_active"].values())
        and s["jobs"] == 0
        and s["owners"] == 0
    )


async def wait_settled(server: Server, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = await server_state(server)
        if _settled(state) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


# -- the clients ---------------------------------------------------------------------------


def pieces(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 8)
        out.append(text[i : i + n])
        i += n
    return out


class Connection:
    def __init__(self, index: int, client: Client, report: SoakReport) -> None:
        self.index = index
        self.client = client
        self.report = report
        self.checker = Checker(index, report)
        self.closing = False  # we are closing it: the end of its frames is no failure
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for event in self.client.events():
                self.checker.event(event, time.perf_counter())
        except Exception as exc:  # a malformed frame, or the connection failed
            if not self.closing:
                self.checker.violation(f"reading failed: {type(exc).__name__}: {exc}")
        if not self.closing:
            self.checker.violation("the server closed the connection")
        for st in self.checker.by_id.values():
            if st.end is None:  # its connection is gone: it ends without a terminal message
                st.end = "dropped"
                self.report.count("dropped with its connection")
                self.report.ended += 1
            st.ended.set()  # wake the stream loops
            st.got_audio.set()

    async def drop(self, rng: random.Random) -> None:
        """Go away in the middle of things: a clean close or a lost TCP connection."""
        self.closing = True
        self.report.drops += 1
        if rng.random() < 0.5:
            self.client.ws.transport.abort()
        else:
            await self.client.close()
        await asyncio.gather(self.reader, return_exceptions=True)


async def connect(url: str, report: SoakReport, index: int) -> Connection | None:
    """Connect; retry a while if the server still counts a connection we just dropped."""
    why = ""
    for _ in range(100):
        try:
            return Connection(index, await Client.connect(url), report)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)
    report.violations.append(f"connection {index}: cannot connect: {why}")
    return None


@dataclass
class Slot:
    """One of a connection's streams-at-a-time: its random choices and its running stream."""

    index: int
    rng: random.Random
    n: int = 0  # streams started
    last_id: str | int | None = None


class Context:
    def __init__(self, report: SoakReport, url: str, hello: dict[str, Any], deadline: float):
        self.report, self.url, self.deadline = report, url, deadline
        self.voices = sorted(hello.get("voices", []))[:4]
        self.formats = [f for f in FORMATS if f[0] in hello.get("formats", [])]
        self.conns: dict[int, Connection] = {}  # connection index -> its current connection


async def run_connection(ctx: Context, index: int, rng: random.Random) -> None:
    """Connection ``index``: its slots speak until the deadline; reconnect after a drop."""
    slots = [Slot(k, random.Random(rng.getrandbits(64))) for k in range(ctx.report.config.streams)]
    while time.monotonic() < ctx.deadline:
        conn = await connect(ctx.url, ctx.report, index)
        if conn is None:
            return
        ctx.conns[index] = conn
        await asyncio.gather(*(run_slot(ctx, conn, slot) for slot in slots))
        if not conn.closing:
            return  # the deadline (or a failure, recorded by the reader)


async def run_slot(ctx: Context, conn: Connection, slot: Slot) -> None:
    """Speak paragraphs one after another until the deadline or until the connection goes."""
    while time.monotonic() < ctx.deadline and not conn.reader.done():
        await run_stream(ctx, conn, slot)


async def run_stream(ctx: Context, conn: Connection, slot: Slot) -> None:
    report, rng, c = ctx.report, slot.rng, conn.client
    cfg = report.config
    slot.n += 1
    if slot.last_id is not None and rng.random() < cfg.reuse_rate:
        sid = slot.last_id  # its stream has ended: the id is free again
    elif slot.index % 2:
        sid = (slot.index + 1) * 1_000_000 + slot.n
    else:
        sid = f"s{slot.index}-{slot.n}"
    slot.last_id = sid
    text = rng.choice(PARAGRAPHS)
    fmt, rate, width = rng.choice(ctx.formats)
    voice = rng.choice([None, *ctx.voices])
    parts = pieces(text, rng)
    x = rng.random()
    action = (
        "cancel" if x < cfg.cancel_rate else "drop" if x < cfg.cancel_rate + cfg.drop_rate else None
    )
    when = rng.choice(("text", "final", "audio")) if action else None
    stop_at = rng.randrange(1, len(parts)) if when == "text" else None
    flush_at = rng.randrange(1, len(parts)) if rng.random() < cfg.flush_rate else None
    early = rng.random() < cfg.early_rate
    st = StreamState(conn.index, sid, text, fmt, rate, width, voice, time.perf_counter(), early)
    conn.checker.open(st)
    report.opened += 1
    try:
        for i, part in enumerate(parts):
            if st.ended.is_set() or st.cancel_sent or i == stop_at:
                break  # an error closed it, the run is ending, or it is time to cancel or drop
            if i == flush_at:
                st.flushed = True
                await c.flush(sid)
            last = i == len(parts) - 1
            st.final_sent |= last
            if i == 0:
                await c.speak(
                    sid,
                    part,
                    last,
                    voice=voice,
                    format=fmt,
                    sample_rate=rate,
                    early_audio=early or None,
                )
            else:
                await c.speak(sid, part, last)
            await asyncio.sleep(rng.uniform(0, cfg.piece_delay))
        if when == "final":
            await asyncio.sleep(rng.uniform(0, 0.5))
        elif when == "audio":
            await st.got_audio.wait()
        if action == "drop" and not conn.closing:
            await conn.drop(rng)
        elif action == "cancel" and not st.ended.is_set() and not st.cancel_sent:
            st.cancel_sent = True
            report.cancels_sent += 1
            await c.cancel(sid)
    except ConnectionClosed:
        # the other slot dropped the connection (or the server did: the reader records it);
        # the reader ends the stream as dropped once it has read the end of the connection
        await asyncio.gather(conn.reader, return_exceptions=True)
        return
    await st.ended.wait()


async def run_soak(server: Server, config: SoakConfig, log: Any = print) -> SoakReport:
    """Soak ``server`` (started, in this process); return the report with its failures."""
    cfg = config
    report = SoakReport(cfg)
    t_start = time.monotonic()
    report.server_before = await server_state(server)
    url = f"ws://127.0.0.1:{server.port}"
    probe = await Client.connect(url)
    hello = probe.hello
    await probe.close()

    ctx = Context(report, url, hello, time.monotonic() + cfg.duration)
    t0 = time.monotonic()

    async def sample_rss() -> None:
        while True:
            report.rss.append((round(time.monotonic() - t0, 2), rss_bytes()))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_rss())
    master = random.Random(cfg.seed)
    tasks = [
        asyncio.create_task(run_connection(ctx, i, random.Random(master.getrandbits(64))))
        for i in range(cfg.connections)
    ]
    log(f"soak: {cfg.connections} connections x {cfg.streams} streams for {cfg.duration} s")
    await asyncio.sleep(max(0.0, ctx.deadline - time.monotonic()))
    w = cfg.rss_window_s
    report.rss_warm = window_median(report.rss, cfg.warmup_s, cfg.warmup_s + w)
    report.rss_loaded_end = window_median(report.rss, cfg.duration - w, cfg.duration)
    log("soak: duration over; draining")

    _, pending = await asyncio.wait(tasks, timeout=cfg.drain)
    if pending:  # cancel what is still running, as a client would
        late = [
            (conn, st)
            for conn in ctx.conns.values()
            for st in conn.checker.by_id.values()
            if st.end is None and not st.cancel_sent and not conn.reader.done()
        ]
        log(f"soak: cancelling {len(late)} stream(s) still running after the drain")
        for conn, st in late:
            st.cancel_sent = True
            report.cancels_sent += 1
            with contextlib.suppress(ConnectionClosed):
                await conn.client.cancel(st.id)
        _, pending = await asyncio.wait(pending, timeout=cfg.end_timeout)
    for conn in ctx.conns.values():
        for st in conn.checker.by_id.values():
            if st.end is None:
                report.violations.append(f"connection {conn.index}, stream id {st.id!r}: no end")
    for t in pending:
        t.cancel()
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            report.violations.append(f"connection loop failed: {t.exception()!r}")

    state = await wait_settled(server, cfg.end_timeout)
    report.rss_final = rss_bytes()
    sampler.cancel()
    for conn in ctx.conns.values():
        conn.closing = True
    await asyncio.gather(*(c.client.close() for c in ctx.conns.values()), return_exceptions=True)
    await asyncio.gather(*(c.reader for c in ctx.conns.values()), return_exceptions=True)
    deadline = time.monotonic() + cfg.end_timeout
    while server.service.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    state["connections_after_close"] = len(server.service.connections)
    report.server_after = state
    report.wall_s = time.monotonic() - t_start
    judge(report)
    return report


def judge(report: SoakReport) -> None:
    cfg, f = report.config, report.failures
    if report.violations:
        f.append(f"{len(report.violations)} protocol violation(s) or bad ending(s)")
    if report.ended != report.opened:
        f.append(f"{report.opened} streams opened, {report.ended} ended")
    if not report.outcomes.get("done"):
        f.append("no stream finished with done")
    warm = report.rss_warm
    if warm is None or report.rss_loaded_end is None:
        f.append("no memory samples after the warm-up or at the end of the load")
    for label, value in (("end of the load", report.rss_loaded_end), ("settled", report.rss_final)):
        if warm and value and value > warm * (1 + cfg.max_rss_growth):
            f.append(
                f"RSS grew {100 * (value / warm - 1):.1f}% from warm-up to {label} "
                f"({warm / 2**20:.1f} -> {value / 2**20:.1f} MiB; limit "
                f"{100 * cfg.max_rss_growth:.0f}%)"
            )
    s = report.server_after
    if not _settled(s):
        f.append(f"the server did not return to idle: {s}")
    if s.get("connections_after_close"):
        f.append(f"{s['connections_after_close']} connection(s) still open on the server")
    done_server = s.get("done_metric", 0.0) - report.server_before.get("done_metric", 0.0)
    if done_server != report.outcomes.get("done", 0):
        f.append(f"server counted {done_server:.0f} done streams, clients {report.outcomes}")


# -- command line --------------------------------------------------------------------------


async def _main(args: argparse.Namespace, cfg: SoakConfig) -> SoakReport:
    engine = Engine.load(
        args.model,
        device=args.device,
        config=EngineConfig(max_queue=max(256, 4 * cfg.connections * cfg.streams)),
    )
    server = Server(
        engine,
        ServerConfig(
            port=0,  # headroom: a dropped connection may still count while its client reconnects
            max_connections=2 * cfg.connections,
            max_connections_per_ip=2 * cfg.connections,
        ),
        ProtocolLimits(max_streams=max(8, cfg.streams)),
    )
    print(machine_line(machine_info(engine)))
    await server.start()
    try:
        return await run_soak(server, cfg)
    finally:
        await server.stop(timeout=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--streams", type=int, default=2, help="streams at a time per connection")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cancel-rate", type=float, default=0.2, help="share of streams cancelled")
    ap.add_argument(
        "--drop-rate", type=float, default=0.03, help="share of streams whose connection drops"
    )
    ap.add_argument("--reuse-rate", type=float, default=0.2, help="share reusing the last id")
    ap.add_argument("--early-rate", type=float, default=0.3, help="share opened with early_audio")
    ap.add_argument("--piece-delay", type=float, default=0.03, help="most seconds between pieces")
    ap.add_argument("--warmup", type=float, default=None, help="default: min(60, duration/3)")
    ap.add_argument("--drain", type=float, default=120.0)
    ap.add_argument(
        "--allow", action="append", default=[], help="an error code that is no failure (busy)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.connections < 1 or args.streams < 1 or not math.isfinite(args.duration):
        ap.error("--connections and --streams must be positive, --duration finite")
    cfg = SoakConfig(
        connections=args.connections,
        streams=args.streams,
        duration=args.duration,
        seed=args.seed,
        cancel_rate=args.cancel_rate,
        drop_rate=args.drop_rate,
        reuse_rate=args.reuse_rate,
        early_rate=args.early_rate,
        piece_delay=args.piece_delay,
        warmup=args.warmup,
        drain=args.drain,
        allowed_errors=frozenset(args.allow),
    )
    report = asyncio.run(_main(args, cfg))
    print(report.summary())
    if args.out:
        record = {"benchmark": "soak", "command": " ".join(sys.argv), "model": args.model}
        with open(args.out, "w") as f:
            json.dump({**record, **report.to_json()}, f, indent=1)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
