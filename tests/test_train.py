"""Training with Ray Train + DeepSpeed on CPU: full checkpoints, a SIGKILLed worker that costs nothing
but replayed steps (bit-identical weights), a killed driver resumed by rerunning the command on
fewer workers, S3 storage through a real S3 endpoint, and the Hugging Face export."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kilm_ray import storage
from kilm_ray.train.ray_trainer import run_training
from kilm_ray.train.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow
STEPS = 40


@pytest.fixture(scope="module")
def train_cfg(tiny_config):
    # Dropout off so that runs on different worker counts differ only by float summation order.
    return tiny_config.with_overrides({
        "model.dropout": 0.0, "train.epochs": 3, "train.max_steps": STEPS, "train.checkpoint_every": 10, "train.log_every": 5,
        "train.eval_every": 20, "train.eval_max_samples": 32, "train.keep_checkpoints": 2, "train.num_workers": 2,
    })


def final_weights(run_dir: str, name: str) -> dict:
    ckpt = storage.local_copy(storage.join(run_dir, name, f"checkpoint_{STEPS:08d}"))
    return read_checkpoint(ckpt).weights


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, ray_cluster, tiny_data, train_cfg):
    run_dir = str(tmp_path_factory.mktemp("runs"))
    result = run_training(train_cfg, tiny_data, run_dir, "reference")
    assert result.error is None
    return run_dir, result


def test_run_outputs_checkpoints_metrics_and_export(reference_run):
    run_dir, result = reference_run
    run = Path(run_dir) / "reference"
    kept = sorted(p.name for p in run.glob("checkpoint_0*"))
    assert kept == [f"checkpoint_{30:08d}", f"checkpoint_{STEPS:08d}"]  # keep_checkpoints = 2
    state = json.loads((run / kept[-1] / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["adam_step"] == STEPS and state["world_size"] == 2
    assert state["scheduler"]["last_epoch"] == STEPS and "config" in state and state["samples_consumed_total"] == 640
    assert sorted(p.name for p in (run / kept[-1]).glob("*.safetensors")) == [  # one shard per worker
        "model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
        "optimizer-00000-of-00002.safetensors", "optimizer-00001-of-00002.safetensors"]
    moments = read_checkpoint(run / kept[-1]).moments
    assert any(k.startswith("exp_avg_sq.") for k in moments) and all(torch.isfinite(v).all() for v in moments.values())
    assert (run / kept[-1] / "tokenizer" / "tokenizer.json").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(5, STEPS + 1, 5)) and "event" not in str(lines)
    last = lines[-1]
    for key in ("train_loss", "train_knowledge_loss", "train_copy_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                "nonpad_share", "valid_loss", "valid_knowledge_loss", "valid_text_loss", "train_text_loss"):
        assert key in last
    assert last["train_loss"] < lines[0]["train_loss"]  # it learns
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert result.metrics["step"] == STEPS and result.checkpoint.path.endswith(f"checkpoint_{STEPS:08d}")
    # The export loads in a fresh interpreter with plain transformers, kilm_ray never imported.
    probe = (
        "import sys, torch\nfrom transformers import AutoTokenizer, BartForConditionalGeneration\n"
        f"m = BartForConditionalGeneration.from_pretrained({str(run / 'export')!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(run / 'export')!r})\n"
        "ids = t('Aristotle was a <mask> philosopher', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=5)\n"
        "assert '<ent_desc>' in t.get_vocab() and out.shape[0] == 1\n"
        "assert not any(name.startswith('kilm_ray') for name in sys.modules)\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
    exported = load_file(str(run / "export" / "model.safetensors"))
    reference = final_weights(run_dir, "reference")
    assert torch.equal(exported["model.shared.weight"], reference["model.shared.weight"])


def _kill_a_worker_later(has_checkpoint, record: dict) -> threading.Thread:
    def target():
        deadline = time.time() + 300
        while time.time() < deadline and not has_checkpoint():
            time.sleep(0.2)
        time.sleep(random.uniform(0.2, 2.0))  # a random step after the first checkpoint
        pids = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout.split()
        if pids:
            victim = int(random.choice(pids))
            os.kill(victim, signal.SIGKILL)
            record["killed"] = victim
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_sigkilled_worker_resumes_from_s3_bit_identical(reference_run, s3_server, tiny_data, train_cfg, tmp_path):
    """A worker SIGKILLed mid-run costs only the steps since the last checkpoint (stored on S3): the
    finished run's weights equal the uninterrupted run's, bit for bit."""
    def has_checkpoint():  # registered by Ray Train (uploads run in the background until then)
        try:
            snapshot = json.loads(storage.read_bytes("s3://kilm/runs/killed/checkpoint_manager_snapshot.json"))
        except Exception:  # noqa: BLE001 - not written yet
            return False
        return bool(snapshot.get("checkpoint_results"))

    record: dict = {}
    killer = _kill_a_worker_later(has_checkpoint, record)
    node_cache = tmp_path / "node-cache"
    result = run_training(train_cfg.with_overrides({"train.node_cache_dir": str(node_cache)}), tiny_data,
                          "s3://kilm/runs", "killed")
    killer.join(timeout=5)
    assert result.error is None and "killed" in record
    # The resume copy of the S3 checkpoint went to train.node_cache_dir (and was removed once read).
    assert list((node_cache / "checkpoints").glob("*.lock")) and not [
        p for p in (node_cache / "checkpoints").iterdir() if p.is_dir()]
    metrics = [json.loads(line) for line in storage.read_bytes("s3://kilm/runs/killed/metrics.jsonl").splitlines()]
    assert metrics[-1]["step"] == STEPS
    assert any(m.get("event") == "resumed" for m in metrics)  # the worker group restarted from a checkpoint
    reference = final_weights(reference_run[0], "reference")
    resumed = final_weights("s3://kilm/runs", "killed")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_killed_driver_rerun_resumes_on_one_worker(reference_run, ray_cluster, tiny_data, train_cfg, tmp_path):
    """Driver SIGKILLed after a checkpoint; the same command rerun (same --run-dir/--name) resumes, here
    on 1 worker instead of 2: same global batch, data position and optimizer state."""
    import ray

    run_dir = tmp_path / "runs"
    base = [sys.executable, "-m", "kilm_ray.cli", "train", "--data", tiny_data, "--run-dir", str(run_dir),
            "--name", "elastic", "--address", ray.get_runtime_context().gcs_address,
            "--config", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"),
            "model.dropout=0.0", "train.epochs=3", f"train.max_steps={STEPS}", "train.checkpoint_every=10", "train.log_every=5",
            "train.eval_every=20", "train.eval_max_samples=32", "train.keep_checkpoints=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(base + ["train.num_workers=2"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    # Kill once a checkpoint is registered in the run's snapshot, which is what a rerun restores from:
    # files that are still being uploaded are not a checkpoint yet (killing then costs those steps).
    snapshot = run_dir / "elastic" / "checkpoint_manager_snapshot.json"

    def registered() -> list[str]:
        try:
            return [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (OSError, ValueError, KeyError):
            return []

    deadline = time.time() + 300
    while time.time() < deadline and not registered():
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    saved = registered()
    assert saved, "no checkpoint before the driver was killed"
    saved_step = json.loads((run_dir / "elastic" / saved[-1] / "trainer_state.json").read_text())["step"]
    time.sleep(3)  # the dead driver's workers are cleaned up by Ray
    proc = subprocess.run(base + ["train.num_workers=1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "(saved by 2 workers, now 1)" in proc.stderr
    lines = [json.loads(line) for line in (run_dir / "elastic" / "metrics.jsonl").read_text().splitlines()]
    resumed = next(m for m in lines if m.get("event") == "resumed")
    assert resumed["world_size"] == 1 and resumed["step"] >= saved_step
    assert lines[-1]["step"] == STEPS and lines[-1]["world_size"] == 1 and lines[0]["world_size"] == 2
    reference = final_weights(reference_run[0], "reference")
    resumed = final_weights(str(run_dir), "elastic")
    # Same samples, same optimizer state; only the order of float sums differs (2 workers vs 1).
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-3, atol=1e-4)


def test_an_error_in_the_users_input_stops_the_run_at_once(ray_cluster, tiny_data, train_cfg, tmp_path):
    """A worker that fails on the input (here a dataset whose manifest lists no training shards) would fail
    the same way after every restart: the run stops at the first failure with the worker's own message,
    even under max_failures -1, instead of restarting forever. A missing dataset fails on the driver,
    before any worker starts."""
    import shutil

    from kilm_ray.config import ConfigError
    from kilm_ray.store.loader import DataError

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["files"]["train"] = []
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = train_cfg.with_overrides({"train.max_failures": -1})
    started = time.time()
    with pytest.raises(ConfigError, match="the train split is empty"):
        run_training(cfg, str(data), str(tmp_path / "runs"), "bad-input")
    assert time.time() - started < 120  # one worker-group start, no retries (they would never end)
    with pytest.raises(DataError, match="has no manifest.json"):
        run_training(cfg, str(tmp_path / "missing"), str(tmp_path / "runs"), "no-data")
    assert not (tmp_path / "runs" / "no-data").exists()  # nothing was started


def test_a_run_that_stops_fails_loudly_under_ray(ray_cluster, tiny_data, tmp_path, capsys):
    """Workers that stop without finishing (here: restarts without progress) make `kilm-ray train`
    exit non-zero naming the cause, although Ray's result holds no error and no new checkpoint."""
    from kilm_ray.cli import main

    run = tmp_path / "runs" / "stalled"
    run.mkdir(parents=True)
    (run / "restarts.json").write_text(json.dumps({"start_step": 0, "without_progress": 2}))
    (run / "last_error.json").write_text(json.dumps({"rank": 1, "step": 0, "error": "OSError: disk full"}))
    code = main(["train", "--data", tiny_data, "--run-dir", str(tmp_path / "runs"), "--name", "stalled",
                 "--config", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"),
                 "train.max_restarts_without_progress=2", "train.max_steps=4", "train.num_workers=2"])
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    assert "kilm-ray train: error: stopped at step 0 of 4: 3 restarts in a row from step 0 made no progress" in err
    assert "the last error, on rank 1 at step 0: OSError: disk full" in err
    assert not list(run.glob("checkpoint_*"))


def test_waiting_for_spot_capacity_is_bounded_and_named(ray_cluster, tiny_data, tiny_config, tmp_path):
    """With max_failures -1 the group waits for resources (retried without counting as failures) up to
    train.capacity_wait_s, then the run fails naming what it waited for."""
    from kilm_ray.train.resources import WorkerPlacementError

    cfg = tiny_config.with_overrides({"train.max_failures": -1, "train.worker_resources": {"nowhere": 1},
                                      "train.capacity_wait_s": 6, "train.worker_start_attempt_s": 2,
                                      "train.capacity_log_every_s": 2, "train.max_steps": 2})
    started = time.time()
    with pytest.raises(WorkerPlacementError, match=r"\{'CPU': 0.5, 'nowhere': 1.0\}\) waited 0\.\d min for "
                                                   r"resources, longer than train.capacity_wait_s \(0\.1 min\)"):
        run_training(cfg, tiny_data, str(tmp_path / "runs"), "waiting")
    assert time.time() - started < 60
