"""Ray Tune on CPU: a 4-trial Optuna search of the tiny model where ASHA stops a weak trial early, the
search survives a killed driver without rerunning finished trials, and its best.yaml trains; more
trials than fit at once release every worker group; unplaceable workers fail with a clear message."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kilm_ray.config import load_config

from conftest import REPO

pytestmark = pytest.mark.slow
STEPS = 20


def tune_command(tiny_data: str, run_dir: Path, address: str) -> list[str]:
    # Optuna (seeded TPE: its first trials are seeded random draws) one trial at a time over two learning
    # rates, one hopeless: a hopeless trial that meets a better one at its first rung is stopped.
    space = ("{train.lr: {kind: choice, values: [0.003, 0.0000001]}, "
             "masking.mask_ratio: {kind: choice, values: [0.2, 0.4]}}")
    return [sys.executable, "-m", "kilm_ray.cli", "tune", "--data", tiny_data, "--run-dir", str(run_dir),
            "--name", "search", "--address", address, "--config", str(REPO / "configs" / "tiny.yaml"),
            f"tune.search_space={space}", "tune.search_alg=optuna", "tune.num_samples=4",
            "tune.max_concurrent_trials=1",
            "tune.grace_period=1", "tune.reduction_factor=2", f"train.max_steps={STEPS}", "train.eval_every=5",
            "train.eval_max_samples=16", "train.num_workers=1", "train.cpus_per_worker=0.5",
            "train.checkpoint_every=10"]


def finished_trials(run_dir: Path) -> dict[str, list[int]]:
    """Trial directory -> the steps it reported (from Tune's result.json files)."""
    out = {}
    for result in (run_dir / "search").glob("*/result.json"):
        steps = [json.loads(line)["step"] for line in result.read_text().splitlines() if line.strip()]
        out[result.parent.name] = steps
    return out


def test_search_early_stopping_restore_and_best_config(ray_cluster, tiny_data, tmp_path):
    import ray

    run_dir = tmp_path / "tune"
    cmd = tune_command(tiny_data, run_dir, ray.get_runtime_context().gcs_address)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill the driver once a first trial has finished
        if any(steps and steps[-1] == STEPS for steps in finished_trials(run_dir).values()):
            break
        assert driver.poll() is None, "the search ended before it could be interrupted"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done_before = {t: s for t, s in finished_trials(run_dir).items() if s and s[-1] == STEPS}
    assert done_before
    time.sleep(3)

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.rindex("{\n  \"best\""):])
    assert summary["trials"] == 4
    after = finished_trials(run_dir)
    for trial, steps in done_before.items():
        assert after[trial] == steps  # a finished trial was not run again
    assert all(len(s) == len(set(s)) for s in after.values())
    rows = json.loads((run_dir / "search" / "trials.json").read_text())
    assert len(rows) == 4 and {r["train.lr"] for r in rows} <= {0.003, 1e-7}
    assert any(r["stopped_early"] for r in rows)  # ASHA cut at least one trial short
    assert (run_dir / "search" / "trials.csv").read_text().count("\n") == 5
    assert (run_dir / "search" / "validation.png").stat().st_size > 10_000
    best = min(rows, key=lambda r: r["best_valid_loss"])
    assert summary["best"]["trial"] == best["trial"] and best["train.lr"] == 0.003

    # best.yaml is a plain config that `kilm-ray train --config` accepts as is.
    best_yaml = run_dir / "search" / "best.yaml"
    cfg = load_config(best_yaml)
    assert cfg.train.lr == 0.003 and cfg.masking.mask_ratio == best["masking.mask_ratio"]
    assert yaml.safe_load(best_yaml.read_text())["train"]["lr"] == 0.003
    train = subprocess.run([sys.executable, "-m", "kilm_ray.cli", "train", "--no-ray", "--config", str(best_yaml),
                            "--data", tiny_data, "--run-dir", str(tmp_path / "best-run"), "train.max_steps=3",
                            "train.num_workers=1"], capture_output=True, text=True, timeout=600, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (tmp_path / "best-run" / "export" / "config.json").is_file()


def _reserved_placement_groups(ids=None) -> set:
    """Placement groups that hold resources now (Ray's GCS table; the dashboard is off in tests)."""
    import ray

    return {pg for pg, info in ray.util.placement_group_table().items()
            if info["state"] != "REMOVED" and (ids is None or pg not in ids)}


def _wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def test_more_trials_than_fit_release_every_worker_group(ray_cluster, no_serve, tiny_data, tmp_path):
    """4 trials of the default 2-worker shape on 4 logical CPUs: 3 fit at once, ASHA stops the hopeless
    ones, and every stopped trial's worker group is released before a later trial needs it (Ray 2.60 left
    it reserved: the 4th trial used to wait forever). Nothing stays reserved afterwards."""
    import ray

    before_pgs = _reserved_placement_groups()
    free_before = ray.available_resources().get("CPU", 0.0)
    assert free_before >= 3.03, f"the session cluster is busy: {ray.available_resources()}"
    space = ("{train.lr: {kind: grid, values: [0.003, 0.0000001]}, "
             "masking.mask_ratio: {kind: grid, values: [0.2, 0.4]}}")
    cmd = [sys.executable, "-m", "kilm_ray.cli", "tune", "--data", tiny_data, "--run-dir", str(tmp_path),
           "--name", "wide", "--address", ray.get_runtime_context().gcs_address,
           "--config", str(REPO / "configs" / "tiny.yaml"), f"tune.search_space={space}", "tune.num_samples=1",
           "tune.grace_period=1", "train.max_steps=6", "train.eval_every=3", "train.eval_max_samples=16",
           "train.checkpoint_every=6", "train.worker_start_timeout_s=120"]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=800, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "trials at once: 3" in proc.stderr
    rows = json.loads((tmp_path / "wide" / "trials.json").read_text())
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert any(r["stopped_early"] for r in rows) and all(r["last_step"] in (3, 6) for r in rows)
    print(f"4 trials in {time.time() - started:.0f} s")
    # The Tune driver has exited; all it and its trials reserved is free again.
    assert _wait_until(lambda: not _reserved_placement_groups(before_pgs), 30), _reserved_placement_groups(before_pgs)
    assert _wait_until(lambda: ray.available_resources().get("CPU", 0.0) >= free_before - 1e-6, 30)


def test_unplaceable_trial_fails_naming_the_resources(ray_cluster, tiny_data, tmp_path):
    """Workers that cannot be placed fail the trial (and the search) within train.worker_start_timeout_s,
    with a message that names what was asked for and what is free; nothing waits forever."""
    import ray

    cmd = [sys.executable, "-m", "kilm_ray.cli", "tune", "--data", tiny_data, "--run-dir", str(tmp_path),
           "--name", "stuck", "--address", ray.get_runtime_context().gcs_address,
           "--config", str(REPO / "configs" / "tiny.yaml"), "tune.num_samples=1", "tune.max_concurrent_trials=1",
           "train.worker_resources={trainer: 1}", "train.worker_start_timeout_s=4", "train.max_steps=5",
           "train.eval_every=5", "train.checkpoint_every=5"]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode != 0
    assert time.time() - started < 120
    err = proc.stderr
    assert "could not be placed within 4 s" in err and "2 x {'CPU': 0.5, 'trainer': 1.0}" in err, err[-3000:]
    assert "free now {CPU:" in err and "short of {trainer: 2}" in err
    rows = json.loads((tmp_path / "stuck" / "trials.json").read_text()) if (tmp_path / "stuck" / "trials.json").exists() else None
    assert rows is None or all(r["error"] for r in rows)
