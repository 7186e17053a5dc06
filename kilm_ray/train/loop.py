"""The per-worker training recipe, run by Ray Train workers and by the launcher without Ray (one
process or torchrun), so both can be timed on the same hardware. ``Recipe.run`` is the whole run, in
the order it happens:

    prepare_data     the node's copy of the dataset, opened (built on a node that joined late)
                     before any collective; then every rank waits for every node
    agree_on_start   one all-reduce: stop if the run keeps restarting without progress; the run's id
    setup_model      BART + AdamW + DeepSpeed; restore from the checkpoint, verified
    for each step:
        train_step   the micro-batches; loss sums stay on the device (no host reads)
        agree        right after the optimizer step, one control vector, one all-reduce: a
                     preemption notice, room to grow, rank 0's clock, a non-finite loss, the next
                     step's global loss weight (``train.control``); every rank derives the same plan
        validate, save, log   as the plan says (a preemption's save before the validation: its
                     deadline runs)
    export           a Hugging Face directory from the fp32 master weights

Contracts kept here:
- Data: global step ``s`` consumes the same samples whatever the worker count (``loader.BatchPlan``).
- Loss: the token-weighted mean over the whole global batch, so gradients do not depend on how the
  batch is split across workers and micro-batches.
- Randomness: dropout is reseeded from ``(seed, step, unit)``; masks come from ``(seed, epoch,
  sample_id)``. A resumed run therefore replays exactly what an uninterrupted run does.
- Checkpoints (``train.checkpoint``, ``train.zero``): the full state in shards written by every rank,
  every ``checkpoint_every`` steps, every ``checkpoint_every_minutes``, on a preemption notice, while
  an elastic run can grow, and at the end. The loop waits only for the copy to host memory.
- Hub: a run that resumes builds its model from the checkpoint's config; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from kilm_ray import storage
from kilm_ray.config import ConfigError, KilmConfig
from kilm_ray.store.loader import BatchPlan, SampleStore, StepDataset, read_meta
from kilm_ray.method.masking import MaskingParams, SpecialIds
from kilm_ray.train.checkpoint import (
    Checkpoint, checkpoint_id, load_weights_into_module, read_checkpoint, resume_conflicts,
    write_rank0_files, write_shard,
)
from kilm_ray.train.control import Cadence, ControlState, Signals, StepPlan, plan_step
from kilm_ray.train.env import Artifacts, RunEnv, record_stop
from kilm_ray.train.metrics import BartDims, LossSums, format_eta, mfu, peak_tflops
from kilm_ray.train.validation import Validation, forward_losses, to_device
from kilm_ray.train.zero import adam_step, loss_scale_state, precision_metrics, snapshot_shard

log = logging.getLogger("kilm_ray.train")


class Recipe:
    """One worker's training run. Each concern has one method; ``run`` is the order they happen in."""

    def __init__(self, cfg: KilmConfig, data_dir: str, env: RunEnv):
        self.cfg, self.t, self.data_dir, self.env = cfg, cfg.train, data_dir, env
        self.is_rank0 = env.rank == 0

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        env, t = self.env, self.t
        self.prepare_data()
        env.wait_for_nodes()
        setup_distributed(env)
        resume = self.read_resume()
        start_step = int(resume.state["step"]) if resume is not None else 0
        cause = self.agree_on_start(start_step)
        if cause:  # before the model is built: nothing else to set up or tear down
            env.close()
            return self.stop(start_step, cause)
        self.setup_model(resume)
        validation_pending = bool(resume is not None and resume.state.get("validation_pending"))
        del resume
        loader = self.data_loader(start_step)
        self.validation = Validation(self.stores, self.cfg, self.sp, env.rank, env.world_size, self.all_reduce)
        self.artifacts = Artifacts(env.run_uri) if self.is_rank0 else None
        self.announce(start_step)
        self.start_clocks(start_step)
        if validation_pending:  # saved on a notice before its step's validation: that validation now
            self.validate_resumed(start_step)
        last: dict[str, Any] = {}
        step = start_step
        self.engine.train()
        try:
            batches = iter(loader)
            item = next(batches, None)
            global_weight = (self.all_reduce_values([item["weight"]])[0] or 1.0) if item is not None else 1.0
            while item is not None:
                step = item["step"]
                # The next batch is built before this step, so that the agreement after it waits for
                # nothing (a notice's path) and a loader error comes before the step, not before its save.
                following = next(batches, None)
                self.train_step(step, [to_device(mb, env.device) for mb in item["micro_batches"]],
                                global_weight, item["live"])
                # Agreed right after the optimizer step: a notice heard during this step is saved now.
                plan = self.agree(step, self.signals(), following["weight"] if following is not None else 0.0)
                if plan.stop:
                    return self.stop(step + 1, plan.stop)
                if plan.reports:
                    last = self.after_step(step + 1, plan)
                item, global_weight = following, plan.global_weight
            if t.export_at_end and step + 1 >= self.plan.total_steps:
                self.export(self.plan.total_steps)
        except Exception as exc:
            self.record_error(step, exc)
            raise
        finally:
            env.close()
            if self.artifacts is not None:
                self.artifacts.close()
        return last

    # -- data (before any collective) -----------------------------------------------------------
    def prepare_data(self) -> None:
        """The manifest, tokenizer and the node's copies of the splits. ``kilm_ray.train.node_prep``
        builds them before the worker group starts; a node that joined since builds them here, still
        before any collective."""
        from transformers import AutoTokenizer

        from kilm_ray.store.loader import verify_tokenizer

        t, data_dir = self.t, self.data_dir
        self.meta = read_meta(data_dir)
        self.sp = SpecialIds(**self.meta["special_ids"])
        self.tokenizer_dir = storage.local_copy(verify_tokenizer(data_dir))  # refuses a changed tokenizer.json
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        cache = t.node_cache_dir or None
        self.store = SampleStore.load(data_dir, "train", cache)
        if len(self.store) == 0:
            raise ConfigError(f"{data_dir}: the train split is empty")
        self.stores: dict[str, Optional[SampleStore]] = {"train": self.store}
        try:
            self.stores["valid"] = SampleStore.load(data_dir, "valid", cache)
        except Exception as exc:  # an empty or missing split: nothing to validate on
            log.warning("no valid validation: %s", exc)
        self.plan = BatchPlan(len(self.store), t.global_batch_size, t.micro_batch_size, self.env.world_size,
                              t.epochs, t.seed, t.max_steps, order_source=self.store.order_slice)
        self.invariants = {"dataset": self.meta.get("run_key"), "n_train_samples": len(self.store),
                           "global_batch_size": t.global_batch_size, "total_steps": self.plan.total_steps,
                           "seed": t.seed}

    def read_resume(self) -> Optional[Checkpoint]:
        resume_dir = self.env.resume_checkpoint()
        if resume_dir is None:
            return None
        resume = read_checkpoint(resume_dir)
        self.env.release_resume()
        conflicts = resume_conflicts(resume.state, self.invariants)
        if conflicts:
            raise ConfigError(f"cannot resume from {resume.path}: {'; '.join(conflicts)}. These decide the data "
                              "order and the learning-rate schedule; resume with the checkpoint's dataset and "
                              "settings, or start a new run (--name).")
        return resume

    # -- start ----------------------------------------------------------------------------------
    def agree_on_start(self, start_step: int) -> Optional[str]:
        """Rank 0 counts restarts that made no progress (in the run directory); past
        ``train.max_restarts_without_progress`` every rank stops instead of training, so an
        unlimited-retry spot run does not loop forever on a failure that recurs. The same all-reduce
        gives every rank rank 0's id for this start of the run (it names the checkpoints)."""
        limit, stop, nonce = self.t.max_restarts_without_progress, 0.0, 0.0
        message = ""
        if self.is_rank0:
            nonce = float(random.SystemRandom().getrandbits(48))
            if limit:
                path = storage.join(self.env.run_uri, "restarts.json")
                previous = json.loads(storage.read_bytes(path)) if storage.exists(path) else None
                record = restarts_without_progress(previous, start_step)
                storage.write_bytes(path, json.dumps(record).encode())
                stop = float(record["without_progress"] > limit)
                if stop:
                    message = (f"{limit + 1} restarts in a row from step {start_step} made no progress "
                               f"(train.max_restarts_without_progress){last_error_note(self.env.run_uri)}")
        stop, nonce = self.all_reduce_values([stop, nonce])
        self.run_id = f"{int(nonce):012x}"
        return (message or "restarts without progress") if stop else None

    def stop(self, step: int, cause: str) -> dict[str, Any]:
        """End this run without finishing, loudly: rank 0 records the cause where the launcher finds it
        (and exits non-zero with it), every rank returns."""
        if self.is_rank0:
            log.error("stopped at step %d: %s", step, cause)
            record_stop(self.env.run_uri, cause, step)
        self.env.report({"step": step, "stopped": cause})
        return {"step": step, "stopped": cause}

    def record_error(self, step: int, exc: Exception) -> None:
        """What made this worker fail, beside the run, so that a run that gives up can name it."""
        try:
            storage.write_bytes(storage.join(self.env.run_uri, "last_error.json"), json.dumps(
                {"rank": self.env.rank, "step": step, "error": f"{type(exc).__name__}: {exc}"[:2000]}).encode())
        except Exception:  # noqa: BLE001 - the original error matters, not this note
            pass

    # -- model ----------------------------------------------------------------------------------
    def setup_model(self, resume: Optional[Checkpoint]) -> None:
        """BART, AdamW and the DeepSpeed engine; then the checkpoint's optimizer state, schedule and
        loss scale. A resumed model is built from the checkpoint's config (no hub contact)."""
        import deepspeed
        from transformers import get_linear_schedule_with_warmup

        from kilm_ray.model.bart import build_model, check_tokenizer_matches, count_parameters
        from kilm_ray.train.deepspeed_config import deepspeed_config
        from kilm_ray.train.zero import check_version

        check_version()
        t, device = self.t, self.env.device
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        if resume is None:
            check_tokenizer_matches(self.cfg.model.pretrained, self.tokenizer)
            model = build_model(self.cfg.model, len(self.tokenizer), self.sp, self.cfg.max_positions)
        else:
            model = model_from_config(resume.model_config, self.cfg)
            load_weights_into_module(model, resume.weights)
        model.to(device)
        self.n_params = count_parameters(model)
        self.dims = BartDims.of(model.config)
        optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr,
                                      betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                      fused=device.type == "cuda")
        scheduler = get_linear_schedule_with_warmup(optimizer, t.warmup_steps, self.plan.total_steps)
        ds_config = deepspeed_config(t, self.env.world_size, self.plan.grad_accum, device.type == "cuda")
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        if t.compile:
            self.engine.compile()
        if resume is not None:
            self.restore(resume)

    def restore(self, resume: Checkpoint) -> None:
        """Optimizer, schedule and loss scale from the checkpoint."""
        from kilm_ray.train.zero import restore_loss_scale, restore_optimizer

        engine = self.engine
        restore_optimizer(engine, resume.weights, resume.moments, int(resume.state["adam_step"]))
        engine.lr_scheduler.load_state_dict(resume.state["scheduler"])
        # load_state_dict restores the schedule's position, not the lr the optimizer holds until the
        # next scheduler step: set it, or the first resumed step would run at the initial lr.
        for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
        restore_loss_scale(engine, resume.state.get("loss_scale"))
        engine.skipped_steps = int(resume.state.get("skipped_steps", 0))
        if self.is_rank0:
            log.info("resumed from %s at step %d (saved by %d workers, now %d)", resume.path, resume.state["step"],
                     resume.state["world_size"], self.env.world_size)

    def data_loader(self, start_step: int):
        t, cfg = self.t, self.cfg
        params = MaskingParams.from_config(cfg.masking)
        dataset = StepDataset(self.store, self.plan, self.env.rank, start_step, params, self.sp,
                              cfg.masking.knowledge_loss_weight, group_by_length=t.group_by_length)
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=t.loader_workers,
            prefetch_factor=4 if t.loader_workers else None, persistent_workers=False,
            pin_memory=self.env.device.type == "cuda")

    def announce(self, start_step: int) -> None:
        env, t = self.env, self.t
        if self.artifacts is not None and start_step:
            # What the restart cost: the steps logged since the checkpoint, to be done again.
            redone = max(0, self.artifacts.last_step() - start_step)
            self.artifacts.event(start_step, event="resumed", world_size=env.world_size, steps_redone=redone)
            log.info("resumed at step %d with %d worker(s): %d step(s) since that checkpoint are done again",
                     start_step, env.world_size, redone)
        if self.is_rank0:
            log.info("training %s params on %d worker(s): %d steps (%d/epoch), global batch %d = %d micro-batches "
                     "of %d, %d per worker, ZeRO-%d %s", f"{self.n_params:,}", env.world_size, self.plan.total_steps,
                     self.plan.steps_per_epoch, t.global_batch_size, self.plan.units, t.micro_batch_size,
                     self.plan.grad_accum, t.zero_stage, t.precision)

    # -- step -----------------------------------------------------------------------------------
    def start_clocks(self, start_step: int) -> None:
        """What the steps carry from one to the next: loss sums, the control state, the clocks."""
        t = self.t
        self.sums = LossSums(self.env.device)
        self.control = ControlState()
        self.cadence = Cadence(self.plan.total_steps, t.log_every, t.eval_every, t.checkpoint_every,
                               t.max_grow_checkpoints)
        self.first_step = start_step
        self.window_start = self.run_start = time.time()
        self.last_checkpoint_at = self.last_grow_check = time.time()

    def signals(self) -> Signals:
        """What this rank knows right after an optimizer step: a preemption notice, rank 0's clock and
        room to grow (``agree`` adds the next step's loss weight)."""
        t, env, now = self.t, self.env, time.time()
        room = False
        if self.is_rank0 and now - self.last_grow_check >= t.elastic_resize_check_s:
            self.last_grow_check = now
            room = env.room_to_grow()
        return Signals(notice=float(env.heard_preemption()), room=float(room),
                       clock=float(self.is_rank0 and t.checkpoint_every_minutes > 0
                                   and now - self.last_checkpoint_at >= 60.0 * t.checkpoint_every_minutes))

    def agree(self, step: int, known: Signals, next_weight: float) -> StepPlan:
        """The control vector after step ``step``: what each rank knows (and its share of the next
        step's loss weight), summed over every rank in one all-reduce, read back once (the step's only
        host read); every rank derives the same plan from it."""
        mine = replace(known, weight=next_weight)
        vector = torch.tensor(mine.vector(), dtype=torch.float64).to(self.env.device, non_blocking=True)
        if self.t.precision != "fp16":  # fp16 overflows are DeepSpeed's to skip; elsewhere a nan loss is the end
            vector[-1] += (~self.sums.finite()).to(torch.float64)
        self.all_reduce(vector)
        plan, self.control = plan_step(Signals.from_vector(vector.tolist()), step, self.cadence, self.control)
        return plan

    def train_step(self, step: int, micro_batches: list[dict], global_weight: float, live: list[bool]) -> None:
        """One optimizer step over this worker's micro-batches; the loss is the token-weighted mean
        over the whole global batch. A filler micro-batch (``live`` False) runs for the collectives' sake
        and adds nothing to the metrics."""
        engine, scale = self.engine, self.env.world_size / global_weight
        for unit, mb, holds_samples in zip(self.plan.unit_ids(self.env.rank), micro_batches, live):
            _reseed(self.t.seed, step, unit)
            ce = forward_losses(engine, mb)
            engine.backward((ce * mb["label_weights"]).sum() * scale, scale_wrt_gas=False)
            engine.step()
            if holds_samples:
                self.sums.add_batch(ce.detach(), mb, self.dims)

    def after_step(self, done: int, plan: StepPlan) -> dict[str, Any]:
        """Validate, then checkpoint, in one report (Ray Train's run result and Tune read the checkpoint's
        metrics) -- except on a preemption notice, whose deadline runs: save first, with the training
        metrics, and mark the checkpoint so that a run resumed from it validates this step first (the
        node may go before the validation here ends)."""
        metrics = self.step_metrics(done, time.time() - self.window_start)
        if plan.checkpoint == "preemption":
            self.save(done, metrics, plan.checkpoint, validation_pending=plan.evaluate)
            if plan.evaluate:
                self.validate(metrics)
                self.env.report(metrics)
        else:
            if plan.evaluate:
                self.validate(metrics)
            if plan.checkpoint:
                self.save(done, metrics, plan.checkpoint)
            else:
                self.env.report(metrics)
        if self.artifacts is not None:
            self.log_line(done, metrics)
            self.artifacts.log(done, metrics)
            if plan.checkpoint:
                self.artifacts.sync()
        self.sums = LossSums(self.env.device)
        self.window_start = time.time()
        return metrics

    # -- validate -------------------------------------------------------------------------------
    def validate(self, metrics: dict[str, Any]) -> None:
        t, env = self.t, self.env
        if not self.validation.sets:
            return
        metrics.update(self.validation.run(self.engine, env.device))
        if t.eval_generate_samples and t.zero_stage < 3:
            if self.is_rank0:
                metrics.update(self.validation.describe_accuracy(self.engine, self.tokenizer, t.eval_generate_samples))
            # rank 0 shares its number so every rank reports the same
            metrics["description_accuracy"] = self.all_reduce_values([metrics.get("description_accuracy", 0.0)])[0]

    def validate_resumed(self, step: int) -> None:
        """The validation of ``step`` that a preemption checkpoint went ahead of (every rank: collective)."""
        epoch, consumed = self.plan.samples_consumed(step)
        metrics: dict[str, Any] = {"step": step, "epoch": epoch, "samples_consumed_in_epoch": consumed,
                                   "world_size": self.env.world_size, "validation_after_resume": True}
        self.validate(metrics)
        self.env.report(metrics)
        if self.artifacts is not None:
            self.artifacts.log(step, metrics)

    # -- checkpoint -----------------------------------------------------------------------------
    def save(self, step: int, metrics: dict[str, Any], reason: str, validation_pending: bool = False) -> None:
        """Copy this rank's shard to host memory (the only wait), then write it in the background."""
        engine, env, t = self.engine, self.env, self.t
        started = time.perf_counter()
        shard = snapshot_shard(engine, env.rank, env.world_size)
        ckpt_id = checkpoint_id(self.run_id, step)
        state = None
        if self.is_rank0:
            epoch, consumed = self.plan.samples_consumed(step)
            state = {
                "step": step, "epoch": epoch, "samples_consumed_in_epoch": consumed,
                "samples_consumed_total": step * t.global_batch_size, "total_steps": self.plan.total_steps,
                "global_batch_size": t.global_batch_size, "adam_step": adam_step(engine),
                "scheduler": engine.lr_scheduler.state_dict(), "loss_scale": loss_scale_state(engine),
                "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
                "rng": {"seed": t.seed, "scheme": "dropout reseeded from (seed, step, unit); masks from "
                                                  "(seed, epoch, sample_id): nothing else to restore"},
                "world_size": env.world_size, "checkpoint_shards": env.world_size, "checkpoint_id": ckpt_id,
                "zero_stage": t.zero_stage, "precision": t.precision, "data_dir": self.data_dir,
                **self.invariants, "metrics": dict(metrics), "reason": reason, "config": self.cfg.to_dict(),
                "validation_pending": validation_pending,
                "saved_at": time.time(),
            }
        model_config, tokenizer_dir, rank, world = engine.module.config.to_dict(), self.tokenizer_dir, env.rank, env.world_size

        def write(directory: Path) -> None:
            if rank == 0:
                write_rank0_files(directory, model_config, tokenizer_dir)
            write_shard(directory, shard, rank, world, ckpt_id)

        metrics["checkpoint_blocked_s"] = time.perf_counter() - started
        metrics["checkpoint_shard_mb"] = shard.nbytes / 2**20
        # A copy: validation adds to ``metrics`` while the upload thread may still serialize these.
        env.checkpoint(step, dict(metrics), write, state)
        self.last_checkpoint_at = time.time()

    # -- export ---------------------------------------------------------------------------------
    def export(self, step: int) -> None:
        """Hugging Face export from the fp32 master weights (gathered: every rank calls)."""
        import tempfile

        from kilm_ray.model.bart import export_hf
        from kilm_ray.train.zero import gather_state

        weights, _ = gather_state(self.engine, with_moments=False)
        if not self.is_rank0:
            return
        module = model_from_config(self.engine.module.config.to_dict(), self.cfg)
        load_weights_into_module(module, weights)
        out_uri = storage.join(self.env.run_uri, "export")
        meta = export_metadata(self.cfg, step, self.data_dir, checkpoint=None)
        if storage.is_remote(out_uri):
            with tempfile.TemporaryDirectory() as tmp:
                export_hf(module, self.tokenizer, tmp, meta)
                storage.upload_dir(tmp, out_uri)
        else:
            export_hf(module, self.tokenizer, out_uri, meta)
        log.info("exported the model to %s", out_uri)

    # -- collectives and metrics ----------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` (on this rank's device) over every rank, in place."""
        if self.env.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)

    def all_reduce_values(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        self.all_reduce(tensor)
        return tensor.tolist()

    def step_metrics(self, done: int, elapsed: float) -> dict[str, Any]:
        env, engine = self.env, self.engine
        vector = self.sums.vector()
        self.all_reduce(vector)
        total = LossSums.totals(vector.tolist())
        elapsed = max(elapsed, 1e-9)
        epoch, consumed = self.plan.samples_consumed(done)
        return {
            "step": done, "epoch": epoch, "samples_consumed_in_epoch": consumed,
            **{f"train_{k}": v for k, v in total.summary().items()},
            "lr": engine.lr_scheduler.get_last_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": total.tokens / elapsed, "sequences_per_s": total.sequences / elapsed,
            "nonpad_share": total.nonpad_tokens / max(total.tokens, 1.0),
            "model_tflops_per_s": total.model_flops / elapsed / 1e12,
            "mfu": mfu(total.model_flops / elapsed, env.world_size,
                       peak_tflops(self.t.peak_tflops, env.device, self.t.precision)),  # V100: fp16 only
            "world_size": env.world_size, **precision_metrics(engine),
        }

    def log_line(self, done: int, metrics: dict[str, Any]) -> None:
        total = self.plan.total_steps
        eta = (time.time() - self.run_start) / max(done - self.first_step, 1) * (total - done)
        log.info("step %d/%d ep %d | loss %.4f knowledge %.4f copy %.4f | lr %.2e | %.0f tok/s%s%s%s | ETA %s",
                 done, total, metrics["epoch"], metrics["train_loss"], metrics["train_knowledge_loss"],
                 metrics["train_copy_loss"], metrics["lr"], metrics["tokens_per_s"],
                 f" MFU {metrics['mfu']:.1%}" if metrics["mfu"] else "",
                 f" | loss scale {metrics['loss_scale']:g}, {metrics['skipped_steps']:g} skipped"
                 if "loss_scale" in metrics else "",
                 "".join(f" | {k} {metrics[k]:.4f}" for k in ("valid_loss", "valid_knowledge_loss",
                                                               "valid_text_loss", "train_text_loss",
                                                               "description_accuracy") if k in metrics),
                 format_eta(eta))


def train_worker(cfg: KilmConfig, data_dir: str, env: RunEnv) -> dict[str, Any]:
    """Train (or resume) until the configured steps are done; returns the last metrics (with
    ``stopped`` naming the cause when the run stopped without finishing)."""
    return Recipe(cfg, data_dir, env).run()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def setup_distributed(env: RunEnv) -> None:
    import deepspeed
    import torch.distributed as dist

    from kilm_ray.cluster import free_local_port

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        if env.world_size == 1:
            # One process (`--no-ray`) agrees with nobody: a fresh free port, and no rendezvous settings
            # inherited from a parent process (its port may still be bound).
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_local_port()), RANK="0",
                              WORLD_SIZE="1", LOCAL_RANK="0")
        else:  # torchrun sets these for every process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.setdefault("RANK", str(env.rank))
            os.environ.setdefault("WORLD_SIZE", str(env.world_size))
            os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)


def restarts_without_progress(previous: Optional[dict], start_step: int) -> dict:
    """The run's restart record after a start at ``start_step``: a start from the same step as the
    previous one is a restart that made no progress."""
    same = previous is not None and previous.get("start_step") == start_step
    return {"start_step": start_step, "without_progress": previous["without_progress"] + 1 if same else 0}


def last_error_note(run_uri: str) -> str:
    """``; the last error: ...`` from what a failing worker recorded, or a pointer to the logs."""
    path = storage.join(run_uri, "last_error.json")
    try:
        error = json.loads(storage.read_bytes(path)) if storage.exists(path) else None
    except (OSError, ValueError):
        error = None
    if not error:
        return "; no worker recorded an error (killed? out of memory?): see the workers' logs"
    return f"; the last error, on rank {error['rank']} at step {error['step']}: {error['error']}"


def model_from_config(model_config: dict, cfg: KilmConfig):
    """A BART of this architecture with fresh weights (to be overwritten): no pretrained download."""
    from transformers import BartConfig, BartForConditionalGeneration

    from kilm_ray.model.bart import without_host_syncs

    config = BartConfig.from_dict(model_config)
    config._attn_implementation = cfg.model.attn_implementation
    model = BartForConditionalGeneration(config)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    without_host_syncs(model)
    return model


def _reseed(seed: int, step: int, unit: int) -> None:
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + unit * 31) % (2**63 - 1))


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def export_metadata(cfg: KilmConfig, step: int, data_dir: str, checkpoint: Optional[str]) -> dict[str, Any]:
    from kilm_ray import __version__
    from kilm_ray.method.tokenizer import KILM_TOKENS

    return {"kilm_ray_version": __version__, "step": step, "checkpoint": checkpoint, "data_dir": data_dir,
            "model": cfg.to_dict()["model"], "masking": cfg.to_dict()["masking"], "special_tokens": KILM_TOKENS,
            "generation": {"max_new_tokens": cfg.serve.default_max_new_tokens, "num_beams": 1},
            "max_source_tokens": cfg.data.max_source_tokens}
