"""Pure decisions of a training run: the per-step plan every rank derives from the one control vector,
the bounded wait for spot capacity, and which nodes get their dataset copy prepared."""

import pytest

from kilm_ray.train.resources import CapacityWait, CapacityWaitExceeded
from kilm_ray.train.control import Cadence, ControlState, Signals, plan_step
from kilm_ray.train.node_prep import nodes_to_prepare, reservation

CADENCE = Cadence(total_steps=100, log_every=10, eval_every=50, checkpoint_every=25, max_grow_checkpoints=2)


def run(vectors, cadence=CADENCE):
    """Plans of consecutive steps from the reduced vectors each rank would see."""
    state, plans = ControlState(), []
    for step, vector in vectors:
        plan, state = plan_step(Signals.from_vector(vector), step, cadence, state)
        plans.append(plan)
    return plans


def test_ranks_that_heard_different_things_agree_through_the_sum():
    # Rank 1 heard of the preemption, rank 0 did not yet; only rank 0 looks at the clock.
    rank0, rank1 = Signals(weight=10, clock=1), Signals(weight=12, notice=1)
    reduced = [a + b for a, b in zip(rank0.vector(), rank1.vector())]
    plan, state = plan_step(Signals.from_vector(reduced), 3, CADENCE, ControlState())
    assert plan.global_weight == 22 and plan.checkpoint == "preemption" and state.notice_checkpointed
    # The next step: the notice is still there (everyone has it now), the checkpoint is not repeated;
    # the clock is.
    plan, state = plan_step(Signals(weight=22, notice=2, clock=1), 4, CADENCE, state)
    assert plan.checkpoint == "time"


def test_step_cadence_and_the_end():
    plans = {step + 1: p for step, p in zip(range(100), run([(s, [1, 0, 0, 0, 0]) for s in range(100)]))}
    assert [s for s, p in plans.items() if p.checkpoint] == [25, 50, 75, 100]
    assert plans[100].checkpoint == "end" and plans[25].checkpoint == "steps"
    assert [s for s, p in plans.items() if p.evaluate] == [50, 100]
    assert [s for s, p in plans.items() if p.log] == list(range(10, 101, 10))
    assert not plans[7].reports


def test_grow_checkpoints_are_bounded_when_ray_never_grows():
    plans = run([(s, [1, 0, 1, 0, 0]) for s in range(30, 36)])
    assert [p.checkpoint for p in plans] == ["grow", "grow", None, None, None, None]


def test_a_non_finite_loss_on_any_rank_stops_every_rank_after_the_step_without_saving():
    plan, _ = plan_step(Signals(weight=5, stop=1, notice=1), 41, CADENCE, ControlState())
    assert plan.stop.startswith("the training loss is not finite (nan or inf) at step 42")
    assert plan.checkpoint is None


def test_capacity_wait_logs_while_waiting_and_fails_past_the_limit():
    wait = CapacityWait(limit_s=600, log_every_s=300, asked="8 x {'GPU': 1.0}")
    assert wait.observe("SCHEDULING", 0) is None
    assert wait.observe("RESCHEDULING", 60) is None and wait.observe("SCHEDULING", 120) is None
    line = wait.observe("RESCHEDULING", 301)
    assert line == "waiting for spot capacity: 8 x {'GPU': 1.0}, 5.0 min so far (up to train.capacity_wait_s = 10 min)"
    assert wait.observe("SCHEDULING", 400) is None
    wait.observe("RUNNING", 500)  # placed: the next wait starts from zero
    assert wait.observe("SCHEDULING", 10_000) is None and wait.observe("RESCHEDULING", 10_500) is not None
    with pytest.raises(CapacityWaitExceeded, match=r"waited 10.2 min for resources, longer than "
                                                   r"train.capacity_wait_s \(10.0 min\)"):
        wait.observe("SCHEDULING", 10_610)


def test_nodes_to_prepare_and_what_their_task_reserves():
    per_worker = {"CPU": 6.0, "GPU": 1.0, "trainer": 1.0}
    nodes = [
        {"NodeID": "head", "Alive": True, "Resources": {"CPU": 16.0}},
        {"NodeID": "v100-a", "Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0, "trainer": 8.0}},
        {"NodeID": "v100-b", "Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0, "trainer": 8.0}},
        {"NodeID": "v100-gone", "Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "trainer": 8.0}},
        {"NodeID": "cpu", "Alive": True, "Resources": {"CPU": 36.0, "preprocess": 1000.0}},
    ]
    assert nodes_to_prepare(nodes, per_worker, seen={"v100-a"}) == [("v100-b", {"trainer": 8.0})]
    assert reservation({"CPU": 4.0}, {"CPU": 0.5}) == {"CPU": 4.0}  # CPU-only workers: the CPUs
    assert reservation({"CPU": 8.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}) == {"GPU": 2.0}
