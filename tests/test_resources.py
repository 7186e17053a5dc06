"""Resource arithmetic for trials and runs (pure), and the orphaned placement-group rule."""

import pytest

from kilm_ray.config import ConfigError, load_config
from kilm_ray.train.resources import (PlacementGroupRow, WorkerRequest, orphaned, placement_message, runs_that_fit,
                                start_attempts, worker_request)

from conftest import REPO, TINY_CONFIG


def test_worker_request_of_configs():
    tiny = worker_request(load_config(TINY_CONFIG).train)
    assert tiny == WorkerRequest(2, {"CPU": 0.5})
    v100 = load_config(REPO / "configs" / "bart-base-v100.yaml").train
    request = worker_request(v100)
    assert request.per_worker["GPU"] == 1.0 and request.per_worker["trainer"] == 1.0
    elastic = load_config(TINY_CONFIG, ["train.num_workers=[1, 3]"]).train
    assert worker_request(elastic).num_workers == 3  # a trial gets the shape it was configured with


def test_runs_that_fit():
    two_workers = WorkerRequest(2, {"CPU": 0.5})
    assert runs_that_fit({"CPU": 4.0}, two_workers, 0.01) == 3  # 3 x 1.01 <= 4 < 4 x 1.01
    assert runs_that_fit({"CPU": 4.0}, two_workers, 0.0) == 4
    assert runs_that_fit({"CPU": 0.5}, two_workers) == 0
    # GPU nodes: the scarcest resource decides; workers pinned to `trainer` nodes.
    gpu = WorkerRequest(8, {"CPU": 4.0, "GPU": 1.0, "trainer": 1.0})
    cluster = {"CPU": 16 + 2 * 64.0, "GPU": 16.0, "trainer": 16.0}
    assert runs_that_fit(cluster, gpu, 0.01) == 2
    assert runs_that_fit({**cluster, "trainer": 8.0}, gpu) == 1
    assert runs_that_fit({"CPU": 1000.0, "GPU": 16.0}, gpu) == 0  # no node offers `trainer`


def test_start_attempts_bound_the_wait():
    assert start_attempts(900) == (60.0, 14)  # 15 attempts of Ray's 60 s
    assert start_attempts(5) == (5.0, 0)
    assert start_attempts(61) == (60.0, 1)
    per_attempt, retries = start_attempts(120)
    assert per_attempt * (retries + 1) == 120


def test_placement_message_names_asked_and_free():
    msg = placement_message(WorkerRequest(2, {"CPU": 0.5, "trainer": 1.0}), 30, {"CPU": 3.0}, {"CPU": 4.0})
    assert "2 x {'CPU': 0.5, 'trainer': 1.0}" in msg and "{CPU: 1, trainer: 2}" in msg
    assert "free now {CPU: 3, trainer: 0}" in msg and "short of {trainer: 2}" in msg and "30 s" in msg


def test_only_placement_groups_of_dead_actors_of_this_job_are_orphaned():
    def row(pg, **kw):
        base = dict(pg_id=pg, state="CREATED", creator_job_id="01000000", creator_actor_id="abc",
                    creator_actor_dead=True, is_detached=False)
        return PlacementGroupRow(**{**base, **kw})

    rows = [row("leaked"), row("pending-leaked", state="PENDING"),
            row("alive", creator_actor_dead=False),
            row("tune-trial", creator_actor_id="", creator_actor_dead=False),  # made by the driver
            row("removed", state="REMOVED"), row("detached", is_detached=True),
            row("other-job", creator_job_id="02000000")]
    assert orphaned(rows, "01000000") == ["leaked", "pending-leaked"]


def test_config_keys():
    cfg = load_config(TINY_CONFIG, ["tune.search_alg=optuna", "train.worker_start_timeout_s=30"])
    assert cfg.tune.search_alg == "optuna" and cfg.train.worker_start_timeout_s == 30
    with pytest.raises(ConfigError, match="tune.search_alg"):
        load_config(TINY_CONFIG, ["tune.search_alg=hyperopt"])
    with pytest.raises(ConfigError, match=r"tune.search_space.train.lr: kind 'grid' needs tune.search_alg=random"):
        load_config(TINY_CONFIG, ["tune.search_alg=optuna", "tune.search_space={train.lr: {kind: grid, values: [0.1]}}"])
    with pytest.raises(ConfigError, match="train.worker_start_timeout_s"):
        load_config(TINY_CONFIG, ["train.worker_start_timeout_s=0"])
