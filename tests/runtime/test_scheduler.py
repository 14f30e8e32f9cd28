"""The pure policy, with fake stage states."""

import pytest

from stream_engine.runtime.scheduler import Scheduler, SharedCores, StageState, Ticket


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


def test_shared_cores_lets_urgent_work_run_at_once():
    cores = SharedCores(share=0.25)
    assert cores.may_run(urgent=True, urgent_elsewhere=True, now=0.0, allowed_from=10.0)
    assert cores.may_run(urgent=False, urgent_elsewhere=False, now=0.0, allowed_from=10.0)
    assert not cores.may_run(urgent=False, urgent_elsewhere=True, now=9.9, allowed_from=10.0)
    assert cores.may_run(urgent=False, urgent_elsewhere=True, now=10.0, allowed_from=10.0)


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 1.0])
def test_background_steps_keep_to_their_share(share):
    cores = SharedCores(share=share)
    t, busy = 0.0, 0.0
    for _ in range(50):  # background steps of 2 s, each as early as allowed beside urgent work
        start, end = t, t + 2.0
        busy += end - start
        t = cores.next_allowed(start, end)
    assert busy / t == pytest.approx(share)


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_shared_cores_rejects_a_share_outside_0_1(share):
    with pytest.raises(ValueError, match="share"):
        SharedCores(share=share)
