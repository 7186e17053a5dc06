"""The training sections of the tree: the model (preset or pretrained) and the run (train)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from kilm_ray.config.fields import ConfigError, check_min, check_range, doc


MODEL_PRESETS: dict[str, dict[str, int]] = {
    # d_model, layers (each side), heads, ffn. base/large match facebook/bart-base / -large.
    "tiny": {"d_model": 64, "layers": 2, "heads": 4, "ffn": 256},
    "mini": {"d_model": 128, "layers": 3, "heads": 4, "ffn": 512},
    "small": {"d_model": 256, "layers": 4, "heads": 4, "ffn": 1024},
    "base": {"d_model": 768, "layers": 6, "heads": 12, "ffn": 3072},
    "large": {"d_model": 1024, "layers": 12, "heads": 16, "ffn": 4096},
}


@dataclass
class ModelConfig:
    pretrained: Optional[str] = doc(
        "A local directory or hub id (e.g. facebook/bart-base) to start from; null = random init "
        "from the preset below.",
        default=None, path="local_or_hub",
    )
    preset: Literal["tiny", "mini", "small", "base", "large"] = doc(
        "Architecture when training from scratch.", default="tiny"
    )
    dropout: float = doc("Dropout of the transformer (from scratch, or overriding the pretrained).", default=0.1)
    attn_implementation: Literal["sdpa", "eager"] = doc("Attention kernel.", default="sdpa")
    gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", default=False)

    def validate(self, path: str) -> None:
        check_range(f"{path}.dropout", self.dropout, 0.0, 0.9)


@dataclass
class TrainConfig:
    seed: int = doc("Seed of the data order, masking and dropout.", default=0)
    epochs: int = doc("Passes over the training split (each re-samples entities and masks).", default=10)
    max_steps: int = doc(
        "Optimizer steps to train (0 = train.epochs passes over the training split). When set it wins over "
        "train.epochs, as max_steps does in Hugging Face's Trainer: the run goes on into further epochs (each "
        "re-samples entities and masks) or stops inside one; the start of the run says which.", default=0)
    global_batch_size: int = doc(
        "Sequences per optimizer step, whatever the worker count (gradient accumulation fills it).",
        default=1024,
    )
    micro_batch_size: int = doc("Sequences per forward/backward on one worker.", default=8)
    lr: float = doc("Peak learning rate (AdamW).", default=5e-5)
    weight_decay: float = doc("AdamW weight decay.", default=0.01)
    adam_beta1: float = doc("AdamW beta1.", default=0.9)
    adam_beta2: float = doc("AdamW beta2.", default=0.999)
    adam_eps: float = doc("AdamW epsilon.", default=1e-8)
    warmup_steps: int = doc("Linear warmup steps, then linear decay to 0.", default=0)
    grad_clip: float = doc("Gradient clipping by global norm (0 = off).", default=1.0)
    precision: Literal["fp32", "fp16", "bf16"] = doc(
        "Training precision: fp16 on V100, bf16 on Ampere/Hopper, fp32 on CPU.", default="fp32"
    )
    zero_stage: int = doc("DeepSpeed ZeRO stage 0-3.", default=0)
    fp16_grad_accum: Literal["fp16", "fp32"] = doc(
        "fp16 runs: the dtype the micro-steps' gradients are summed in (DeepSpeed data_types.grad_accum_dtype; "
        "ZeRO-1/2 only). fp32 costs 4 bytes a parameter per GPU (bart-large +1.6 GB) and cut the accumulated "
        "gradient's error 23x in bench/fp16_gradients.py (BENCHMARKS.md); the V100 configs use it.",
        default="fp16")
    reduce_bucket_size: int = doc(
        "ZeRO 1-2: gradient elements per reduce bucket. Smaller than the model, so reduction overlaps the "
        "backward pass (one bucket the size of the model waits for all of it).", default=50_000_000)
    allgather_bucket_size: int = doc("ZeRO 1-2: parameter elements per all-gather bucket after the step.",
                                      default=50_000_000)
    num_workers: Union[int, list[int]] = doc(
        "Ray Train workers: N, or [min, max] for an elastic run.", default=1
    )
    use_gpu: bool = doc("One GPU per worker.", default=False)
    cpus_per_worker: float = doc("CPUs reserved per worker (fractional is fine).", default=1.0)
    worker_resources: dict[str, float] = doc(
        "Extra Ray resources per training worker, e.g. {trainer: 1} to pin workers to GPU training nodes.",
        default_factory=dict,
    )
    loader_workers: int = doc("torch DataLoader processes per worker that mask and collate.", default=0)
    elastic_resize_check_s: float = doc(
        "Elastic runs: how often Ray Train checks whether the worker group can grow (ScalingConfig."
        "elastic_resize_monitor_interval_s), and how often rank 0 looks for room for another worker. The "
        "workers checkpoint as soon as they see room, so a grow costs the steps between that checkpoint "
        "and the resize.", default=30.0)
    max_grow_checkpoints: int = doc(
        "Elastic runs: checkpoints taken (one per elastic_resize_check_s) while the cluster has room for "
        "another worker but Ray Train has not grown the group; past this many the workers stop "
        "checkpointing for it (the free resources may never fit a worker, e.g. reserved elsewhere).",
        default=5)
    group_by_length: bool = doc(
        "Sort each worker's share of a step by length before cutting micro-batches (less padding; the "
        "token-weighted loss over the global batch is unchanged).", default=True)
    node_cache_dir: str = doc(
        "Local directory for the node's memory-mapped copy of the dataset ('' = $KILM_RAY_CACHE or "
        "<tmp>/kilm_ray_cache); shared by the ranks of a node, built once per dataset.", default="", path="local")
    log_every: int = doc("Steps between metric lines / reports.", default=10)
    eval_every: int = doc("Steps between validation passes (0 = only at the end).", default=100)
    eval_max_samples: int = doc("Validation samples per split per pass (0 = all).", default=512)
    eval_generate_samples: int = doc(
        "valid samples (held-out articles) whose description is generated at each validation (title accuracy).",
        default=0,
    )
    checkpoint_every: int = doc("Steps between checkpoints (a final one is always written).", default=100)
    checkpoint_every_minutes: float = doc(
        "Also checkpoint when this many minutes passed since the last one (0 = off): bounds the work a lost "
        "spot node costs in time, whatever the step time.", default=0.0)
    keep_checkpoints: int = doc("Checkpoints kept (the newest).", default=3)
    max_failures: int = doc(
        "Worker-group restarts after failures tolerated (Ray FailureConfig; -1 = no limit, for spot "
        "capacity; preemptions with notice are not counted).", default=3)
    preemption_grace_s: float = doc(
        "After a preemption notice's deadline, how long Ray Train lets the surviving workers run (Ray "
        "FailureConfig.preemption_grace_s) so their checkpoint upload and its registration can finish "
        "once the reclaimed node is gone; costs at most this much delay before the restart. The reclaimed "
        "node's own shard must still be uploaded before the deadline (BENCHMARKS.md, preemption budget).",
        default=30.0)
    capacity_wait_s: float = doc(
        "With max_failures -1 (spot capacity): the longest a worker group waits to be placed, in one "
        "continuous wait, before the run fails naming the resources it waited for. Waiting is not a "
        "failure: placement is retried every worker_start_attempt_s until then (worker_start_timeout_s "
        "applies only with max_failures >= 0).", default=6 * 3600.0)
    capacity_log_every_s: float = doc(
        "With max_failures -1: a log line every this many seconds while the worker group waits for "
        "resources.", default=300.0)
    max_restarts_without_progress: int = doc(
        "Stop a run whose worker group restarted this many times in a row from the same checkpoint (a "
        "failure that recurs before the next checkpoint), even with max_failures -1 (0 = never).", default=5)
    worker_start_timeout_s: float = doc(
        "Longest wait for the worker group to be placed (in all attempts) before the run fails with a "
        "message naming the resources asked for and free. Give an autoscaling cluster time to add nodes. "
        "With max_failures -1 capacity_wait_s applies instead.",
        default=900.0,
    )
    worker_start_attempt_s: float = doc(
        "One placement attempt of the worker group. After a node is lost, Ray's elastic policy may first "
        "ask for the old size from a stale view of the cluster; a shorter attempt falls back to the "
        "workers that fit sooner (more attempts within worker_start_timeout_s).", default=60.0)
    export_at_end: bool = doc("Write a Hugging Face export of the final model into the run.", default=True)
    peak_tflops: float = doc(
        "Peak dense TFLOP/s of one device for MFU (0 = look up the GPU, or omit MFU on CPU).", default=0.0
    )
    compile: bool = doc("torch.compile the model (GPU).", default=False)

    def validate(self, path: str) -> None:
        check_min(f"{path}.epochs", self.epochs, 1)
        check_min(f"{path}.max_steps", self.max_steps, 0)
        check_min(f"{path}.global_batch_size", self.global_batch_size, 1)
        check_min(f"{path}.micro_batch_size", self.micro_batch_size, 1)
        check_range(f"{path}.lr", self.lr, 0.0, 1.0, low_open=True)
        check_range(f"{path}.weight_decay", self.weight_decay, 0.0, 1.0)
        check_min(f"{path}.warmup_steps", self.warmup_steps, 0)
        check_min(f"{path}.grad_clip", self.grad_clip, 0.0)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.zero_stage: {self.zero_stage!r} is not one of 0, 1, 2, 3")
        if self.precision == "fp16" and self.zero_stage == 0:
            raise ConfigError(f"{path}.precision: fp16 needs {path}.zero_stage >= 1 (its fp32 master weights "
                              "live in ZeRO's partitions, which checkpoints read)")
        if self.precision == "fp16" and self.fp16_grad_accum == "fp32" and self.zero_stage not in (1, 2):
            raise ConfigError(f"{path}.fp16_grad_accum: fp32 needs {path}.zero_stage 1 or 2 (DeepSpeed "
                              "accumulates fp16 gradients in fp32 only in ZeRO-1/2's optimizer)")
        lo, hi = self.worker_bounds
        if lo < 1 or hi < lo:
            raise ConfigError(f"{path}.num_workers: {self.num_workers!r} must be N >= 1 or [min, max] with 1 <= min <= max")
        if self.global_batch_size < hi:
            raise ConfigError(
                f"{path}.global_batch_size: {self.global_batch_size} is smaller than the {hi} workers"
            )
        check_range(f"{path}.cpus_per_worker", self.cpus_per_worker, 0.0, 1024.0, low_open=True)
        check_range(f"{path}.worker_start_timeout_s", self.worker_start_timeout_s, 0.0, 7 * 86400.0, low_open=True)
        check_range(f"{path}.worker_start_attempt_s", self.worker_start_attempt_s, 0.0, 3600.0, low_open=True)
        check_range(f"{path}.preemption_grace_s", self.preemption_grace_s, 0.0, 3600.0)
        check_range(f"{path}.checkpoint_every_minutes", self.checkpoint_every_minutes, 0.0, 7 * 1440.0)
        check_range(f"{path}.capacity_wait_s", self.capacity_wait_s, 0.0, 30 * 86400.0, low_open=True)
        check_range(f"{path}.capacity_log_every_s", self.capacity_log_every_s, 0.0, 86400.0, low_open=True)
        check_min(f"{path}.max_grow_checkpoints", self.max_grow_checkpoints, 0)
        for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
            check_min(f"{path}.{name}", getattr(self, name), 1)
        for name in ("eval_every", "eval_max_samples", "eval_generate_samples", "loader_workers"):
            check_min(f"{path}.{name}", getattr(self, name), 0)
        check_min(f"{path}.max_failures", self.max_failures, -1)
        check_min(f"{path}.max_restarts_without_progress", self.max_restarts_without_progress, 0)

    @property
    def worker_bounds(self) -> tuple[int, int]:
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        if len(self.num_workers) != 2:
            raise ConfigError(f"train.num_workers: {self.num_workers!r} must be N or [min, max]")
        return int(self.num_workers[0]), int(self.num_workers[1])
