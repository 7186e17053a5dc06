"""Launching the worker loop without Ray: one process, or one per GPU under ``torchrun``.

Same loop, same checkpoints, same metrics as under Ray Train: this is how Ray's overhead is
measured (bench/train_throughput.py) and how the GPU benchmark runs on a machine without Ray.
Checkpoints live in ``<run_dir>/checkpoints`` and are committed by atomic rename; rerunning the
same command resumes from the newest complete one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from kilm_ray import storage
from kilm_ray.config import KilmConfig
from kilm_ray.train.checkpoint import LocalCheckpoints
from kilm_ray.train.loop import RunEnv, train_worker


class LocalEnv(RunEnv):
    def __init__(self, run_dir: str, keep: int):
        if storage.is_remote(run_dir):
            raise ValueError("runs without Ray write to a local --run-dir; use Ray Train for s3://")
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self._run_dir = Path(run_dir)
        self.checkpoints = LocalCheckpoints(self._run_dir / "checkpoints", keep)
        self.reports: list[dict[str, Any]] = []

    @property
    def run_uri(self) -> str:
        return str(self._run_dir)

    def resume_checkpoint(self) -> Optional[Path]:
        return self.checkpoints.latest()

    def staging_dir(self, step: int) -> Path:
        return self.checkpoints.staging(step)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None and self.rank == 0:
            self.checkpoints.commit(checkpoint_dir, int(metrics["step"]))
        if self.world_size > 1:  # the others must not read a checkpoint before it is committed
            import torch.distributed as dist

            dist.barrier()


def run_local(cfg: KilmConfig, data_dir: str, run_dir: str) -> dict[str, Any]:
    env = LocalEnv(run_dir, cfg.train.keep_checkpoints)
    return train_worker(cfg, data_dir, env)
