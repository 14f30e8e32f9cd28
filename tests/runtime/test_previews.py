"""Previews (early audio): the coarse stage hands partial segments on to fine and codec.

A request with ``preview_frames`` gets a preview at the end of its first coarse window and
then every ``preview_frames`` new frames; each preview is a request of its own whose coarse
codes are the segment's first frames, exactly, and whose audio is Bark's for those frames. The
segment itself must come out exactly as without previews, and cancelling it drops them.
"""

import itertools

import numpy as np
import pytest

from stream_engine.config import GenerationOptions
from stream_engine.runtime.request import MAX_PREVIEWS, Request, Status

TEXT = "A sentence long enough for a few coarse windows of its own."
OPTS = GenerationOptions(max_semantic_tokens=60, seed=7)  # 60 tokens: ~90 frames, 3 windows


def run(engine, req: Request) -> list[Request]:
    """Step the runtime until ``req`` is final; every final request, in order."""
    rt = engine.runtime
    rt.submit(req)
    out: list[Request] = []
    for _ in range(10_000):
        out += rt.step()
        if req.status.final:
            break
    assert req.status is Status.FINISHED
    assert not rt.busy
    return out


def test_previews_are_prefixes_of_the_segment_and_leave_it_unchanged(tiny):
    plain = tiny.request(TEXT, "v2/en_speaker_1", OPTS)
    (only,) = run(tiny, plain)
    req = tiny.request(TEXT, "v2/en_speaker_1", OPTS)
    req.preview_frames = 30
    final = run(tiny, req)
    previews = [r for r in final if r.preview_of is req]
    assert final[-1] is req and len(previews) == len(final) - 1 >= 2
    frames = [p.coarse.shape[1] for p in previews]
    window = tiny.consts.sliding_window_len // 2  # coarse frames per window
    assert frames[0] == window  # the first at the first window's end
    assert all(b - a >= 30 for a, b in itertools.pairwise(frames))
    assert frames[-1] <= req.coarse.shape[1] - window  # none with less than a window left
    for p in previews:
        n = p.coarse.shape[1]
        np.testing.assert_array_equal(p.coarse, req.coarse[:, :n])  # coarse is causal: exact
        assert p.fine.shape == (8, n) and p.audio.shape == (n * 320,)
        assert p.id < 0 and p.status is Status.FINISHED
    # the segment is what it is without previews
    np.testing.assert_array_equal(req.coarse, only.coarse)
    np.testing.assert_array_equal(req.fine, only.fine)
    np.testing.assert_array_equal(req.audio, only.audio)


def test_preview_spacing_follows_preview_frames(tiny):
    req = tiny.request(TEXT, None, OPTS)
    req.preview_frames = 1000  # after the first, none is due before the segment ends
    final = run(tiny, req)
    assert [r.coarse.shape[1] for r in final if r.preview_of is req] == [
        tiny.consts.sliding_window_len // 2
    ]


def test_cancelling_a_segment_drops_its_previews(tiny):
    rt = tiny.runtime
    req = tiny.request(TEXT, None, OPTS)
    req.preview_frames = 30
    rt.submit(req)
    out = []
    for _ in range(10_000):
        out += rt.step()
        if any(r.preview_of is req for r in rt.requests.values()):
            break
    preview = next(r for r in rt.requests.values() if r.preview_of is req)
    assert rt.cancel(req.id)
    assert preview.status is Status.CANCELLED and not rt.busy
    for _ in range(3):
        assert rt.step() == []
    assert all(s.active == 0 for s in rt.stages.values())


def test_previews_per_request_are_bounded(tiny):
    req = tiny.request(TEXT, None, OPTS)
    codes = np.zeros((2, 4), dtype=np.int64)
    ids = {req.preview(codes).id for _ in range(MAX_PREVIEWS)}
    assert len(ids) == MAX_PREVIEWS and all(i < 0 for i in ids)
    with pytest.raises(ValueError, match="previews"):
        req.preview(codes)
