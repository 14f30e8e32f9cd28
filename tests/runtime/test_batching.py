"""Batch invariance: every request of a mixed batch equals the same request run alone."""

import numpy as np
from reference import MIXED_CASES, run_mixed

from stream_engine.config import GenerationOptions

CASES = MIXED_CASES


def test_mixed_batch_equals_alone(tiny):
    alone = [tiny.generate(t, voice=v, **o)[0] for t, v, o in CASES]
    mixed = run_mixed(tiny)  # two join now, two after a few steps
    for a, b in zip(alone, mixed, strict=True):
        np.testing.assert_array_equal(a.semantic, b.semantic)
        np.testing.assert_array_equal(a.coarse, b.coarse)
        np.testing.assert_array_equal(a.fine, b.fine)
        assert np.abs(a.audio - b.audio).max() <= 1e-5
    # and the requests differ from each other (the test could fail)
    assert not np.array_equal(alone[0].semantic[:20], alone[1].semantic[:20])


def test_cancel_frees_every_stage(tiny):
    rt = tiny.runtime
    r = tiny.request("To be cancelled.", None, GenerationOptions(max_semantic_tokens=50))
    rt.submit(r)
    for _ in range(3):
        rt.step()
    assert rt.cancel(r.id)
    assert not rt.busy
    assert r.status.name == "CANCELLED"
    assert rt.stages["semantic"].active == 1  # stages drop it at their next step boundary
    assert rt.step() == []
    assert all(s.active == 0 for s in rt.stages.values())
    assert not rt.cancel(r.id)
