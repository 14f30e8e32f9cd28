"""Voice continuity between a stream's segments, and the threaded pipeline."""

import itertools
import threading
import time

import numpy as np
import pytest

from stream_engine.bark.prompts import continue_voice
from stream_engine.config import GenerationOptions
from stream_engine.runtime.loop import Runtime
from stream_engine.runtime.pipeline import Pipeline
from stream_engine.runtime.request import Request, Status
from stream_engine.runtime.scheduler import SharedCores, StageName
from stream_engine.runtime.stages import Stage, _Row

VOICE = "v2/en_speaker_3"


def opts(n, seed=1):
    return GenerationOptions(seed=seed, max_semantic_tokens=n)


def run(rt, reqs):
    for r in reqs:
        rt.submit(r)
    while rt.busy:
        rt.step()


def test_next_segment_is_conditioned_on_the_previous(tiny):
    rt = tiny.runtime
    first = tiny.request("The first sentence of a story.", VOICE, opts(40))
    second = tiny.request("And the second one.", VOICE, opts(30, seed=2), after=first)
    run(rt, [first, second])
    assert first.status is Status.FINISHED and second.status is Status.FINISHED
    assert second.after is None  # released once it no longer needs it

    # the same request given the continued prompt by hand, run alone
    by_hand = tiny.request("And the second one.", VOICE, opts(30, seed=2))
    by_hand.voice = continue_voice(
        tiny.voice(VOICE), np.asarray(first.semantic), first.coarse, first.fine
    )
    run(rt, [by_hand])
    np.testing.assert_array_equal(second.semantic, by_hand.semantic)
    np.testing.assert_array_equal(second.fine, by_hand.fine)
    np.testing.assert_allclose(second.audio, by_hand.audio, atol=1e-5)

    # and conditioning changes the result (the test can fail)
    plain = tiny.request("And the second one.", VOICE, opts(30, seed=2))
    run(rt, [plain])
    assert not np.array_equal(plain.semantic, second.semantic)


def test_continued_prompt_keeps_preset_then_previous():
    preset = continue_voice(None, np.arange(5), np.zeros((2, 7), int), np.ones((8, 7), int))
    assert preset is not None
    nxt = continue_voice(preset, np.array([9, 9]), None, None)
    assert nxt is not None
    assert nxt.semantic.tolist() == [0, 1, 2, 3, 4, 9, 9]
    assert nxt.coarse.shape == (2, 7) and nxt.fine.shape == (8, 7)  # not known yet: preset's
    assert continue_voice(preset, None) is preset


def test_cancel_cascades_to_later_segments(tiny):
    rt = tiny.runtime
    a = tiny.request("One.", None, opts(30))
    b = tiny.request("Two.", None, opts(30), after=a)
    other = tiny.request("Someone else.", None, opts(25))
    for r in (a, b, other):
        rt.submit(r)
    rt.step()
    assert rt.cancel(a.id)
    assert a.status is Status.CANCELLED and b.status is Status.CANCELLED
    while rt.busy:
        rt.step()
    assert other.status is Status.FINISHED
    assert all(s.active == 0 for s in rt.stages.values())


@pytest.mark.timeout(300)
def test_pipeline_overlaps_semantic_with_acoustic_stages(tiny):
    done: list = []
    finished = threading.Event()
    texts = ["The first sentence is here.", "Then a second.", "And a third one to end."]

    def on_final(req):
        done.append(req)
        if len(done) == len(texts):
            finished.set()

    pipe = Pipeline(tiny.runtime, on_final)
    pipe.start()
    try:
        prev = None
        reqs = []
        for i, t in enumerate(texts):
            prev = tiny.request(t, VOICE, opts(60, seed=i), after=prev)
            reqs.append(prev)
            pipe.submit(prev)
        assert finished.wait(240)
    finally:
        pipe.stop(timeout=30)
    assert not pipe.running
    assert [r.id for r in done] == [r.id for r in reqs]  # a stream finishes in order
    assert all(r.status is Status.FINISHED and r.audio is not None for r in reqs)
    # segment N+1's semantic stage started before segment N's audio was decoded
    for prev, nxt in itertools.pairwise(reqs):
        assert nxt.trace["semantic"][0] < prev.trace["codec"][1]
        assert nxt.trace["semantic"][0] >= prev.trace["semantic"][1]


@pytest.mark.timeout(300)
def test_pipeline_cancel_and_stop(tiny):
    got: list = []
    pipe = Pipeline(tiny.runtime, got.append)
    pipe.start()
    try:
        long = tiny.request("A long one that will be cancelled.", None, opts(300))
        pipe.submit(long)
        short = tiny.request("Short.", None, opts(25))
        pipe.submit(short)
        assert pipe.cancel(long.id)
        for _ in range(600):
            if got:
                break
            threading.Event().wait(0.1)
    finally:
        pipe.stop(timeout=30)
    assert [r.id for r in got] == [short.id]
    assert long.status is Status.CANCELLED and long.audio is None
    assert all(s.active == 0 for s in tiny.runtime.stages.values())


# -- workers sharing the CPU: urgent work first (fake stages that sleep) --------------------------


class Sleepy(Stage):
    """A fake stage: each request stays ``steps`` steps of ``dt`` seconds; logs every step."""

    def __init__(self, name, steps, dt, log):
        super().__init__(8)
        self.name, self.steps, self.dt, self.log = name, steps, dt, log

    def admit(self, req):
        self.slots.take(_Row(req))
        req.status = Status.RUNNING

    def step(self):
        start = time.perf_counter()
        time.sleep(self.dt)
        ids = [r.req.id for _, r in self.slots.items()]
        self.log.append((self.name, ids, start, time.perf_counter()))
        out = []
        for i, row in self.slots.items():
            row.req.mark(self.name)
            row.generated += 1
            if row.generated == self.steps:
                row.req.semantic, row.req.coarse = [1, 2], np.zeros((2, 3), np.int64)
                row.req.fine, row.req.audio = np.zeros((8, 3), np.int64), np.zeros(960, np.float32)
                self.slots.release(i)
                out.append(row.req)
        return out


def sleepy_run(cores):
    """One stream of two segments: segment 1's semantic steps while segment 0 is in coarse."""
    log: list = []
    plan = {"semantic": (5, 0.01), "coarse": (30, 0.01), "fine": (1, 0.001), "codec": (1, 0.001)}
    rt = Runtime({n: Sleepy(n, steps, dt, log) for n, (steps, dt) in plan.items()})
    done = threading.Event()
    finals: list = []

    def on_final(req):
        finals.append(req)
        if len(finals) == 2:
            done.set()

    pipe = Pipeline(rt, on_final, cores=cores)
    first = Request(1, "a", [1], GenerationOptions(seed=1), None, 10)
    second = Request(2, "b", [1], GenerationOptions(seed=1), None, 10, after=first)
    pipe.start()
    try:
        pipe.submit(first)
        pipe.submit(second)
        assert done.wait(30)
    finally:
        pipe.stop(timeout=10)
    coarse_0 = [s for n, ids, s, _ in log if n == "coarse" and ids == [1]]
    background = [s for n, ids, s, _ in log if n == "semantic" and ids == [2]]
    beside = [s for s in background if s < coarse_0[-1]]  # while segment 0 was in coarse
    return first, second, beside, log


@pytest.mark.timeout(60)
def test_on_shared_cores_the_next_segment_keeps_to_its_share():
    first, second, beside, log = sleepy_run(SharedCores(share=0.25))
    assert first.status is Status.FINISHED and second.status is Status.FINISHED
    # it still overlaps: segment 1's semantic began before segment 0's audio was decoded
    assert second.trace["semantic"][0] < first.trace["codec"][1]
    # ... but as background work: a 10 ms step at most every 40 ms beside urgent coarse steps
    assert len(beside) >= 2
    gaps = [b - a for a, b in itertools.pairwise(beside)]
    assert min(gaps) >= 0.035, gaps
    # one worker steps at a time: no two steps overlap
    spans = sorted((s, e) for _, _, s, e in log)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans))


@pytest.mark.timeout(60)
def test_without_shared_cores_the_next_segment_runs_freely():
    _, second, beside, _ = sleepy_run(False)
    assert second.status is Status.FINISHED
    assert len(beside) == 5  # all five steps while segment 0 was still in coarse
    assert max(b - a for a, b in itertools.pairwise(beside)) < 0.035


def test_urgent_means_a_listener_waits_for_it(tiny):
    rt = tiny.runtime
    first = tiny.request("One.", None, opts(30))
    second = tiny.request("Two.", None, opts(30), after=first)
    rt.submit(first)
    rt.submit(second)
    with rt.changed:
        assert rt.urgent(["semantic"])  # the first segment is waiting for it
        assert not rt.urgent(["coarse", "fine", "codec"])
    while not first.past(StageName.SEMANTIC):
        rt.step(["semantic"])
    with rt.changed:
        # first waits for coarse (urgent); second may now enter semantic, but nobody waits yet
        assert rt.urgent(["coarse", "fine", "codec"])
        assert not rt.urgent(["semantic"])
    while rt.busy:
        rt.step()
    with rt.changed:
        assert not rt.urgent(["semantic", "coarse", "fine", "codec"])
