"""Consolidated, world-size-independent training checkpoints.

A checkpoint directory holds the full training state, written in shards by every rank in parallel
and readable at any worker count and ZeRO stage::

    model-<rank>-of-<n>.safetensors      this rank's pieces of the fp32 master weights
    optimizer-<rank>-of-<n>.safetensors  its pieces of the AdamW moments (exp_avg.<name>, exp_avg_sq.<name>)
    trainer_state.json      step, epoch, samples consumed, Adam step, scheduler, loss scale, RNG scheme,
                            world size and ZeRO stage at save time, shard count, metrics, the full config
    model_config.json       the BART config
    tokenizer/              the tokenizer, so an export needs nothing else

A piece is keyed ``<name>@<offset>``: a 1-D run of the flattened tensor starting at ``offset``, and
each file's metadata gives the full shapes. Under ZeRO 1-2 a rank writes exactly the fragments its
optimizer partition owns (DeepSpeed's ``_hp_mapping``: no communication, 1/n of the state per rank);
otherwise whole parameters are dealt out to ranks by size (ZeRO-3 gathers them first). Reading
stitches the pieces into full tensors, which go back through DeepSpeed's public
``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``, so a run resumes bit-exactly on the
same worker count and with the same optimizer state on any other (DeepSpeed's own checkpoints need
an offline ``ds_to_universal`` conversion for that). Only ``safetensors`` and JSON are read back:
nothing is unpickled. The older single-file layout (``model.safetensors``) is still read.

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
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
CHECKPOINT_PREFIX = "checkpoint_"


def base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def adam_step(engine) -> int:
    for state in base_optimizer(engine).state.values():
        if "step" in state:
            step = state["step"]
            return int(step.item() if torch.is_tensor(step) else step)
    return 0


def _set_adam_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    for state in optimizer.state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = torch.tensor(float(step), dtype=old.dtype, device=old.device) if torch.is_tensor(old) else step


def _ensure_optimizer_state(engine, step: int) -> None:
    """Give every tensor the base optimizer steps an AdamW state, then (re)link DeepSpeed's
    per-parameter views of it. DeepSpeed creates states lazily at the first step and links them
    once; with several parameter groups a group can be linked before its state exists (seen with
    ZeRO-2 in 0.19.8), and a fresh engine we restore into has taken no step at all."""
    optimizer = base_optimizer(engine)
    wrapper = engine.optimizer
    # The tensors AdamW steps: ZeRO's flat fp32 partitions (ZeRO-3 swaps them into the param
    # groups only while stepping), else the parameters of the optimizer's groups.
    stepped = (getattr(wrapper, "fp32_partitioned_groups_flat", None)
               or getattr(wrapper, "single_partition_of_fp32_groups", None)
               or getattr(wrapper, "fp32_groups_flat_partition", None)
               or [t for g in optimizer.param_groups for t in g["params"]])
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    for tensor in stepped:
        state = optimizer.state[tensor]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=tensor.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
    if hasattr(wrapper, "_hp_optimizer_states_linked") and hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def _partitioned(engine) -> bool:
    """True when DeepSpeed keeps fp32 master weights apart from the module (ZeRO 1-3, bf16 optimizer).

    Decided from the engine's configuration, never from a parameter: a parameter has an fp32 fragment
    only on the ranks whose partition holds part of it, so a per-parameter test would send ranks down
    different collective paths (seen: gloo size mismatch when one rank held the whole embedding)."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()


def gather_state(engine, with_moments: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full fp32 weights (and Adam moments) by parameter name, on CPU. Collective: every rank calls."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    _ensure_optimizer_state(engine, adam_step(engine))
    partitioned = _partitioned(engine)
    optimizer = base_optimizer(engine)
    for name, param in engine.module.named_parameters():
        if partitioned:
            weights[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone()
            for key in MOMENTS if with_moments else ():
                value = safe_get_full_optimizer_state(param, key)
                if value is not None:
                    moments[f"{key}.{name}"] = value.detach().float().cpu().clone()
        else:
            weights[name] = param.detach().float().cpu().clone()
            state = optimizer.state.get(param, {})
            for key in MOMENTS if with_moments else ():
                if key in state:
                    moments[f"{key}.{name}"] = state[key].detach().float().cpu().clone()
    for name, buffer in engine.module.named_buffers():
        weights[f"buffer:{name}"] = buffer.detach().float().cpu().clone()
    return weights, moments


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


def _fragments_owned(engine) -> bool:
    """ZeRO 1-2 (and DeepSpeed's bf16 optimizer) map each rank's fp32 partition onto parameter
    fragments: a rank can write its own state with no communication. Decided from the configuration
    so every rank takes the same path."""
    return engine.zero_optimization_stage() in (1, 2) or (engine.bfloat16_enabled()
                                                          and engine.zero_optimization_stage() == 0)


def snapshot_shard(engine, rank: int, world_size: int) -> Shard:
    """The part of the state this rank writes, copied to the host: the only work the training loop
    waits for. Collective only under ZeRO-3 (which gathers each parameter)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _ensure_optimizer_state(engine, adam_step(engine))
    shard = Shard()
    named = list(engine.module.named_parameters())
    if _fragments_owned(engine):
        for name, param in named:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # no fragment of this parameter in this rank's partition
                continue
            shard.add(name, mapping.lp_fragment_address.start, mapping.get_hp_fragment(), param.shape,
                      {key: mapping.get_hp_fragment(key) for key in MOMENTS if key in mapping.get_optim_state_keys()})
    else:
        stage3 = engine.zero_optimization_stage() == 3
        shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in named}
        owners = owner_of({name: int(torch.Size(shape).numel()) for name, shape in shapes.items()}, world_size)
        optimizer = base_optimizer(engine)
        for name, param in named:
            if stage3:  # every rank joins each gather; only the owner keeps a copy
                weight = safe_get_full_fp32_param(param)
                moments = {key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}
                moments = {k: v for k, v in moments.items() if v is not None}
            else:
                weight, state = param, optimizer.state.get(param, {})
                moments = {key: state[key] for key in MOMENTS if key in state}
            if owners[name] == rank:
                shard.add(name, 0, weight, shapes[name], moments)
    if rank == 0:
        for name, buffer in engine.module.named_buffers():
            shard.add(f"buffer:{name}", 0, buffer, buffer.shape, {})
    return shard


def shard_files(rank: int, world_size: int) -> tuple[str, str]:
    return f"model-{rank:05d}-of-{world_size:05d}.safetensors", f"optimizer-{rank:05d}-of-{world_size:05d}.safetensors"


def write_shard(directory: Path, shard: Shard, rank: int, world_size: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model_file, optimizer_file = shard_files(rank, world_size)
    meta = {"shapes": json.dumps(shard.shapes)}
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


def stitch(files: list[Path]) -> dict[str, torch.Tensor]:
    """Full tensors from the ``<name>@<offset>`` pieces of every shard file."""
    full: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            shapes = json.loads((handle.metadata() or {}).get("shapes", "{}"))
            for key in handle.keys():
                base, _, offset = key.rpartition("@")
                name = base.split(".", 1)[1] if base.split(".", 1)[0] in MOMENTS else base
                if base not in full:
                    full[base] = torch.empty(shapes[name], dtype=torch.float32)
                piece = handle.get_tensor(key)
                full[base].view(-1)[int(offset): int(offset) + piece.numel()] = piece
    return full


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


def restore_optimizer(engine, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int) -> None:
    """Put fp32 master weights, Adam moments and the Adam step into an initialized engine."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _ensure_optimizer_state(engine, step)
    partitioned = _partitioned(engine)
    optimizer = base_optimizer(engine)
    for name, param in engine.module.named_parameters():
        if partitioned:
            safe_set_full_fp32_param(param, weights[name].to(param.device))
            for key in MOMENTS:
                if f"{key}.{name}" in moments:
                    safe_set_full_optimizer_state(param, moments[f"{key}.{name}"].to(param.device), key)
        else:
            for key in MOMENTS:
                if f"{key}.{name}" in moments:
                    optimizer.state[param][key].copy_(moments[f"{key}.{name}"])
    _set_adam_step(optimizer, step)


def loss_scale_state(engine) -> Optional[dict]:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not hasattr(scaler, "cur_scale"):
        return None
    return {k: float(v) if isinstance(v, (int, float)) else v for k, v in vars(scaler).items()
            if k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")}


def restore_loss_scale(engine, state: Optional[dict]) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if state and scaler is not None:
        for key, value in state.items():
            if hasattr(scaler, key):
                setattr(scaler, key, type(getattr(scaler, key))(value))


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path


def write_checkpoint(directory: Path, weights: dict, moments: dict, state: dict, model_config: dict,
                     tokenizer_dir: Optional[Path]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in moments.items()}, str(directory / "optimizer.safetensors"))
    (directory / "model_config.json").write_text(json.dumps(model_config, indent=2, default=str))
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, directory / "tokenizer", dirs_exist_ok=True)
    # The state file last: a directory without it is incomplete.
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
    return directory


def read_checkpoint(directory: str | Path) -> Checkpoint:
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a complete kilm_ray checkpoint (no {STATE_FILE})")
    state = json.loads((directory / STATE_FILE).read_text())
    if (directory / "model.safetensors").is_file():  # the single-file layout of earlier versions
        weights, moments = load_file(str(directory / "model.safetensors")), load_file(str(directory / "optimizer.safetensors"))
    else:
        n = int(state.get("checkpoint_shards", 0))
        expected = [shard_files(r, n) for r in range(n)]
        missing = [f for pair in expected for f in pair if not (directory / f).is_file()]
        if not n or missing:
            raise FileNotFoundError(f"{directory} is incomplete: {n} shards expected, missing {missing[:4]}")
        weights = stitch([directory / model for model, _ in expected])
        moments = stitch([directory / optimizer for _, optimizer in expected])
    return Checkpoint(weights=weights, moments=moments, state=state, path=directory)


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
