"""Consolidated, world-size-independent training checkpoints: the file format, its verification,
and where the files are written. (What DeepSpeed holds and how it gets in and out: ``train.zero``.)

A checkpoint directory holds the full training state, written in shards by every rank in parallel
and readable at any worker count and ZeRO stage::

    model-<rank>-of-<n>.safetensors      this rank's pieces of the fp32 master weights
    optimizer-<rank>-of-<n>.safetensors  its pieces of the AdamW moments (exp_avg.<name>, exp_avg_sq.<name>)
    trainer_state.json      step, epoch, samples consumed, Adam step, scheduler, loss scale, RNG scheme,
                            world size and ZeRO stage at save time, shard count, the checkpoint's id,
                            metrics, the full config
    model_config.json       the BART config
    tokenizer/              the tokenizer, so an export needs nothing else

A piece is keyed ``<name>@<offset>``: a 1-D run of the flattened tensor starting at ``offset``. Each
shard file's metadata gives the full shapes, the checkpoint id (the run's id and the step, shared by
every rank of the run), its rank and the shard count. Reading verifies before it trusts: every shard
the state file announces is present and readable, belongs to this checkpoint and this rank, and the
pieces cover every element of every parameter and of both Adam moments exactly once; anything else is
a :class:`CheckpointError` naming the file (or the tensor and the files holding its pieces). Only
``safetensors`` and JSON are read back: nothing is unpickled.

Atomicity: under Ray Train a checkpoint is registered only after every file is persisted
(``ray.train.report``); without Ray, :class:`LocalCheckpoints` writes into a temporary directory and
renames it into place, so a crash leaves either a complete checkpoint or an ignored temporary.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kilm_ray.errors import UserInputError

STATE_FILE = "trainer_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
CHECKPOINT_PREFIX = "checkpoint_"


class CheckpointError(UserInputError, ValueError):
    """A checkpoint that cannot be trusted: the message names the file (or tensor) at fault. A restart
    would read the same files, so (as for a bad input) the run stops at once rather than retrying."""


def owner_of(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Deal whole tensors out to ranks, largest first to the least loaded (deterministic)."""
    load = [0] * world_size
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


@dataclass
class Shard:
    """One rank's pieces of the training state, copied to host memory (``<name>@<offset>`` -> 1-D)."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    moments: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def add(self, name: str, offset: int, tensor: torch.Tensor, shape, moments: dict[str, torch.Tensor]) -> None:
        self.weights[f"{name}@{offset}"] = _host_copy(tensor)
        for key, value in moments.items():
            self.moments[f"{key}.{name}@{offset}"] = _host_copy(value)
        self.shapes[name] = list(shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.weights, self.moments) for t in d.values())


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().reshape(-1).to("cpu", copy=True)


def checkpoint_id(run_id: str, step: int) -> str:
    return f"{run_id}/{step}"


def shard_files(rank: int, world_size: int) -> tuple[str, str]:
    return f"model-{rank:05d}-of-{world_size:05d}.safetensors", f"optimizer-{rank:05d}-of-{world_size:05d}.safetensors"


def write_shard(directory: Path, shard: Shard, rank: int, world_size: int, ckpt_id: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model_file, optimizer_file = shard_files(rank, world_size)
    meta = {"shapes": json.dumps(shard.shapes), "checkpoint": ckpt_id, "rank": str(rank),
            "world_size": str(world_size)}
    save_file(shard.weights, str(directory / model_file), metadata=meta)
    save_file(shard.moments, str(directory / optimizer_file), metadata=meta)


def write_rank0_files(directory: Path, model_config: dict, tokenizer_dir: Optional[Path]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model_config.json").write_text(json.dumps(model_config, indent=2, default=str))
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, directory / "tokenizer", dirs_exist_ok=True)


def write_state(directory: Path, state: dict) -> None:
    """The state file last: a directory without it is incomplete."""
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))


# ----------------------------------------------------------------------------------------------
# Reading, verified
# ----------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path
    model_config: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """The full state of a checkpoint directory, verified element for element (module docstring)."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{directory} is not a complete kilm_ray checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{state_path}: not valid JSON ({exc})") from None
    n = int(state.get("checkpoint_shards", 0))
    if n < 1:
        raise CheckpointError(f"{state_path}: no shard count (checkpoint_shards); not a sharded kilm_ray checkpoint")
    expected = [shard_files(r, n) for r in range(n)]
    missing = [f for pair in expected for f in pair if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: shard file {missing[0]} is missing ({len(missing)} of {2 * n} "
                              f"files missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    ckpt_id = state.get("checkpoint_id")
    shapes: dict[str, list[int]] = {}
    weights = _stitch([directory / model for model, _ in expected], ckpt_id, shapes)
    moments = _stitch([directory / optimizer for _, optimizer in expected], ckpt_id, shapes)
    params = [name for name in shapes if not name.startswith("buffer:")]
    absent = [name for name in shapes if name not in weights]
    absent += [f"{key}.{name}" for name in params for key in MOMENTS if f"{key}.{name}" not in moments]
    if absent:
        files = "model" if absent[0] in shapes else "optimizer"
        raise CheckpointError(f"{directory}: {absent[0]} is in none of the {files}-*-of-{n:05d} shard files "
                              f"({len(absent)} tensors missing)")
    config_path = directory / "model_config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: model_config.json is missing (the model's architecture)")
    model_config = json.loads(config_path.read_text())
    return Checkpoint(weights=weights, moments=moments, state=state, path=directory, model_config=model_config)


def _stitch(files: list[Path], ckpt_id: Optional[str], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Full tensors from the ``<name>@<offset>`` pieces of ``files``, each file checked to belong to
    checkpoint ``ckpt_id`` and its rank, and each tensor checked to be covered exactly once."""
    full: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[int, int, str]]] = {}
    world = len(files)
    for rank, path in enumerate(files):
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if ckpt_id is not None and meta.get("checkpoint") != ckpt_id:
                    raise CheckpointError(
                        f"{path}: this shard belongs to checkpoint {meta.get('checkpoint')!r}, not to {ckpt_id!r} "
                        "(a shard of another run or step was copied in): refusing to mix them")
                if "rank" in meta and (int(meta["rank"]), int(meta["world_size"])) != (rank, world):
                    raise CheckpointError(f"{path}: written as rank {meta['rank']} of {meta['world_size']}, "
                                          f"found as rank {rank} of {world}")
                for name, shape in json.loads(meta.get("shapes", "{}")).items():
                    if shapes.setdefault(name, shape) != shape:
                        raise CheckpointError(f"{path}: {name} has shape {shape}, other shards say {shapes[name]}")
                for key in handle.keys():
                    base, _, offset = key.rpartition("@")
                    head, _, rest = base.partition(".")
                    name = rest if head in MOMENTS else base
                    if name not in shapes:
                        raise CheckpointError(f"{path}: piece {key} of a tensor without a shape")
                    if base not in full:
                        full[base] = torch.empty(shapes[name], dtype=torch.float32)
                    piece = handle.get_tensor(key)
                    start = int(offset)
                    if start + piece.numel() > full[base].numel():
                        raise CheckpointError(f"{path}: piece {key} ({piece.numel()} elements) runs past the end "
                                              f"of {base} ({full[base].numel()} elements)")
                    full[base].view(-1)[start: start + piece.numel()] = piece
                    pieces.setdefault(base, []).append((start, piece.numel(), path.name))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors' own errors: a truncated or corrupt file
            raise CheckpointError(f"{path}: unreadable shard (truncated or corrupt?): "
                                  f"{type(exc).__name__}: {exc}") from None
    for base, found in pieces.items():
        problem = coverage_problem(found, full[base].numel())
        if problem:
            raise CheckpointError(f"{base}: {problem}")
    return full


def coverage_problem(pieces: list[tuple[int, int, str]], numel: int) -> Optional[str]:
    """Why ``(offset, length, file)`` pieces do not cover ``[0, numel)`` exactly once, or None."""
    at = 0
    for start, length, name in sorted(pieces):
        if start > at:
            return f"elements [{at}, {start}) are in no shard (next piece from {name})"
        if start < at:
            return f"elements [{start}, {min(at, start + length)}) are in two shards (one is {name})"
        at = start + length
    if at < numel:
        holders = sorted({name for _, _, name in pieces})
        return f"elements [{at}, {numel}) are in no shard (pieces from {', '.join(holders)})"
    return None


class BackgroundWriter:
    """Runs checkpoint writes off the training thread, one at a time: a new one first waits for the
    previous (host memory holds at most one snapshot in flight) and an error in the background is
    raised in the training thread at the next call."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="kilm-checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {error}") from error


def load_weights_into_module(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy fp32 weights into a freshly built (not yet DeepSpeed-wrapped) module."""
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    missing = [n for n in params if n not in weights]
    if missing:
        raise ValueError(f"checkpoint lacks parameters {missing[:5]} (model config changed?)")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != weights[name].shape:
                raise ValueError(f"checkpoint parameter {name} has shape {tuple(weights[name].shape)}, "
                                 f"model has {tuple(param.shape)}")
            param.copy_(weights[name])
        for name, buffer in buffers.items():
            if f"buffer:{name}" in weights:
                buffer.copy_(weights[f"buffer:{name}"])


class LocalCheckpoints:
    """Atomic checkpoints in ``root/checkpoint_<step>`` for runs without Ray (local disk)."""

    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def complete(self) -> list[Path]:
        dirs = [d for d in self.root.glob(f"{CHECKPOINT_PREFIX}*") if (d / STATE_FILE).is_file()]
        return sorted(dirs, key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):]))

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1] if done else None

    def shared_staging(self, step: int) -> Path:
        """The staging directory of checkpoint ``step``, the same for every rank of the run."""
        path = self.root / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def wait_for_markers(directory: Path, world_size: int, timeout_s: float = 3600.0) -> None:
        deadline = time.time() + timeout_s
        while not all((directory / f".written-{r}").exists() for r in range(world_size)):
            if time.time() > deadline:
                raise TimeoutError(f"{directory}: not every rank wrote its shard within {timeout_s:.0f} s")
            time.sleep(0.05)
        for r in range(world_size):
            (directory / f".written-{r}").unlink()

    def remove_staging(self) -> None:
        for stale in self.root.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

    def commit(self, staging: Path, step: int) -> Path:
        final = self.root / f"{CHECKPOINT_PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)  # atomic on one filesystem
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


# What decides the data order and the learning-rate schedule: a resumed run must match its checkpoint.
RESUME_INVARIANTS = ("dataset", "n_train_samples", "global_batch_size", "total_steps", "seed")


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """``key: checkpoint X, now Y`` for each invariant that differs (keys an older checkpoint lacks are
    not checked). The worker count, ZeRO stage and precision may change; these may not."""
    return [f"{key}: checkpoint {saved[key]!r}, now {current[key]!r}" for key in RESUME_INVARIANTS
            if key in saved and key in current and saved[key] != current[key]]
