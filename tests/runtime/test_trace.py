"""The step trace: what the engine records of its steps, and what it makes of them."""

import json

import pytest

from stream_engine.runtime.trace import StepTrace


def test_summary_counts_time_batches_and_idle():
    t = StepTrace()
    t("semantic", 2, 0.0, 1.0, False)
    t("coarse", 4, 1.0, 3.0, True)  # a prefill
    t("coarse", 2, 3.0, 4.0, False)
    t("fine", 1, 6.0, 7.0, True)  # 4..6 idle
    s = t.summary(0.0, 10.0)
    assert s["busy"] == pytest.approx(0.5)  # 5 s of steps in 10 s
    assert s["stages"]["coarse"] == {
        "steps": 2,
        "seconds": 3.0,
        "window_seconds": 2.0,
        "mean_batch": 3.0,
    }
    assert s["window_s"] == 3.0
    assert set(s["stages"]) == {"semantic", "coarse", "fine"}
    assert t.summary(3.5, 10.0)["stages"].keys() == {"fine"}  # steps that began in the span


def test_overlapping_steps_are_not_counted_twice():
    t = StepTrace()
    t("semantic", 1, 0.0, 2.0, False)  # on a GPU the workers' steps overlap
    t("coarse", 1, 1.0, 3.0, False)
    assert t.summary(0.0, 4.0)["busy"] == pytest.approx(0.75)


def test_limit_keeps_the_newest():
    t = StepTrace(limit=2)
    for i in range(5):
        t("codec", 1, float(i), i + 0.5, True)
    assert [s.start for s in t.steps] == [3.0, 4.0]
    with pytest.raises(ValueError):
        StepTrace(limit=0)


def test_chrome_trace(tmp_path):
    t = StepTrace()
    t("fine", 3, 10.0, 10.5, True)
    t("codec", 1, 10.5, 10.6, True)
    path = tmp_path / "trace.json"
    assert t.chrome(str(path)) == 2
    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert spans[0] == {
        "name": "fine x3",
        "ph": "X",
        "pid": 0,
        "tid": 2,
        "ts": 0.0,
        "dur": 500000.0,
        "args": {"batch": 3, "window": True},
    }
    assert spans[1]["tid"] == 3 and spans[1]["ts"] == pytest.approx(500000.0)
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names == {"semantic", "coarse", "fine", "codec"}


def test_runtime_reports_every_stage_step(tiny):
    t = StepTrace()
    tiny.runtime.observers.append(t)
    try:
        tiny.generate(["One sentence.", "And another one."], greedy=True, max_semantic_tokens=20)
    finally:
        tiny.runtime.observers.remove(t)
    stages = {s.stage for s in t.steps}
    assert stages == {"semantic", "coarse", "fine", "codec"}
    assert max(s.batch for s in t.steps if s.stage == "coarse") == 2  # batched together
    assert all(s.end >= s.start for s in t.steps)
    # window work: every fine and codec step; of the causal stages only the prefills
    assert all(s.window for s in t.steps if s.stage in ("fine", "codec"))
    semantic = [s.window for s in t.steps if s.stage == "semantic"]
    assert semantic[0] and not any(semantic[1:])  # one prefill (both rows), then decode steps
    coarse = [s for s in t.steps if s.stage == "coarse"]
    assert coarse[0].window and 0 < sum(s.window for s in coarse) < len(coarse) / 10


def test_a_failing_observer_is_dropped_not_fatal(tiny):
    def broken(*args):
        raise RuntimeError("observer bug")

    t = StepTrace()
    tiny.runtime.observers += [broken, t]
    try:
        speech = tiny.generate("Still spoken.", greedy=True, max_semantic_tokens=10)[0]
    finally:
        tiny.runtime.observers.remove(t)
    assert broken not in tiny.runtime.observers
    assert speech.audio.size > 0
    assert {s.stage for s in t.steps} == {"semantic", "coarse", "fine", "codec"}  # others go on
