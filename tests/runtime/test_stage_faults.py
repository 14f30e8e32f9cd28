"""A stage that raises: the request at fault fails alone, the others finish unchanged."""

import numpy as np
import pytest
import torch
from faults import raise_on

from stream_engine.config import GenerationOptions
from stream_engine.errors import InternalError
from stream_engine.runtime.request import Status

TEXTS = ["A good request.", "The poisoned one, BOOM.", "Another good one here."]


def opts(i):
    return GenerationOptions(seed=10 + i, max_semantic_tokens=30 + 5 * i)


def run(rt, reqs):
    for r in reqs:
        rt.submit(r)
    final = []
    while rt.busy:
        final += rt.step()
    return final


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine", "codec"])
def test_one_bad_request_fails_alone(tiny, monkeypatch, stage):
    rt = tiny.runtime
    alone = [tiny.generate(t, **vars(opts(i)))[0] for i, t in enumerate(TEXTS) if i != 1]
    calls = raise_on(monkeypatch, rt.stages[stage])
    reqs = [tiny.request(t, None, opts(i)) for i, t in enumerate(TEXTS)]
    final = run(rt, reqs)
    bad = reqs[1]
    assert bad.status is Status.FAILED and isinstance(bad.error, InternalError)
    assert calls["raised"] == 2  # in the batch, then alone
    good = [r for r in reqs if r is not bad]
    assert all(r.status is Status.FINISHED for r in good)
    assert {r.id for r in final} == {r.id for r in reqs}
    for a, r in zip(alone, good, strict=True):
        np.testing.assert_array_equal(a.semantic, r.semantic)
        np.testing.assert_array_equal(a.fine, r.fine)
        np.testing.assert_allclose(a.audio, r.audio, atol=1e-5)
    assert all(s.active == 0 for s in rt.stages.values())


def test_out_of_memory_is_retried_smaller(tiny, monkeypatch):
    rt = tiny.runtime
    target = rt.stages["coarse"]
    real_step = target.step

    def step():
        if target.active > 1:
            raise torch.OutOfMemoryError("simulated: batch too large")
        return real_step()

    monkeypatch.setattr(target, "step", step)
    alone = [tiny.generate(t, **vars(opts(i)))[0] for i, t in enumerate(TEXTS)]
    reqs = [tiny.request(t, None, opts(i)) for i, t in enumerate(TEXTS)]
    run(rt, reqs)
    assert all(r.status is Status.FINISHED for r in reqs)
    assert any(r.retries for r in reqs)  # the batch did fail, and was retried one by one
    for a, r in zip(alone, reqs, strict=True):
        np.testing.assert_array_equal(a.coarse, r.coarse)


def test_failure_fails_the_rest_of_the_stream(tiny, monkeypatch):
    rt = tiny.runtime
    raise_on(monkeypatch, rt.stages["semantic"])
    first = tiny.request("BOOM goes the first.", None, opts(0))
    second = tiny.request("Then the second.", None, opts(1), after=first)
    other = tiny.request("Someone else entirely.", None, opts(2))
    run(rt, [first, second, other])
    assert first.status is Status.FAILED and second.status is Status.FAILED
    assert other.status is Status.FINISHED
