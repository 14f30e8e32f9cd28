"""The pure policy, with fake stage states."""

import pytest

from stream_engine.runtime.scheduler import (
    STAGES,
    Scheduler,
    SharedCores,
    StageName,
    StageState,
    Ticket,
)


def states(**free_active):
    out = {n: StageState(free=0, active=0) for n in ("semantic", "coarse", "fine", "codec")}
    for name, (free, active) in free_active.items():
        out[name] = StageState(free=free, active=active)
    return out


def test_admits_oldest_first_up_to_free_slots():
    waiting = {"semantic": [Ticket(5, 5), Ticket(2, 2), Ticket(9, 9)]}
    plan = Scheduler().plan(waiting, states(semantic=(2, 0)))
    assert plan.admit["semantic"] == [2, 5]
    assert plan.run == ["semantic"]


def test_admits_earliest_due_first_then_oldest():
    waiting = {"fine": [Ticket(1, 1, due=7.0), Ticket(2, 2, due=3.0), Ticket(3, 3, due=3.0)]}
    plan = Scheduler().plan(waiting, states(fine=(2, 0)))
    assert plan.admit["fine"] == [2, 3]
    waiting = {"fine": [Ticket(-5, -5, due=float("-inf")), *waiting["fine"]]}
    assert Scheduler().plan(waiting, states(fine=(1, 0))).admit["fine"] == [-5]


def test_runs_downstream_first_and_skips_idle_stages():
    plan = Scheduler().plan({}, states(semantic=(1, 3), fine=(0, 2), codec=(4, 1)))
    assert plan.run == ["codec", "fine", "semantic"]


def test_full_stage_admits_nothing_and_idle_plan():
    plan = Scheduler().plan({"coarse": [Ticket(1, 1)]}, states(coarse=(0, 0)))
    assert plan.admit["coarse"] == []
    assert plan.idle


def test_unready_ticket_does_not_block_those_behind_it():
    waiting = {"coarse": [Ticket(1, 1, ready=False), Ticket(2, 2), Ticket(3, 3)]}
    plan = Scheduler().plan(waiting, states(coarse=(1, 0)))
    assert plan.admit["coarse"] == [2]


def test_plans_only_the_stages_it_is_given():
    st = states(semantic=(1, 1), coarse=(1, 1))
    del st["coarse"], st["fine"], st["codec"]
    plan = Scheduler().plan({"coarse": [Ticket(1, 1)]}, st)
    assert plan.run == ["semantic"]
    assert "coarse" not in plan.admit


# -- workers that share cores ------------------------------------------------------------------


def test_urgent_work_goes_before_background_work_that_is_not_owed_time():
    cores = SharedCores(share=0.25)
    assert cores.pick({"sem": False, "ac": True}, now=0.0) == "ac"
    cores.ran("ac", True, 0.0, 1.0)
    # background has run less, and has never run: it is owed time
    assert cores.pick({"sem": False, "ac": True}, now=1.0) == "sem"
    cores.ran("sem", False, 1.0, 1.5)  # 0.5 s: may claim again 1.5 s after it ended
    assert cores.pick({"sem": False, "ac": True}, now=1.5) == "ac"
    cores.ran("ac", True, 1.5, 2.9)
    assert cores.pick({"sem": False, "ac": True}, now=2.9) == "ac"
    assert cores.pick({"sem": False, "ac": True}, now=3.0) == "sem"


def test_background_work_runs_freely_when_nothing_is_urgent():
    cores = SharedCores(share=0.25)
    cores.ran("sem", False, 0.0, 1.0)
    assert cores.pick({"sem": False}, now=1.0) == "sem"
    # "ac" arrives: no credit for its idle past, so the two take turns
    first = cores.pick({"sem": False, "ac": False}, now=1.0)
    assert first is not None
    cores.ran(first, False, 1.0, 2.0)
    assert cores.pick({"sem": False, "ac": False}, now=2.0) == ({"sem", "ac"} - {first}).pop()
    assert cores.pick({}, now=2.0) is None


@pytest.mark.parametrize(
    ("share", "low", "high"), [(0.1, 0.08, 0.1), (0.25, 0.2, 0.25), (1.0, 0.45, 0.5)]
)
def test_background_keeps_to_its_share_beside_urgent_work(share, low, high):
    """At most ``share`` (less by the granularity of urgent steps), and never over half: a
    background worker owed time is one claimant among equals."""
    cores = SharedCores(share=share)
    t, busy = 0.0, {"sem": 0.0, "ac": 0.0}
    lengths = {"sem": 0.03, "ac": 0.05}  # seconds per step
    for _ in range(2000):
        w = cores.pick({"sem": False, "ac": True}, now=t)
        assert w is not None
        cores.ran(w, w == "ac", t, t + lengths[w])
        busy[w] += lengths[w]
        t += lengths[w]
    assert low <= busy["sem"] / t <= high + 1e-3


def test_two_urgent_workers_share_time_not_steps():
    cores = SharedCores()
    t, busy = 0.0, {"sem": 0.0, "ac": 0.0}
    lengths = {"sem": 0.03, "ac": 1.5}  # a decode step beside a fine-model pass
    for _ in range(3000):
        w = cores.pick({"sem": True, "ac": True}, now=t)
        assert w is not None
        cores.ran(w, True, t, t + lengths[w])
        busy[w] += lengths[w]
        t += lengths[w]
    assert busy["sem"] / t == pytest.approx(0.5, abs=0.05)


def test_idle_time_earns_no_credit():
    cores = SharedCores()
    t = 0.0
    for _ in range(100):  # "ac" runs alone for 100 s
        assert cores.pick({"ac": True}, now=t) == "ac"
        cores.ran("ac", True, t, t + 1.0)
        t += 1.0
    # "sem" gets work: the two alternate instead of "sem" running for 100 s
    order = []
    for _ in range(4):
        w = cores.pick({"sem": True, "ac": True}, now=t)
        assert w is not None
        order.append(w)
        cores.ran(w, True, t, t + 1.0)
        t += 1.0
    assert order.count("ac") == 2


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_shared_cores_rejects_a_share_outside_0_1(share):
    with pytest.raises(ValueError, match="share"):
        SharedCores(share=share)


def test_stage_names_are_ordered_as_work_flows():
    assert STAGES == (StageName.SEMANTIC, StageName.COARSE, StageName.FINE, StageName.CODEC)
    assert StageName.SEMANTIC < StageName.COARSE < "fine" < StageName.CODEC
    assert StageName.CODEC > StageName.FINE >= "fine" and not StageName.FINE < "coarse"
    assert sorted(reversed(STAGES)) == list(STAGES)  # not the alphabet's order
    assert [s.next for s in STAGES] == [*STAGES[1:], None]
    assert {StageName.FINE: 1}["fine"] == 1 and f"{StageName.CODEC}" == "codec"
