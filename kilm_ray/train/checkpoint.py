"""Consolidated, world-size-independent training checkpoints.

A checkpoint directory holds the *full* training state, whatever the ZeRO stage and worker count
that wrote it::

    model.safetensors       fp32 master weights, by parameter name
    optimizer.safetensors   AdamW moments (exp_avg.<name>, exp_avg_sq.<name>)
    trainer_state.json      step, epoch, samples consumed, Adam step, scheduler, loss scale, RNG scheme,
                            world size and ZeRO stage at save time, metrics, the full config
    model_config.json       the BART config
    tokenizer/              the tokenizer, so an export needs nothing else

Weights and moments are gathered through DeepSpeed's public tensor-fragment API
(``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``) and written back with the
``safe_set_*`` twins, so a checkpoint resumes bit-exactly on the same worker count and with the
same optimizer state on any other (DeepSpeed's own checkpoints are per-rank partitions that need an
offline ``ds_to_universal`` conversion to change the data-parallel size). Only ``safetensors`` and
JSON are read back: nothing is unpickled.

Atomicity: under Ray Train a checkpoint is registered only after every file is persisted
(``ray.train.report``); without Ray, :class:`LocalCheckpoints` writes into a temporary directory and
renames it into place, so a crash leaves either a complete checkpoint or an ignored temporary.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
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


def gather_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full fp32 weights and Adam moments by parameter name, on CPU. Collective: every rank calls."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    _ensure_optimizer_state(engine, adam_step(engine))
    partitioned = _partitioned(engine)
    optimizer = base_optimizer(engine)
    for name, param in engine.module.named_parameters():
        if partitioned:
            weights[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone()
            for key in MOMENTS:
                value = safe_get_full_optimizer_state(param, key)
                if value is not None:
                    moments[f"{key}.{name}"] = value.detach().float().cpu().clone()
        else:
            weights[name] = param.detach().float().cpu().clone()
            state = optimizer.state.get(param, {})
            for key in MOMENTS:
                if key in state:
                    moments[f"{key}.{name}"] = state[key].detach().float().cpu().clone()
    for name, buffer in engine.module.named_buffers():
        weights[f"buffer:{name}"] = buffer.detach().float().cpu().clone()
    return weights, moments


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
    return Checkpoint(
        weights=load_file(str(directory / "model.safetensors")),
        moments=load_file(str(directory / "optimizer.safetensors")),
        state=json.loads((directory / STATE_FILE).read_text()),
        path=directory,
    )


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

    def staging(self, step: int) -> Path:
        tmp = self.root / f".tmp-{CHECKPOINT_PREFIX}{step:08d}-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, staging: Path, step: int) -> Path:
        final = self.root / f"{CHECKPOINT_PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)  # atomic on one filesystem
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            if stale != staging:
                shutil.rmtree(stale, ignore_errors=True)
        return final


# What decides the data order and the learning-rate schedule: a resumed run must match its checkpoint.
RESUME_INVARIANTS = ("dataset", "n_train_samples", "global_batch_size", "total_steps", "seed")


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """``key: checkpoint X, now Y`` for each invariant that differs (keys an older checkpoint lacks are
    not checked). The worker count, ZeRO stage and precision may change; these may not."""
    return [f"{key}: checkpoint {saved[key]!r}, now {current[key]!r}" for key in RESUME_INVARIANTS
            if key in saved and key in current and saved[key] != current[key]]
