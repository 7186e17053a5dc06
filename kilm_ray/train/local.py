"""Launching the worker loop without Ray: one process, or one per GPU under ``torchrun``.

Same loop, same checkpoints, same metrics as under Ray Train: this is how Ray's overhead is
measured (bench/train_throughput.py) and how the GPU benchmark runs on a machine without Ray.
Checkpoints live in ``<run_dir>/checkpoints`` and are committed by atomic rename; rerunning the
same command resumes from the newest complete one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

from kilm_ray import storage
from kilm_ray.config import KilmConfig
from kilm_ray.train.checkpoint import BackgroundWriter, LocalCheckpoints, write_state
from kilm_ray.train.env import RunEnv, RunStopped, clear_stop
from kilm_ray.train.loop import train_worker


class LocalEnv(RunEnv):
    def __init__(self, run_dir: str, keep: int):
        if storage.is_remote(run_dir):
            raise ValueError("runs without Ray write to a local --run-dir; use Ray Train for s3://")
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self._run_dir = Path(run_dir)
        self.checkpoints = LocalCheckpoints(self._run_dir / "checkpoints", keep)
        if self.rank == 0:  # before any rank writes: leftovers of a crashed run are not ours to commit
            self.checkpoints.remove_staging()
        self.reports: list[dict[str, Any]] = []
        self.writer = BackgroundWriter()

    @property
    def run_uri(self) -> str:
        return str(self._run_dir)

    def resume_checkpoint(self) -> Optional[Path]:
        return self.checkpoints.latest()

    def report(self, metrics: dict[str, Any]) -> None:
        self.reports.append(metrics)

    def checkpoint(self, step: int, metrics: dict[str, Any], write: Callable[[Path], None],
                   state: Optional[dict]) -> None:
        """Every rank writes its shard into one staging directory in the background; rank 0 waits for
        the others' markers, writes the state file and renames the directory into place."""
        self.reports.append(metrics)
        directory = self.checkpoints.shared_staging(step)
        rank, world, checkpoints = self.rank, self.world_size, self.checkpoints

        def job() -> None:
            write(directory)
            (directory / f".written-{rank}").touch()
            if rank == 0:
                checkpoints.wait_for_markers(directory, world)
                write_state(directory, state)
                checkpoints.commit(directory, step)

        self.writer.submit(job)

    def close(self) -> None:
        self.writer.wait()


def run_local(cfg: KilmConfig, data_dir: str, run_dir: str) -> dict[str, Any]:
    """Train (or resume) the run in ``run_dir``; raises :class:`RunStopped` when it stopped without
    finishing (the cause in the message), as the Ray launcher does."""
    from kilm_ray.store.loader import check_dataset

    check_dataset(cfg.train, data_dir)
    env = LocalEnv(run_dir, cfg.train.keep_checkpoints)
    if env.rank == 0:
        clear_stop(run_dir)
    try:
        metrics = train_worker(cfg, data_dir, env)
    finally:
        if env.world_size > 1:  # torchrun's processes end with the run (one process keeps its group for reuse)
            _release_process_group()
    if metrics.get("stopped"):
        raise RunStopped(f"stopped at step {metrics['step']}: {metrics['stopped']}")
    return metrics


def _release_process_group() -> None:
    """Tear down the process group this launcher's processes made (under torchrun), before the interpreter
    exits: left to the exit, gloo's threads were destroyed while still running and one rank of a finished
    run aborted ("terminate called without an active exception", exit -6) on a loaded machine."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
