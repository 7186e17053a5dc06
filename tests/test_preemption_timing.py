"""A preemption notice against its deadline, with an artificially slow step and a slow validation: the
checkpoint is taken when the step running at the notice ends (not a step later), before that step's
validation, and is committed well inside a deadline of two step times. The same worker loop as under
Ray Train, without Ray (LocalEnv), so the clock measures the loop and not Ray's polling; Ray's own
detection delay is measured by tests/test_elastic.py and budgeted in BENCHMARKS.md."""

import shutil
import time

import pytest

from kilm_ray.train.local import LocalEnv
from kilm_ray.train.loop import Recipe, train_worker

pytestmark = pytest.mark.slow  # two training runs with slowed steps (15-25 s on 2 cores)

STEP_S = 1.5  # each optimizer step takes at least this long
VALID_S = 2.0  # each validation takes at least this long
NOTICE_STEP = 2  # the notice arrives halfway through this (0-based) step
DEADLINE_S = 2 * STEP_S  # notice -> checkpoint committed


class NoticeEnv(LocalEnv):
    """LocalEnv with a preemption notice the test raises, and the times of what followed it."""

    def __init__(self, run_dir: str, keep: int):
        super().__init__(run_dir, keep)
        self.events: list[tuple[str, int, float]] = []
        self.notice_at = None
        commit = self.checkpoints.commit

        def timed_commit(staging, step):
            final = commit(staging, step)
            self.events.append(("committed", step, time.perf_counter()))
            return final

        self.checkpoints.commit = timed_commit

    def heard_preemption(self) -> bool:
        return self.notice_at is not None

    def checkpoint(self, step, metrics, write, state):
        self.events.append((f"snapshot {state['reason']}", step, time.perf_counter()))
        super().checkpoint(step, metrics, write, state)


def test_the_notice_is_saved_when_the_running_step_ends_before_validation(tiny_config, tiny_data, tmp_path,
                                                                          monkeypatch):
    cfg = tiny_config.with_overrides({
        "train.max_steps": 5, "train.num_workers": 1, "train.checkpoint_every": 100, "train.log_every": 100,
        "train.eval_every": NOTICE_STEP + 1, "train.eval_max_samples": 8, "train.export_at_end": False})
    env = NoticeEnv(str(tmp_path / "run"), keep=3)
    train_step, validate = Recipe.train_step, Recipe.validate

    def slow_step(self, step, *args):
        train_step(self, step, *args)
        time.sleep(STEP_S / 2)
        if step == NOTICE_STEP:
            env.notice_at = time.perf_counter()
        time.sleep(STEP_S / 2)

    def slow_validation(self, metrics):
        env.events.append(("validation", int(metrics["step"]), time.perf_counter()))
        time.sleep(VALID_S)
        validate(self, metrics)

    monkeypatch.setattr(Recipe, "train_step", slow_step)
    monkeypatch.setattr(Recipe, "validate", slow_validation)
    train_worker(cfg, tiny_data, env)

    events = [(what, step, at - env.notice_at) for what, step, at in env.events if at >= env.notice_at]
    what_came = [(what, step) for what, step, _ in events]
    # The step running at the notice (0-based 2, i.e. 3 steps done) is the one saved, then validated.
    assert what_came[:3] == [("snapshot preemption", NOTICE_STEP + 1), ("committed", NOTICE_STEP + 1),
                             ("validation", NOTICE_STEP + 1)] or \
        what_came[:3] == [("snapshot preemption", NOTICE_STEP + 1), ("validation", NOTICE_STEP + 1),
                          ("committed", NOTICE_STEP + 1)], what_came
    snapshot = next(t for what, _, t in events if what == "snapshot preemption")
    committed = next(t for what, step, t in events if what == "committed" and step == NOTICE_STEP + 1)
    print(f"notice -> snapshot {snapshot:.2f} s, -> committed {committed:.2f} s (rest of the step {STEP_S / 2} s)")
    # The rest of the running step (STEP_S / 2) plus the agreement and the copy to host memory.
    assert snapshot < STEP_S, events
    assert committed < DEADLINE_S, events
    # The notice is acted on once: the next checkpoint is the run's end.
    assert [(w, s) for w, s, _ in events if w.startswith("snapshot")] == [("snapshot preemption", 3), ("snapshot end", 5)]

    # Had the node gone during step 3's validation, the run resumed from the preemption checkpoint validates
    # step 3 first (the checkpoint says its validation is pending), then trains on.
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint_00000005")
    resumed = LocalEnv(str(tmp_path / "run"), keep=3)
    train_worker(cfg, tiny_data, resumed)
    first = resumed.reports[0]
    assert first["step"] == NOTICE_STEP + 1 and first["validation_after_resume"] and "valid_loss" in first
    assert resumed.reports[-1]["step"] == 5
