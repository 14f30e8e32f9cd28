"""Voice continuity between a stream's segments, and the threaded pipeline."""

import itertools
import threading

import numpy as np
import pytest

from stream_engine.bark.prompts import continue_voice
from stream_engine.config import GenerationOptions
from stream_engine.runtime.pipeline import Pipeline
from stream_engine.runtime.request import Status

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
