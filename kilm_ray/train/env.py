"""Where a training worker runs (``RunEnv``), and the run's metrics files (``Artifacts``).

Two environments implement ``RunEnv``: ``ray_trainer.RayEnv`` (a Ray Train worker) and
``local.LocalEnv`` (one process, or one per GPU under torchrun). The recipe (``train.loop``) talks only
to this interface.
"""

from __future__ import annotations

import abc
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from kilm_ray import storage


class RunEnv(abc.ABC):
    """Where a worker runs: rank and device, where checkpoints go, how metrics are reported."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    @property
    @abc.abstractmethod
    def run_uri(self) -> str:
        """The run directory (local or s3://) for metrics, TensorBoard events and the export."""

    def wait_for_nodes(self) -> None:
        """Every rank has its node's data ready: the first collective may start. Called before any
        collective, so a node still converting its data holds the others in a wait without a
        timeout rather than in an all-reduce that times out."""

    @abc.abstractmethod
    def resume_checkpoint(self) -> Optional[Path]:
        """A local directory holding the checkpoint to resume from, or None."""

    def release_resume(self) -> None:
        """Every rank has read the resume checkpoint: local copies may go."""

    def heard_preemption(self) -> bool:
        """Whether this rank has been told that a node of the run is about to go (local, no
        communication: the step's control vector makes the ranks agree)."""
        return False

    def room_to_grow(self) -> bool:
        """Rank 0: whether the cluster can hold one more worker of an elastic run (Ray Train will then
        restart the group larger: checkpoint first)."""
        return False

    @abc.abstractmethod
    def report(self, metrics: dict[str, Any]) -> None:
        """Metrics of a logging step; called by every rank at the same steps."""

    @abc.abstractmethod
    def checkpoint(self, step: int, metrics: dict[str, Any], write: Callable[[Path], None],
                   state: Optional[dict]) -> None:
        """Checkpoint ``step``, called by every rank at the same steps. ``write(directory)`` writes this
        rank's files and may run in the background; rank 0 passes ``state``, the file that completes a
        checkpoint, written once every rank's files are in place."""

    def close(self) -> None:
        """Wait for checkpoints still being written or uploaded."""


STOPPED_FILE = "stopped.json"


class RunStopped(RuntimeError):
    """The workers stopped without finishing the run (restarts without progress, a diverged loss):
    the message names the cause."""



def record_stop(run_uri: str, cause: str, step: int) -> None:
    """Rank 0 of a run that stopped without finishing: what the driver reports (and exits non-zero on)."""
    storage.write_bytes(storage.join(run_uri, STOPPED_FILE),
                        json.dumps({"cause": cause, "step": step, "time": time.time()}).encode())


def read_stop(run_uri: str) -> Optional[dict]:
    path = storage.join(run_uri, STOPPED_FILE)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def clear_stop(run_uri: str) -> None:
    """A new attempt of the run starts: an earlier stop record is history."""
    path = storage.join(run_uri, STOPPED_FILE)
    if storage.exists(path):
        fs, fs_path = storage.resolve(path)
        fs.delete_file(fs_path)


class Artifacts:
    """metrics.jsonl and TensorBoard events of rank 0, written locally and synced to the run dir."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        if storage.is_remote(run_uri):
            import tempfile

            self.local = Path(tempfile.mkdtemp(prefix="kilm_run_"))
            # A restarted worker continues the run's history rather than replacing it.
            for part in ("metrics.jsonl", "tensorboard"):
                source = storage.join(run_uri, part)
                if part.endswith(".jsonl") and storage.exists(source):
                    (self.local / part).write_bytes(storage.read_bytes(source))
                elif storage.is_dir(source):
                    storage.download_dir(source, self.local / part)
        else:
            self.local = Path(run_uri)
        self.local.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.local / "metrics.jsonl"
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.local / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def last_step(self) -> int:
        """The last step logged in metrics.jsonl (0 if none)."""
        if not self.metrics_file.exists():
            return 0
        steps = [json.loads(line).get("step", 0) for line in self.metrics_file.read_text().splitlines() if line]
        return max(steps, default=0)

    def event(self, step: int, **fields: Any) -> None:
        """A non-metric line (e.g. a resume) in metrics.jsonl, so curves show where a run restarted."""
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **fields}) + "\n")

    def sync(self) -> None:
        self.tb.flush()
        if storage.is_remote(self.run_uri):
            storage.upload_dir(self.local, self.run_uri)

    def close(self) -> None:
        self.tb.close()
        self.sync()
