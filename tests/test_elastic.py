"""Spot-aware elasticity on a simulated two-node cluster (tests/elastic_cluster.py): a spot notice at
node B's (fake, loopback) metadata service reaches Ray through B's `kilm-ray spot-watch`, which drains
B; the workers checkpoint before the notice's deadline and the run shrinks from 2 workers to 1; an
added node grows it back to 2, nobody touching the run, each event costing at most a step or two, and
the final state bit-identical to an uninterrupted run (CPU, fp32)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from kilm_ray.train.checkpoint import read_checkpoint

from conftest import REPO

pytestmark = pytest.mark.slow  # starts Ray Train on a simulated cluster (about 2 min)

STEPS = 200
COMMON = ["train.epochs=14", f"train.max_steps={STEPS}", "train.checkpoint_every=1000", "train.eval_every=0",
          "train.export_at_end=false", "model.preset=tiny", "train.num_workers=[1,2]"]


def test_shrink_on_preemption_and_grow_back_bit_identical(tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The uninterrupted reference runs beside the elastic run (which mostly waits on Ray).
    reference = subprocess.Popen(
        [sys.executable, "-m", "kilm_ray.cli", "train", "--no-ray", "--data", tiny_data, "--run-dir",
         str(tmp_path / "reference"), "--config", str(REPO / "configs" / "tiny.yaml"), "train.log_every=50", *COMMON],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elastic = subprocess.run(
        [sys.executable, str(REPO / "tests" / "elastic_cluster.py"), tiny_data, str(tmp_path / "runs"), *COMMON,
         "train.log_every=1", "train.worker_resources={trainer: 1}", "train.cpus_per_worker=1",
         "train.elastic_resize_check_s=2", "train.max_grow_checkpoints=40", "train.keep_checkpoints=2",
         "train.worker_start_timeout_s=180", "train.worker_start_attempt_s=5"],
        env=env, capture_output=True, text=True, timeout=600)
    assert elastic.returncode == 0, elastic.stderr[-4000:]
    summary = json.loads(elastic.stdout.strip().splitlines()[-1])
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]

    assert summary["error"] is None
    # B's watcher drained B once (then exited: --once); A's, with no notice, still watched.
    assert summary["watcher_b_exit"] == 0 and "drained Ray node" in summary["watcher_b_log"]
    assert summary["watcher_b_log"].count("drained Ray node") == 1 and summary["watcher_a_running"]
    registered_at = next(t["time"] for t in summary["timeline"] if t["event"].startswith("preemption checkpoint"))
    assert registered_at < summary["notice_deadline"] - 15  # checkpointed well before the reclaim
    shrink, grow = summary["resumes"][-2:]  # (a first grow if Ray started the group before it saw node B)
    # A preemption costs at most the step running when the node went (the checkpoint was taken on the
    # notice); a grow at most the steps of one re-checkpoint interval (2 s here: Ray acts on the new
    # node 10-40 s after it joins, and the workers checkpoint every 2 s until it does).
    assert shrink["world_size"] == 1 and shrink["steps_redone"] <= 2, summary
    assert grow["world_size"] == 2 and grow["steps_redone"] <= 12, summary
    reasons = {int(step): reason for step, reason in summary["checkpoints"].items()}
    assert reasons[STEPS] == "end" and "grow" in reasons.values()
    final = read_checkpoint(summary["final_checkpoint"])
    assert final.state["step"] == STEPS and final.state["world_size"] == 2
    expected = read_checkpoint(tmp_path / "reference" / "checkpoints" / f"checkpoint_{STEPS:08d}")
    for part in ("weights", "moments"):
        a, b = getattr(final, part), getattr(expected, part)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{part} differ from the uninterrupted run"
