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

from stream_engine.protocol import (
    AudioReceived,
    SegmentEnded,
    SegmentStarted,
    Started,
    StreamCancelled,
    StreamDone,
    StreamError,
    Violation,
)

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


def good_stream(c, text="Hi there."):
    c.event(Started("a", 1, None, "pcm_s16le", 24_000, False), 1.0)
    c.event(SegmentStarted("a", 0, text), 1.0)
    c.event(AudioReceived("a", 1, 0, 0, b"\0" * 4800), 1.5)
    c.event(AudioReceived("a", 1, 0, 1, b"\0" * 4800), 1.5)
    c.event(SegmentEnded("a", 0, text, 200.0), 1.5)
    c.event(StreamDone("a", 200.0, 1.0, 1.0), 2.0)


def test_checker_accepts_a_correct_stream():
    c, st, report = checker()
    good_stream(c)
    assert report.violations == []
    assert st.end == "done" and report.outcomes == {"done": 1} and report.ttfa == [1.5]
    assert report.audio_s == pytest.approx(0.2)


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda c: c.event(Violation("a", "sequence number 5, expected 2"), 3.0), "sequence"),
        (lambda c: c.event(StreamDone("a", 0.0, None, None), 3.0), "StreamDone for id 'a'"),
        (lambda c: c.event(StreamError(None, "limit", "x"), 3.0), "id null"),
    ],
)
def test_checker_counts_violations(break_it, expected):
    c, _, report = checker()
    good_stream(c)
    break_it(c)
    assert len(report.violations) == 1 and expected in report.violations[0], report.violations


def test_checker_checks_what_only_the_soak_knows():
    c, _, report = checker()
    good_stream(c, text="Something else.")
    c2, st2, report2 = checker()
    c2.event(Started("a", 1, None, "pcm_s16le", 24_000, False), 1.0)
    c2.event(StreamCancelled("a"), 2.0)  # no cancel was sent
    assert "segments say 'Something else.'" in report.violations[0]
    assert "cancelled without a cancel" in report2.violations[0] and st2.end == "cancelled"


def test_checker_fails_errors_not_allowed():
    c, st, report = checker()
    c.event(Started("a", 1, None, "pcm_s16le", 24_000, False), 1.0)
    c.event(StreamError("a", "busy", "full"), 2.0)
    assert st.end == "error:busy" and "ended with an error: error:busy" in report.violations[0]
    report = soak.SoakReport(soak.SoakConfig(allowed_errors=frozenset({"busy"})))
    c = soak.Checker(0, report)
    st = soak.StreamState(0, 7, "Hi.", "opus", 48_000, None, None, 0.0)
    c.open(st)
    c.event(StreamError(7, "busy", "full"), 2.0)
    assert report.violations == [] and report.outcomes == {"error:busy (rejected at open)": 1}
