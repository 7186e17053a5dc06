"""The per-worker training recipe, run by Ray Train workers and by the launcher without Ray (one
process or torchrun), so both can be timed on the same hardware. ``Recipe`` reads top to bottom:
set up data, model and optimizer; resume; step; validate; checkpoint; export.

Contracts kept here:
- Data: global step ``s`` consumes the same samples whatever the worker count (``loader.BatchPlan``).
- Loss: the token-weighted mean over the whole global batch, so gradients do not depend on how the
  batch is split across workers and micro-batches.
- Randomness: dropout is reseeded from ``(seed, step, share, micro-batch)``; masks come from
  ``(seed, epoch, sample_id)``. A resumed run therefore replays exactly what an uninterrupted run does.
- Checkpoints: the full state in shards written by every rank (``train.checkpoint``), every
  ``checkpoint_every`` steps, every ``checkpoint_every_minutes``, when a node is about to be preempted,
  and at the end. The loop waits only for the copy to host memory; writing and uploading run in the
  background.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from kilm_ray import storage
from kilm_ray.config import ConfigError, KilmConfig
from kilm_ray.loader import BatchPlan, SampleStore, StepDataset, eval_example_list, read_meta
from kilm_ray.masking import MaskingParams, SpecialIds, collate
from kilm_ray.train.checkpoint import (
    Checkpoint, adam_step, gather_state, load_weights_into_module, loss_scale_state, restore_loss_scale,
    restore_optimizer, resume_conflicts, snapshot_shard, write_rank0_files, write_shard,
)
from kilm_ray.train.metrics import BartDims, LossSums, format_eta, mfu, peak_tflops, token_losses

log = logging.getLogger("kilm_ray.train")


class RunEnv(abc.ABC):
    """Where a worker runs: rank and device, where checkpoints go, how metrics are reported."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    @abc.abstractmethod
    def resume_checkpoint(self) -> Optional[Path]:
        """A local directory holding the checkpoint to resume from, or None."""

    def release_resume(self) -> None:
        """Every rank has read the resume checkpoint: local copies may go."""

    @abc.abstractmethod
    def report(self, metrics: dict[str, Any]) -> None:
        """Metrics of a logging step; called by every rank at the same steps."""

    @abc.abstractmethod
    def checkpoint(self, step: int, metrics: dict[str, Any], write: Callable[[Path], None],
                   state: Optional[dict]) -> None:
        """Checkpoint ``step``, called by every rank at the same steps. ``write(directory)`` writes this
        rank's files and may run in the background; rank 0 passes ``state``, the file that completes a
        checkpoint, written once every rank's files are in place."""

    def resize_pending(self) -> Optional[str]:
        """``"preemption"`` when a node of this run is about to go, ``"grow"`` when the cluster has room
        for another worker of an elastic run, else None: either way the group is about to restart, so
        checkpoint now. Every rank calls it at the same steps."""
        return None

    def close(self) -> None:
        """Wait for checkpoints still being written or uploaded."""

    @property
    @abc.abstractmethod
    def run_uri(self) -> str:
        """The run directory (local or s3://) for metrics, TensorBoard events and the export."""


def restarts_without_progress(previous: Optional[dict], start_step: int) -> dict:
    """The run's restart record after a start at ``start_step``: a start from the same step as the
    previous one is a restart that made no progress."""
    same = previous is not None and previous.get("start_step") == start_step
    return {"start_step": start_step, "without_progress": previous["without_progress"] + 1 if same else 0}


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


def _all_reduce(values: list[float], env: RunEnv, device: torch.device) -> list[float]:
    if env.world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _reseed(seed: int, step: int, rank: int, micro: int) -> None:
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + rank * 31 + micro) % (2**63 - 1))


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward_losses(engine, batch: dict) -> torch.Tensor:
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=batch["decoder_input_ids"], use_cache=False)
    return token_losses(out.logits, batch["labels"])


class Validation:
    """Fixed example sets, the same across epochs and masking settings so trials compare:

    - ``valid``: the valid split's mentions (held-out articles) in the evaluation format (one sample
      per entity, only its knowledge masked);
    - ``valid_text`` / ``train_text``: plain BART text infilling (seeded masks, no entity markup) on
      held-out text and on the first training chunks. Their pair over training gives retention at
      matched training loss (``kilm-ray compare``): held-out infilling loss where both models fit
      their training text equally well."""

    def __init__(self, data_dir: str, cfg: KilmConfig, sp: SpecialIds, env: RunEnv):
        self.sets = {}
        cache = cfg.train.node_cache_dir or None
        n = cfg.train.eval_max_samples
        text_params = MaskingParams.from_config(cfg.masking, knowledge_prob=0.0)
        stores: dict[str, Optional[SampleStore]] = {}
        for split, name in (("valid", "valid"), ("valid", "valid_text"), ("train", "train_text")):
            if split not in stores:
                try:
                    stores[split] = SampleStore.load(data_dir, split, cache)
                except Exception as exc:  # an empty or missing split: nothing to validate on
                    log.warning("no %s validation: %s", split, exc)
                    stores[split] = None
            store = stores[split]
            if store is None:
                continue
            if name == "valid":
                examples = eval_example_list(store, n, cfg.data.max_eval_entities, sp)
            else:
                examples = [store.retention_example(i, cfg.eval.seed, text_params, sp)
                            for i in range(min(len(store), n) if n else len(store))]
            if examples:
                self.sets[name] = examples
        self.cfg, self.sp, self.env = cfg, sp, env

    @torch.no_grad()
    def run(self, engine, device: torch.device) -> dict[str, float]:
        engine.eval()
        metrics: dict[str, float] = {}
        micro = self.cfg.train.micro_batch_size
        weight = self.cfg.masking.knowledge_loss_weight
        for split, examples in self.sets.items():
            shard = examples[self.env.rank:: self.env.world_size]
            # Every rank runs the same number of forwards (ZeRO-3 gathers weights in forward).
            n_batches = math.ceil(math.ceil(len(examples) / self.env.world_size) / micro)
            sums = LossSums()
            for b in range(n_batches):
                part = shard[b * micro: (b + 1) * micro]
                batch = collate(part or examples[:1], self.sp, weight, weights_scale=None if part else [0.0])
                if not part:
                    batch["knowledge_mask"][:] = False
                    batch["labels"][:] = -100
                batch = _to_device({k: torch.from_numpy(v) for k, v in batch.items()}, device)
                sums.add_batch(_forward_losses(engine, batch), batch)
            total = LossSums.from_vector(_all_reduce(sums.vector(), self.env, device)).summary(prefix=f"{split}_")
            metrics.update(total if split == "valid" else {f"{split}_loss": total[f"{split}_loss"]})
        engine.train()
        return metrics


def _describe_accuracy(engine, validation: Validation, tokenizer, sp: SpecialIds, n: int) -> dict[str, float]:
    """Title exact match of greedy descriptions on the first ``n`` valid samples (rank 0)."""
    from kilm_ray.eval.metrics import exact_match
    from kilm_ray.generation import greedy_describe
    from kilm_ray.probes import gold_knowledge, parse_knowledge, prompt_from_example

    examples = validation.sets.get("valid", [])[:n]
    if not examples:
        return {}
    model = engine.module
    model.eval()
    prompts = [prompt_from_example(e.input_ids, e.labels, sp) for e in examples]
    outputs = greedy_describe(model, prompts, sp, max_new_tokens=validation.cfg.data.max_knowledge_tokens + 1,
                              batch_size=16)
    hits = [exact_match(parse_knowledge(tokenizer, sp, o.tokens)[0], gold_knowledge(tokenizer, sp, e.labels)[0])
            for o, e in zip(outputs, examples)]
    model.train()
    return {"description_accuracy": sum(hits) / len(hits)}


def precision_metrics(engine) -> dict[str, float]:
    """Steps skipped on fp16 overflow (the optimizer did not step) and the current loss scale."""
    out = {"skipped_steps": float(getattr(engine, "skipped_steps", 0))}
    # DeepSpeed's ZeRO optimizers keep a scaler object in fp32 and bf16 runs too (scale 1, never used).
    scale = loss_scale_state(engine) if getattr(engine, "fp16_enabled", lambda: False)() else None
    if scale is not None:
        out["loss_scale"] = float(scale["cur_scale"])
    return out


class Recipe:
    """One worker's training run. Each concern has one method; ``run`` is the order they happen in."""

    def __init__(self, cfg: KilmConfig, data_dir: str, env: RunEnv):
        self.cfg, self.t, self.data_dir, self.env = cfg, cfg.train, data_dir, env
        self.is_rank0 = env.rank == 0
        self.writer_blocked_s = 0.0

    # -- set up ---------------------------------------------------------------------------------
    def setup_data(self) -> None:
        from transformers import AutoTokenizer

        from kilm_ray.model import check_tokenizer_matches
        from kilm_ray.pipeline.commit import verify_tokenizer

        t, data_dir = self.t, self.data_dir
        self.meta = read_meta(data_dir)
        self.sp = SpecialIds(**self.meta["special_ids"])
        self.tokenizer_dir = storage.local_copy(verify_tokenizer(data_dir))  # refuses a changed tokenizer.json
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        check_tokenizer_matches(self.cfg.model.pretrained, self.tokenizer)
        self.store = SampleStore.load(data_dir, "train", t.node_cache_dir or None)
        if len(self.store) == 0:
            raise ConfigError(f"{data_dir}: the train split is empty")
        self.plan = BatchPlan(len(self.store), t.global_batch_size, t.micro_batch_size, self.env.world_size,
                              t.epochs, t.seed, t.max_steps, virtual_ranks=t.worker_bounds[1],
                              order_source=self.store.epoch_order)
        self.invariants = {"dataset": self.meta.get("run_key"), "n_train_samples": len(self.store),
                           "global_batch_size": t.global_batch_size, "total_steps": self.plan.total_steps,
                           "seed": t.seed}

    def read_resume(self) -> Optional[Checkpoint]:
        resume_dir = self.env.resume_checkpoint()
        if resume_dir is None:
            return None
        from kilm_ray.train.checkpoint import read_checkpoint

        resume = read_checkpoint(resume_dir)
        self.env.release_resume()
        conflicts = resume_conflicts(resume.state, self.invariants)
        if conflicts:
            raise ConfigError(f"cannot resume from {resume.path}: {'; '.join(conflicts)}. These decide the data "
                              "order and the learning-rate schedule; resume with the checkpoint's dataset and "
                              "settings, or start a new run (--name).")
        return resume

    def setup_model(self, resume: Optional[Checkpoint]) -> None:
        import deepspeed
        from transformers import get_linear_schedule_with_warmup

        from kilm_ray.model import build_model, count_parameters
        from kilm_ray.train.deepspeed_config import deepspeed_config

        t, device = self.t, self.env.device
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = build_model(self.cfg.model, len(self.tokenizer), self.sp, self.cfg.max_positions)
        if resume is not None:
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

    def restore(self, resume: Optional[Checkpoint]) -> None:
        """Optimizer, schedule and loss scale from the checkpoint."""
        if resume is None:
            return
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

    # -- step -----------------------------------------------------------------------------------
    def train_step(self, step: int, micro_batches: list[dict], sums: LossSums) -> None:
        """One optimizer step over this worker's micro-batches; the loss is the token-weighted mean
        over the whole global batch (``global_weight`` comes from the all-reduce in ``run``)."""
        engine, env = self.engine, self.env
        for (share, i), mb in zip(self.plan.micro_batch_ids(env.rank), micro_batches):
            _reseed(self.t.seed, step, share, i)
            ce = _forward_losses(engine, mb)
            loss = (ce * mb["label_weights"]).sum() * (env.world_size / self.global_weight)
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            sums.add_batch(ce.detach(), mb, self.dims)

    # -- validate -------------------------------------------------------------------------------
    def validate(self, metrics: dict[str, Any]) -> None:
        t, env, device = self.t, self.env, self.env.device
        if not self.validation.sets:
            return
        metrics.update(self.validation.run(self.engine, device))
        if t.eval_generate_samples and t.zero_stage < 3:
            if self.is_rank0:
                metrics.update(_describe_accuracy(self.engine, self.validation, self.tokenizer, self.sp,
                                                  t.eval_generate_samples))
            if env.world_size > 1:  # rank 0 shares its number so every rank reports the same
                metrics["description_accuracy"] = _all_reduce([metrics.get("description_accuracy", 0.0)],
                                                              env, device)[0]

    # -- checkpoint -----------------------------------------------------------------------------
    def save(self, step: int, metrics: dict[str, Any], reason: str) -> None:
        """Copy this rank's shard to host memory (the only wait), then write it in the background."""
        engine, env, t = self.engine, self.env, self.t
        started = time.perf_counter()
        shard = snapshot_shard(engine, env.rank, env.world_size)
        state = None
        if self.is_rank0:
            epoch, consumed = self.plan.samples_consumed(step)
            state = {
                "step": step, "epoch": epoch, "samples_consumed_in_epoch": consumed,
                "samples_consumed_total": step * t.global_batch_size, "total_steps": self.plan.total_steps,
                "global_batch_size": t.global_batch_size, "adam_step": adam_step(engine),
                "scheduler": engine.lr_scheduler.state_dict(), "loss_scale": loss_scale_state(engine),
                "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
                "rng": {"seed": t.seed, "scheme": "dropout reseeded from (seed, step, rank, micro); masks from "
                                                  "(seed, epoch, sample_id): nothing else to restore"},
                "world_size": env.world_size, "checkpoint_shards": env.world_size, "zero_stage": t.zero_stage,
                "precision": t.precision, "data_dir": self.data_dir, **self.invariants, "metrics": metrics,
                "reason": reason, "config": self.cfg.to_dict(), "saved_at": time.time(),
            }
        model_config, tokenizer_dir, rank, world = engine.module.config.to_dict(), self.tokenizer_dir, env.rank, env.world_size

        def write(directory: Path) -> None:
            if rank == 0:
                write_rank0_files(directory, model_config, tokenizer_dir)
            write_shard(directory, shard, rank, world)

        metrics["checkpoint_blocked_s"] = time.perf_counter() - started
        metrics["checkpoint_shard_mb"] = shard.nbytes / 2**20
        env.checkpoint(step, metrics, write, state)
        self.last_checkpoint_at = time.time()

    # -- export ---------------------------------------------------------------------------------
    def export(self, step: int) -> None:
        """Hugging Face export from the fp32 master weights (gathered: every rank calls)."""
        import tempfile

        from kilm_ray.model import build_model, export_hf

        weights, _ = gather_state(self.engine, with_moments=False)
        if not self.is_rank0:
            return
        module = build_model(self.cfg.model, len(self.tokenizer), self.sp, self.cfg.max_positions)
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

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t, env = self.t, self.env
        setup_distributed(env)
        device = env.device
        self.setup_data()
        resume = self.read_resume()
        start_step = int(resume.state["step"]) if resume is not None else 0
        stalled = self.gave_up(start_step)
        if stalled:  # before the model is built: nothing else to set up or tear down
            env.close()
            return {"step": start_step, "gave_up": stalled}
        self.setup_model(resume)
        self.restore(resume)
        del resume
        loader = self.data_loader(start_step)
        self.validation = Validation(self.data_dir, self.cfg, self.sp, env)
        artifacts = Artifacts(env.run_uri) if self.is_rank0 else None
        if artifacts is not None and start_step:
            # What the restart cost: the steps logged since the checkpoint, to be done again.
            redone = max(0, artifacts.last_step() - start_step)
            artifacts.event(start_step, event="resumed", world_size=env.world_size, steps_redone=redone)
            log.info("resumed at step %d with %d worker(s): %d step(s) since that checkpoint are done again",
                     start_step, env.world_size, redone)
        peak = peak_tflops(t.peak_tflops, device)
        total = self.plan.total_steps
        if self.is_rank0:
            log.info("training %s params on %d worker(s): %d steps (%d/epoch), global batch %d = %d x %d micro x %d "
                     "accumulation, ZeRO-%d %s", f"{self.n_params:,}", env.world_size, total,
                     self.plan.steps_per_epoch, t.global_batch_size, env.world_size, t.micro_batch_size,
                     self.plan.grad_accum, t.zero_stage, t.precision)

        sums = LossSums()
        window_start = run_start = time.time()
        self.last_checkpoint_at, every_s = time.time(), 60.0 * t.checkpoint_every_minutes
        last_poll, notice_saved = time.time(), None
        last: dict[str, Any] = {}
        self.engine.train()
        step = start_step
        try:
            for item in loader:
                step = item["step"]
                micro_batches = [_to_device(mb, device) for mb in item["micro_batches"]]
                local_weight = float(sum(mb["label_weights"].sum() for mb in micro_batches))
                # Rank 0's clock decides a time-based checkpoint; it rides on this step's all-reduce, so
                # every rank agrees (saving is collective) at no extra communication.
                now = time.time()
                time_due = self.is_rank0 and every_s > 0 and now - self.last_checkpoint_at >= every_s
                poll_due = self.is_rank0 and now - last_poll >= t.preemption_poll_seconds
                last_poll = now if poll_due else last_poll
                regrow_due = self.is_rank0 and now - self.last_checkpoint_at >= t.elastic_resize_check_s
                self.global_weight, time_due_any, poll_due_any, regrow_due_any = _all_reduce(
                    [local_weight, float(time_due), float(poll_due), float(regrow_due)], env, device)
                self.global_weight = self.global_weight or 1.0
                self.train_step(step, micro_batches, sums)
                done = step + 1

                # The group is about to restart (a node goes, or it can grow): checkpoint now, so the
                # restart costs (almost) nothing. Once per preemption notice; while a grow is pending
                # (Ray takes a while to act on it), again every elastic_resize_check_s.
                resize = None
                if poll_due_any > 0:
                    notice = env.resize_pending()
                    again = notice == "grow" and regrow_due_any > 0
                    resize, notice_saved = (notice if notice != notice_saved or again else None), notice
                log_due = done % t.log_every == 0 or done == total
                eval_due = done == total or (t.eval_every and done % t.eval_every == 0)
                ckpt_due = done % t.checkpoint_every == 0 or done == total or time_due_any > 0 or bool(resize)
                if not (log_due or eval_due or ckpt_due):
                    continue
                metrics = self.step_metrics(done, sums, time.time() - window_start, peak)
                if eval_due:
                    self.validate(metrics)
                if ckpt_due:
                    reason = resize or ("end" if done == total else "time" if time_due_any > 0 else "steps")
                    self.save(done, metrics, reason)
                else:
                    env.report(metrics)
                if self.is_rank0:
                    self.log_line(done, total, metrics, run_start, start_step)
                    artifacts.log(done, metrics)
                    if ckpt_due:
                        artifacts.sync()
                last = metrics
                sums = LossSums()
                window_start = time.time()
            if t.export_at_end and step + 1 >= total:
                self.export(total)
        finally:
            env.close()
            if artifacts is not None:
                artifacts.close()
        return last

    def gave_up(self, start_step: int) -> Optional[str]:
        """Count restarts that made no progress (rank 0, in the run directory); past
        ``train.max_restarts_without_progress`` every rank reports and returns instead of training, so
        an unlimited-retry spot run does not loop forever on a failure that recurs."""
        limit = self.t.max_restarts_without_progress
        stop = 0.0
        if self.is_rank0 and limit:
            path = storage.join(self.env.run_uri, "restarts.json")
            previous = json.loads(storage.read_bytes(path)) if storage.exists(path) else None
            record = restarts_without_progress(previous, start_step)
            storage.write_bytes(path, json.dumps(record).encode())
            stop = float(record["without_progress"] > limit)
        if not _all_reduce([stop], self.env, self.env.device)[0]:
            return None
        message = (f"stopped: {limit + 1} restarts in a row from step {start_step} made no progress "
                   "(train.max_restarts_without_progress); see the workers' errors above")
        if self.is_rank0:
            log.error(message)
        self.env.report({"step": start_step, "gave_up": message})
        return message

    def step_metrics(self, done: int, sums: LossSums, elapsed: float, peak: float) -> dict[str, Any]:
        env, engine = self.env, self.engine
        total_sums = LossSums.from_vector(_all_reduce(sums.vector(), env, env.device))
        elapsed = max(elapsed, 1e-9)
        tokens_per_s = total_sums.tokens / elapsed
        epoch, consumed = self.plan.samples_consumed(done)
        return {
            "step": done, "epoch": epoch, "samples_consumed_in_epoch": consumed,
            **{f"train_{k}": v for k, v in total_sums.summary().items()},
            "lr": engine.lr_scheduler.get_last_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": tokens_per_s, "sequences_per_s": total_sums.sequences / elapsed,
            "nonpad_share": total_sums.nonpad_tokens / max(total_sums.tokens, 1.0),
            "model_tflops_per_s": total_sums.model_flops / elapsed / 1e12,
            "mfu": mfu(total_sums.model_flops / elapsed, env.world_size, peak), "world_size": env.world_size,
            **precision_metrics(engine),
        }

    def log_line(self, done: int, total: int, metrics: dict[str, Any], run_start: float, start_step: int) -> None:
        eta = (time.time() - run_start) / max(done - start_step, 1) * (total - done)
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
    """Train (or resume) until the configured steps are done; returns the last metrics."""
    return Recipe(cfg, data_dir, env).run()


def export_metadata(cfg: KilmConfig, step: int, data_dir: str, checkpoint: Optional[str]) -> dict[str, Any]:
    from kilm_ray import __version__
    from kilm_ray.tokenizer import KILM_TOKENS

    return {"kilm_ray_version": __version__, "step": step, "checkpoint": checkpoint, "data_dir": data_dir,
            "model": cfg.to_dict()["model"], "masking": cfg.to_dict()["masking"], "special_tokens": KILM_TOKENS,
            "generation": {"max_new_tokens": cfg.serve.default_max_new_tokens, "num_beams": 1},
            "max_source_tokens": cfg.data.max_source_tokens}
