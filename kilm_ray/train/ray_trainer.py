"""Ray Train wiring: a TorchTrainer whose workers run ``train_worker`` (thin on purpose).

Fault tolerance comes from Ray Train V2: a failed worker group restarts (``FailureConfig``) and each
worker resumes from ``ray.train.get_checkpoint()``; rerunning the same ``--run-dir`` / ``--name``
after a driver failure restores the run's checkpoint history from storage; ``num_workers: [min, max]``
makes the run elastic. A checkpoint is registered only once fully persisted, so a crash mid-write
leaves the previous one in place.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from kilm_ray import storage
from kilm_ray.config import KilmConfig, config_from_dict
from kilm_ray.train.loop import RunEnv, train_worker

log = logging.getLogger("kilm_ray.train")


class RayEnv(RunEnv):
    def __init__(self, run_uri: str):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self._run_uri = run_uri
        self._tmp = Path(tempfile.mkdtemp(prefix="kilm_ckpt_"))

    @property
    def run_uri(self) -> str:
        return self._run_uri

    def resume_checkpoint(self) -> Optional[Path]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        return Path(checkpoint.to_directory(str(self._tmp / "resume")))

    def staging_dir(self, step: int) -> Path:
        path = self._tmp / f"checkpoint_{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"checkpoint_{int(metrics['step']):08d}" if checkpoint_dir else None)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _worker(config: dict) -> None:
    from kilm_ray.cluster import worker_logging

    worker_logging()
    cfg = config_from_dict(config["cfg"], source="train_loop_config")
    train_worker(cfg, config["data_dir"], RayEnv(config["run_uri"]))


def build_trainer(cfg: KilmConfig, data_dir: str, run_dir: str, name: str, callbacks: Optional[list] = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    lo, hi = t.worker_bounds
    resources = {"CPU": t.cpus_per_worker, **t.worker_resources}
    if t.use_gpu:
        resources["GPU"] = 1
    storage_fs, storage_path, run_uri = storage.ray_storage(run_dir, name)
    return TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config={"cfg": cfg.to_dict(), "data_dir": data_dir, "run_uri": run_uri},
        scaling_config=ScalingConfig(num_workers=lo if lo == hi else (lo, hi), use_gpu=t.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks or None,
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )


def run_training(cfg: KilmConfig, data_dir: str, run_dir: str, name: str):
    """Fit (or resume) the run ``run_dir/name``; returns Ray's Result."""
    trainer = build_trainer(cfg, data_dir, run_dir, name)
    result = trainer.fit()
    return result
