"""Every private DeepSpeed internal kilm_ray relies on, in one place, behind a version check.

Checkpoints hold the fp32 master weights and Adam moments in a layout of our own
(``train.checkpoint``): each rank writes the fragments its ZeRO partition owns, with no communication,
and a restore puts full tensors back through DeepSpeed's public ``safe_set_full_*`` functions, at
any worker count and ZeRO stage. Writing a rank's own fragments needs DeepSpeed internals that no
public API offers: ``param._hp_mapping`` (the fragment of a parameter in this rank's partition:
``lp_fragment_address``, ``get_hp_fragment``, ``get_optim_state_keys``), the flat fp32 partitions of
the ZeRO optimizers (``single_partition_of_fp32_groups``, ``fp32_partitioned_groups_flat``,
``fp32_groups_flat_partition``), the lazy link of optimizer states to fragments
(``_hp_optimizer_states_linked``, ``_lazy_init_hp_params_optimizer_state``), the loss scaler's fields
and ZeRO-3's ``ds_shape``. They change between DeepSpeed releases without notice, so
:func:`check_version` refuses a DeepSpeed these were not tested with (set
``KILM_RAY_ALLOW_UNTESTED_DEEPSPEED=1`` to try one anyway; the checkpoint tests are the check).

Why not DeepSpeed's own checkpoints: ``save_checkpoint`` writes ``torch.save`` pickles (we never
unpickle what a user did not write), synchronously, per rank and per stage; loading them at another
worker count needs the offline ``ds_to_universal`` conversion (one process reading every shard)
before the universal-checkpoint loader can reshard them. Why not ``torch.distributed.checkpoint``:
it reshards what a ``state_dict`` exposes as DTensors or sharded tensors; DeepSpeed's ZeRO optimizers
expose neither (their ``state_dict`` is the flat partition of this world size), so the fragment
mapping below would be needed anyway, and its metadata file is a pickle. Our write costs one copy of
a rank's fragments to host memory (bench/checkpoint_stall.py: the only wait of the loop).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from kilm_ray.train.checkpoint import Shard, owner_of

MOMENTS = ("exp_avg", "exp_avg_sq")
# DeepSpeed releases whose internals (above) the checkpoint tests passed with.
TESTED_DEEPSPEED = ("0.19.8",)
ALLOW_UNTESTED = "KILM_RAY_ALLOW_UNTESTED_DEEPSPEED"


class UntestedDeepSpeed(RuntimeError):
    pass


def check_version(version: Optional[str] = None) -> None:
    """Refuse a DeepSpeed whose internals were not tested (see the module's docstring)."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    base = version.split("+")[0]
    if base in TESTED_DEEPSPEED or os.environ.get(ALLOW_UNTESTED) == "1":
        return
    raise UntestedDeepSpeed(
        f"DeepSpeed {version} is not one kilm_ray's checkpoints were tested with ({', '.join(TESTED_DEEPSPEED)}): "
        f"they read DeepSpeed internals (ZeRO fragment mappings, flat fp32 partitions) listed in {__file__}. "
        f"Install deepspeed=={TESTED_DEEPSPEED[-1]}, or set {ALLOW_UNTESTED}=1 and run the checkpoint tests "
        "(tests/test_train_local.py, tests/test_checkpoint.py) on this version first.")


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


def ensure_optimizer_state(engine, step: int) -> None:
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


def _fragments_owned(engine) -> bool:
    """ZeRO 1-2 (and DeepSpeed's bf16 optimizer) map each rank's fp32 partition onto parameter
    fragments: a rank can write its own state with no communication. Decided from the configuration
    so every rank takes the same path."""
    return engine.zero_optimization_stage() in (1, 2) or (engine.bfloat16_enabled()
                                                          and engine.zero_optimization_stage() == 0)


def full_shapes(engine) -> dict[str, tuple[int, ...]]:
    """Every parameter's full shape (ZeRO-3 keeps it in ``ds_shape``; the tensor is a partition)."""
    return {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in engine.module.named_parameters()}


def gather_state(engine, with_moments: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full fp32 weights (and Adam moments) by parameter name, on CPU. Collective: every rank calls."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    ensure_optimizer_state(engine, adam_step(engine))
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


def rank_fragments(engine, rank: int, world_size: int):
    """Yield ``(name, offset, fp32 fragment, full shape, {moment: fragment})`` for the pieces of the
    training state this rank writes. Collective only under ZeRO-3 (which gathers each parameter)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    ensure_optimizer_state(engine, adam_step(engine))
    named = list(engine.module.named_parameters())
    if _fragments_owned(engine):
        for name, param in named:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # no fragment of this parameter in this rank's partition
                continue
            yield (name, mapping.lp_fragment_address.start, mapping.get_hp_fragment(), param.shape,
                   {key: mapping.get_hp_fragment(key) for key in MOMENTS if key in mapping.get_optim_state_keys()})
    else:
        stage3 = engine.zero_optimization_stage() == 3
        shapes = full_shapes(engine)
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
                yield name, 0, weight, shapes[name], moments
    if rank == 0:
        for name, buffer in engine.module.named_buffers():
            yield f"buffer:{name}", 0, buffer, buffer.shape, {}


def restore_optimizer(engine, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int) -> None:
    """Put fp32 master weights, Adam moments and the Adam step into an initialized engine. The
    checkpoint was verified to cover every parameter and both moments (``checkpoint.verify_covers``)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ensure_optimizer_state(engine, step)
    partitioned = _partitioned(engine)
    optimizer = base_optimizer(engine)
    for name, param in engine.module.named_parameters():
        if partitioned:
            safe_set_full_fp32_param(param, weights[name].to(param.device))
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, moments[f"{key}.{name}"].to(param.device), key)
        else:
            for key in MOMENTS:
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


def precision_metrics(engine) -> dict[str, float]:
    """Steps skipped on fp16 overflow (the optimizer did not step) and the current loss scale."""
    out = {"skipped_steps": float(getattr(engine, "skipped_steps", 0))}
    # DeepSpeed's ZeRO optimizers keep a scaler object in fp32 and bf16 runs too (scale 1, never used).
    scale = loss_scale_state(engine) if getattr(engine, "fp16_enabled", lambda: False)() else None
    if scale is not None:
        out["loss_scale"] = float(scale["cur_scale"])
    return out


def snapshot_shard(engine, rank: int, world_size: int) -> Shard:
    """The part of the state this rank writes, copied to the host: the only work the training loop
    waits for. Collective only under ZeRO-3."""
    shard = Shard()
    for name, offset, tensor, shape, moments in rank_fragments(engine, rank, world_size):
        shard.add(name, offset, tensor, shape, moments)
    return shard
