"""The soak test in miniature: 16 connections x 2 streams for 30 s on the tiny model.

``benchmarks/soak.py`` holds the streams and the checks (its docstring lists them); this runs
its core against the test server: no protocol violation, every stream ends with ``done`` or
``cancelled`` (or goes with a connection its client dropped), no error, memory steady, and
afterwards no active stream, no request, no occupied slot and no job left in the server. The
other tests check that the soak's protocol checker does catch broken streams.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import soak

from stream_engine.client import Audio

ENDINGS = {"done", "cancelled", "dropped with its connection"}


@pytest.mark.asyncio
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_soak_30_seconds(make_server):
    cfg = soak.SoakConfig(
        connections=16,
        streams=2,
        duration=30.0,
        seed=1,
        warmup=8.0,
        rss_window=8.0,  # memory: median over 8-16 s vs over 22-30 s
        drain=15.0,
        end_timeout=30.0,
    )
    # headroom for connections that clients drop and open again
    srv = await make_server(max_connections=32, max_connections_per_ip=32)
    report = await soak.run_soak(srv, cfg, log=lambda *_: None)
    summary = report.summary()
    print(summary)
    assert report.violations == [], summary
    assert report.ended == report.opened > 0, summary
    assert report.outcomes.get("done", 0) > 0 and set(report.outcomes) <= ENDINGS, summary
    after = report.server_after
    assert after["active_streams"] == 0 and after["runtime_requests"] == 0, summary
    assert after["queued"] == 0 and not any(after["stage_active"].values()), summary
    assert after["jobs"] == 0 and after["owners"] == 0, summary
    assert after["connections_after_close"] == 0, summary
    assert report.failures == [], summary


def checker():
    report = soak.SoakReport(soak.SoakConfig())
    c = soak.Checker(0, report)
    st = soak.StreamState(0, "a", "Hi there.", "pcm_s16le", 24_000, 2, None, 0.0)
    c.open(st)
    st.final_sent = True
    return c, st, report


def started(id="a", number=1):
    return {
        "type": "started",
        "id": id,
        "stream": number,
        "voice": None,
        "format": "pcm_s16le",
        "sample_rate": 24_000,
        "early_audio": False,
    }


def good_stream(c):
    c.message(started(), 1.0)
    c.message({"type": "segment", "id": "a", "index": 0, "text": "Hi there."}, 1.0)
    c.audio(Audio(1, 0, 0, b"\0" * 4800), 1.5)
    c.audio(Audio(1, 0, 1, b"\0" * 4800), 1.5)
    c.message({"type": "segment_end", "id": "a", "index": 0, "audio_ms": 200.0}, 1.5)
    c.message({"type": "done", "id": "a", "audio_ms": 200.0, "ttfa_ms": 1, "rtf": 1}, 2.0)


def test_checker_accepts_a_correct_stream():
    c, st, report = checker()
    good_stream(c)
    assert report.violations == []
    assert st.end == "done" and report.outcomes == {"done": 1} and report.ttfa == [1.5]


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda c: c.audio(Audio(1, 0, 5, b"\0\0"), 3.0), "binary frame after done"),
        (lambda c: c.audio(Audio(9, 0, 0, b"\0\0"), 3.0), "stream number 9, never started"),
        (lambda c: c.message({"type": "done", "id": "a"}, 3.0), "done after done"),
        (lambda c: c.message({"type": "segment", "id": "b", "index": 0}, 3.0), "never opened"),
        (lambda c: c.message({"type": "nonsense", "id": "a"}, 3.0), "unknown message"),
        (lambda c: c.message({"type": "error", "id": None, "code": "x"}, 3.0), "id null"),
    ],
)
def test_checker_catches_what_follows_the_end(break_it, expected):
    c, _, report = checker()
    good_stream(c)
    break_it(c)
    assert len(report.violations) == 1 and expected in report.violations[0], report.violations


def test_checker_catches_broken_order_within_a_stream():
    c, st, report = checker()
    c.message(started(number=2), 1.0)  # numbers start at 1
    c.message({"type": "segment", "id": "a", "index": 1, "text": "Hi"}, 1.0)  # index 0 first
    c.audio(Audio(2, 1, 1, b"\0" * 3), 1.5)  # sequence 0 first; s16 frames are even
    c.message({"type": "segment_end", "id": "a", "index": 1, "audio_ms": 50.0}, 1.5)
    c.message({"type": "cancelled", "id": "a"}, 2.0)  # no cancel was sent
    found = "\n".join(report.violations)
    for what in (
        "stream number 2, expected 1",
        "segment 1, expected 0",
        "sequence number 1, expected 0",
        "pcm_s16le frame of 3 bytes",
        "audio_ms 50.0, PCM received",
        "cancelled without a cancel",
    ):
        assert what in found, found
    assert st.end == "cancelled"


def test_checker_fails_errors_not_allowed():
    c, st, report = checker()
    c.message(started(), 1.0)
    c.message({"type": "error", "id": "a", "code": "busy", "message": "full"}, 2.0)
    assert st.end == "error:busy" and "ended with an error: error:busy" in report.violations[0]
    report = soak.SoakReport(soak.SoakConfig(allowed_errors=frozenset({"busy"})))
    c = soak.Checker(0, report)
    st = soak.StreamState(0, 7, "Hi.", "opus", 48_000, None, None, 0.0)
    c.open(st)
    c.message({"type": "error", "id": 7, "code": "busy", "message": "full"}, 2.0)
    assert report.violations == [] and report.outcomes == {"error:busy (rejected at open)": 1}
