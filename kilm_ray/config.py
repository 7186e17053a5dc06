"""One typed configuration tree for every kilm_ray command.

A config is built from dataclass defaults, then a YAML file, then dotted ``key=value`` overrides
(``train.lr=1e-4``). Every step validates: an unknown key, a value of the wrong type or out of range
raises :class:`ConfigError` naming the dotted key (and the file), with a suggestion for typos.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from kilm_ray.errors import UserInputError


class ConfigError(UserInputError, ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


def _doc(text: str, path: Optional[str] = None, **kwargs: Any) -> Any:
    """A dataclass field whose help text feeds the generated config reference. ``path`` marks a value
    that names a file or directory (see :func:`resolve_local_paths`): ``"local"`` always a path,
    ``"local_or_hub"`` a path when it exists locally, else a hub id."""
    metadata = {"help": text, **({"path": path} if path else {})}
    if "default_factory" in kwargs:
        return field(default_factory=kwargs.pop("default_factory"), metadata=metadata)
    return field(default=kwargs.pop("default"), metadata=metadata)


# ----------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------


@dataclass
class CorpusConfig:
    mode: Literal["lead", "article"] = _doc(
        "Text kept per article: the lead section (KILM) or the whole article minus reference sections.",
        default="lead",
    )
    knowledge_sources: list[str] = _doc(
        "Knowledge sources tried in order for each link target: template ({{Short description}}), "
        "first_sentence (of the target's article in the dump), external (the --knowledge files).",
        default_factory=lambda: ["template", "first_sentence", "external"],
    )
    max_pages: int = _doc("Stop after this many pages per read task (a dump file, or a byte range of a "
                          "multistream dump; 0 = all). For quick runs.", default=0)
    read_unit_mb: float = _doc(
        "Compressed MiB per read task of a multistream dump (read through its -index.txt.bz2): the unit "
        "of parallel decompression.", default=64)
    redirect_rounds: int = _doc(
        "Rounds of redirect-chain compression (one join each): chains of up to 2^N redirects are followed "
        "(Wikipedia bots fix double redirects, so 2 is plenty).", default=2)
    link_resolution: Literal["auto", "lookup", "distributed"] = _doc(
        "How links meet their targets' redirects and knowledge. 'distributed': Ray Data group-bys "
        "(redirect chains, knowledge by entity, links back to pages); no process holds a table that grows "
        "with the corpus. 'lookup': the driver builds one table of redirects and descriptions that every "
        "chunking process holds: faster on small inputs (no shuffles), but 4-5 KB per page per process. "
        "'auto': lookup when the dumps and knowledge bases together are at most "
        "corpus.lookup_max_input_mb (compressed), else distributed. Both give identical samples.",
        default="auto")
    lookup_max_input_mb: float = _doc(
        "With link_resolution auto: the largest input (dump + knowledge-base files, compressed MB) resolved "
        "by lookup; 64 MB of enwiki bz2 is about 60 k pages, ~300 MB of tables per process.", default=64)
    shuffle_partitions: int = _doc(
        "Partitions of the group-bys that resolve links (0 = sized from the data: one per "
        "corpus.shuffle_partition_mb of stage input, at least the cluster's CPUs).", default=0)
    shuffle_partition_mb: float = _doc(
        "With shuffle_partitions 0: MB of stage input (parquet) per partition. A reduce task holds one "
        "partition, so this bounds its memory whatever the corpus size.", default=32)
    pages_per_block: int = _doc(
        "Pages per Ray Data block out of the dump reader: the unit of parallel parsing. Blocks under "
        "100 kB stay in the driver's memory while they wait for the writer (Ray keeps small task results "
        "with their owner): 64 lead-section pages made the driver grow ~1.4 KB per page.", default=256)
    valid_fraction: float = _doc(
        "Fraction of articles held out of training for validation during training (and Tune).", default=0.05
    )
    test_fraction: float = _doc(
        "Fraction of articles held out of training for the final evaluation (kilm-ray eval).", default=0.05
    )
    split_seed: int = _doc("Seed of the article-level split (a keyed hash of the title).", default=0)
    max_description_chars: int = _doc(
        "Descriptions longer than this are cut at a word boundary (first sentences can be long).",
        default=400,
    )
    task_resources: dict[str, float] = _doc(
        "Extra Ray resources every preprocessing task asks for, e.g. {preprocess: 0.01} to keep them on "
        "the CPU nodes of cluster.yaml.",
        default_factory=dict,
    )
    kb_read_unit_mb: float = _doc(
        "Compressed MiB per read task of a knowledge-base file (plain text, or .bz2 cut at its compressed "
        "blocks, e.g. Wikidata's dump); a .gz file is read whole by one task.", default=64)
    shared_paths: list[str] = _doc(
        "Local directories mounted at the same path on every node (NFS, EFS, FSx). On a cluster of more "
        "than one node (or one that autoscales) preprocess refuses a local --out, --dump or --knowledge "
        "outside them: each node would use its own disk. s3:// needs no declaring.", default_factory=list)
    cluster_cpus: int = _doc(
        "CPUs the shuffles are planned for (partitions >= CPUs): 0 = the autoscaler's configured maximum "
        "when the cluster has one (spot CPU nodes start at zero), else the CPUs present.", default=0)

    def validate(self, path: str) -> None:
        allowed = {"template", "first_sentence", "external"}
        bad = [s for s in self.knowledge_sources if s not in allowed]
        if bad or not self.knowledge_sources:
            raise ConfigError(
                f"{path}.knowledge_sources: {bad or '[]'} not allowed; choose from {sorted(allowed)}"
            )
        _check_range(f"{path}.valid_fraction", self.valid_fraction, 0.0, 0.9)
        _check_range(f"{path}.test_fraction", self.test_fraction, 0.0, 0.9)
        if self.valid_fraction + self.test_fraction > 0.9:
            raise ConfigError(f"{path}.valid_fraction + {path}.test_fraction: must leave 10% of articles to train on")
        _check_min(f"{path}.max_pages", self.max_pages, 0)
        _check_min(f"{path}.pages_per_block", self.pages_per_block, 1)
        _check_range(f"{path}.read_unit_mb", self.read_unit_mb, 0.0, 1e6, low_open=True)
        _check_range(f"{path}.redirect_rounds", self.redirect_rounds, 0, 6)
        _check_min(f"{path}.shuffle_partitions", self.shuffle_partitions, 0)
        _check_range(f"{path}.shuffle_partition_mb", self.shuffle_partition_mb, 0.0, 1e6, low_open=True)
        _check_min(f"{path}.lookup_max_input_mb", self.lookup_max_input_mb, 0)
        _check_min(f"{path}.max_description_chars", self.max_description_chars, 16)
        _check_range(f"{path}.kb_read_unit_mb", self.kb_read_unit_mb, 0.0, 1e6, low_open=True)
        _check_min(f"{path}.cluster_cpus", self.cluster_cpus, 0)
        for i, shared in enumerate(self.shared_paths):
            if "://" in shared or not shared.startswith(("/", "~")):
                raise ConfigError(f"{path}.shared_paths[{i}]: {shared!r} must be an absolute local directory "
                                  "(object stores such as s3:// are shared already)")


@dataclass
class TokenizerConfig:
    source: str = _doc(
        "Where the tokenizer comes from: 'train' (a byte-level BPE trained on the corpus), "
        "'gpt2-bpe:DIR' (encoder.json + vocab.bpe), or a local directory / hub id such as "
        "facebook/bart-base. The five KILM tokens are always added.",
        default="train", path="local_or_hub",
    )
    vocab_size: int = _doc("Vocabulary size when source=train.", default=8000)
    add_prefix_space: Optional[bool] = _doc(
        "Tokenize a word at the start of a paragraph as after a space. null = as the official KILM code: "
        "true for a pretrained BART tokenizer (a hub id, a directory, gpt2-bpe:DIR), so that a mention "
        "opening a paragraph has the tokens of its ' Title' knowledge; false for one trained here.",
        default=None)
    train_max_paragraphs: int = _doc("Paragraphs sampled to train the BPE (source=train).", default=200_000)

    def validate(self, path: str) -> None:
        _check_min(f"{path}.vocab_size", self.vocab_size, 300)
        _check_min(f"{path}.train_max_paragraphs", self.train_max_paragraphs, 1)


@dataclass
class DataConfig:
    max_source_tokens: int = _doc(
        "Longest encoder input (special tokens included); text is chunked to fit it with a knowledge slot.",
        default=512,
    )
    max_knowledge_tokens: int = _doc(
        "Longest 'Title<sep>description' knowledge string; target length = source + this.", default=128
    )
    min_chunk_tokens: int = _doc("Chunks shorter than this are dropped.", default=8)
    max_eval_entities: int = _doc("Evaluation: samples per chunk, one per entity (the first N).", default=10)
    title_as_mentioned: bool = _doc(
        "Spell a mention's knowledge title with a lower-case first letter when the mention has one "
        "([[vowel]] -> 'vowel<sep>...'; Wikipedia titles ignore the first letter's case, exact match too). "
        "For small models from scratch: copying a title is then copying tokens. False = page titles.",
        default=False)
    train_min_mentions: int = _doc(
        "Training chunks with fewer linked entities (with knowledge) are not written: 1 trains on the "
        "chunks that carry knowledge only (3.4x fewer chunks on the excerpt's whole articles), so a fixed "
        "budget sees each entity more often. 0 keeps all text.", default=0)

    def validate(self, path: str) -> None:
        _check_min(f"{path}.max_source_tokens", self.max_source_tokens, 32)
        _check_min(f"{path}.max_knowledge_tokens", self.max_knowledge_tokens, 4)
        _check_min(f"{path}.min_chunk_tokens", self.min_chunk_tokens, 1)
        _check_min(f"{path}.max_eval_entities", self.max_eval_entities, 1)
        _check_min(f"{path}.train_min_mentions", self.train_min_mentions, 0)

    @property
    def max_text_tokens(self) -> int:
        # <s> </s> around the text, <ent> </ent> around the mention, <ent_desc> <mask> </ent_desc>.
        return self.max_source_tokens - 7


@dataclass
class MaskingConfig:
    mask_ratio: float = _doc(
        "BART text infilling: fraction of non-special source tokens masked (budget = ceil(ratio * n)).",
        default=0.3,
    )
    poisson_lambda: float = _doc("Mean of the Poisson distribution of masked span lengths.", default=3.0)
    knowledge_prob: float = _doc(
        "Probability that a training chunk with linked entities gets a knowledge slot (one entity, its "
        "knowledge masked). 1.0 = KILM; 0.0 = plain BART text infilling (the baseline).",
        default=1.0,
    )
    knowledge_loss_weight: float = _doc(
        "Weight of knowledge tokens (inside <ent_desc>...</ent_desc>) in the token-averaged loss.",
        default=1.0,
    )
    entities_per_chunk: int = _doc(
        "Linked entities (with knowledge) marked in a chunk that gets knowledge, at most; chosen uniformly "
        "without replacement per (seed, epoch, sample). 1 = the paper; more puts every link of a short "
        "chunk to work each epoch (the model's positions grow by max_knowledge_tokens + 4 per extra one).",
        default=1,
    )
    knowledge_slot: bool = _doc(
        "True = KILM: each marked entity gets <ent_desc>knowledge</ent_desc>, masked in the source. False = "
        "the fair baseline: the same entities are marked <ent>mention</ent>, with no knowledge slot, so "
        "only the knowledge objective differs.",
        default=True,
    )
    knowledge_as_text: bool = _doc(
        "With knowledge_slot false: each marked entity's knowledge follows its mention as a plain-text "
        "appositive ('mention, Title: description,'; no markup), and BART text infilling runs on that text. "
        "The data-matched baseline: KILM's knowledge, BART's objective; probed by infilling 'mention, <mask>,'.",
        default=False,
    )

    def validate(self, path: str) -> None:
        if self.knowledge_as_text and self.knowledge_slot:
            raise ConfigError(f"{path}.knowledge_as_text: needs {path}.knowledge_slot=false (knowledge goes either "
                              "into the slot or into the text)")
        _check_range(f"{path}.mask_ratio", self.mask_ratio, 0.0, 0.95)
        _check_range(f"{path}.poisson_lambda", self.poisson_lambda, 0.0, 64.0, low_open=True)
        _check_range(f"{path}.knowledge_prob", self.knowledge_prob, 0.0, 1.0)
        _check_range(f"{path}.knowledge_loss_weight", self.knowledge_loss_weight, 0.0, 100.0)
        _check_range(f"{path}.entities_per_chunk", self.entities_per_chunk, 1, 64)


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
    pretrained: Optional[str] = _doc(
        "A local directory or hub id (e.g. facebook/bart-base) to start from; null = random init "
        "from the preset below.",
        default=None, path="local_or_hub",
    )
    preset: Literal["tiny", "mini", "small", "base", "large"] = _doc(
        "Architecture when training from scratch.", default="tiny"
    )
    dropout: float = _doc("Dropout of the transformer (from scratch, or overriding the pretrained).", default=0.1)
    attn_implementation: Literal["sdpa", "eager"] = _doc("Attention kernel.", default="sdpa")
    gradient_checkpointing: bool = _doc("Recompute activations in backward to save memory.", default=False)

    def validate(self, path: str) -> None:
        _check_range(f"{path}.dropout", self.dropout, 0.0, 0.9)


@dataclass
class TrainConfig:
    seed: int = _doc("Seed of the data order, masking and dropout.", default=0)
    epochs: int = _doc("Passes over the training split (each re-samples entities and masks).", default=10)
    max_steps: int = _doc(
        "Optimizer steps to train (0 = train.epochs passes over the training split). When set it wins over "
        "train.epochs, as max_steps does in Hugging Face's Trainer: the run goes on into further epochs (each "
        "re-samples entities and masks) or stops inside one; the start of the run says which.", default=0)
    global_batch_size: int = _doc(
        "Sequences per optimizer step, whatever the worker count (gradient accumulation fills it).",
        default=1024,
    )
    micro_batch_size: int = _doc("Sequences per forward/backward on one worker.", default=8)
    lr: float = _doc("Peak learning rate (AdamW).", default=5e-5)
    weight_decay: float = _doc("AdamW weight decay.", default=0.01)
    adam_beta1: float = _doc("AdamW beta1.", default=0.9)
    adam_beta2: float = _doc("AdamW beta2.", default=0.999)
    adam_eps: float = _doc("AdamW epsilon.", default=1e-8)
    warmup_steps: int = _doc("Linear warmup steps, then linear decay to 0.", default=0)
    grad_clip: float = _doc("Gradient clipping by global norm (0 = off).", default=1.0)
    precision: Literal["fp32", "fp16", "bf16"] = _doc(
        "Training precision: fp16 on V100, bf16 on Ampere/Hopper, fp32 on CPU.", default="fp32"
    )
    zero_stage: int = _doc("DeepSpeed ZeRO stage 0-3.", default=0)
    reduce_bucket_size: int = _doc(
        "ZeRO 1-2: gradient elements per reduce bucket. Smaller than the model, so reduction overlaps the "
        "backward pass (one bucket the size of the model waits for all of it).", default=50_000_000)
    allgather_bucket_size: int = _doc("ZeRO 1-2: parameter elements per all-gather bucket after the step.",
                                      default=50_000_000)
    num_workers: Union[int, list[int]] = _doc(
        "Ray Train workers: N, or [min, max] for an elastic run.", default=1
    )
    use_gpu: bool = _doc("One GPU per worker.", default=False)
    cpus_per_worker: float = _doc("CPUs reserved per worker (fractional is fine).", default=1.0)
    worker_resources: dict[str, float] = _doc(
        "Extra Ray resources per training worker, e.g. {trainer: 1} to pin workers to GPU training nodes.",
        default_factory=dict,
    )
    loader_workers: int = _doc("torch DataLoader processes per worker that mask and collate.", default=0)
    elastic_resize_check_s: float = _doc(
        "Elastic runs: how often Ray Train checks whether the worker group can grow (ScalingConfig."
        "elastic_resize_monitor_interval_s), and how often rank 0 looks for room for another worker. The "
        "workers checkpoint as soon as they see room, so a grow costs the steps between that checkpoint "
        "and the resize.", default=30.0)
    max_grow_checkpoints: int = _doc(
        "Elastic runs: checkpoints taken (one per elastic_resize_check_s) while the cluster has room for "
        "another worker but Ray Train has not grown the group; past this many the workers stop "
        "checkpointing for it (the free resources may never fit a worker, e.g. reserved elsewhere).",
        default=5)
    group_by_length: bool = _doc(
        "Sort each worker's share of a step by length before cutting micro-batches (less padding; the "
        "token-weighted loss over the global batch is unchanged).", default=True)
    node_cache_dir: str = _doc(
        "Local directory for the node's memory-mapped copy of the dataset ('' = $KILM_RAY_CACHE or "
        "<tmp>/kilm_ray_cache); shared by the ranks of a node, built once per dataset.", default="", path="local")
    log_every: int = _doc("Steps between metric lines / reports.", default=10)
    eval_every: int = _doc("Steps between validation passes (0 = only at the end).", default=100)
    eval_max_samples: int = _doc("Validation samples per split per pass (0 = all).", default=512)
    eval_generate_samples: int = _doc(
        "valid samples (held-out articles) whose description is generated at each validation (title accuracy).",
        default=0,
    )
    checkpoint_every: int = _doc("Steps between checkpoints (a final one is always written).", default=100)
    checkpoint_every_minutes: float = _doc(
        "Also checkpoint when this many minutes passed since the last one (0 = off): bounds the work a lost "
        "spot node costs in time, whatever the step time.", default=0.0)
    keep_checkpoints: int = _doc("Checkpoints kept (the newest).", default=3)
    max_failures: int = _doc(
        "Worker-group restarts after failures tolerated (Ray FailureConfig; -1 = no limit, for spot "
        "capacity; preemptions with notice are not counted).", default=3)
    capacity_wait_s: float = _doc(
        "With max_failures -1 (spot capacity): the longest a worker group waits to be placed, in one "
        "continuous wait, before the run fails naming the resources it waited for. Waiting is not a "
        "failure: placement is retried every worker_start_attempt_s until then (worker_start_timeout_s "
        "applies only with max_failures >= 0).", default=6 * 3600.0)
    capacity_log_every_s: float = _doc(
        "With max_failures -1: a log line every this many seconds while the worker group waits for "
        "resources.", default=300.0)
    max_restarts_without_progress: int = _doc(
        "Stop a run whose worker group restarted this many times in a row from the same checkpoint (a "
        "failure that recurs before the next checkpoint), even with max_failures -1 (0 = never).", default=5)
    worker_start_timeout_s: float = _doc(
        "Longest wait for the worker group to be placed (in all attempts) before the run fails with a "
        "message naming the resources asked for and free. Give an autoscaling cluster time to add nodes. "
        "With max_failures -1 capacity_wait_s applies instead.",
        default=900.0,
    )
    worker_start_attempt_s: float = _doc(
        "One placement attempt of the worker group. After a node is lost, Ray's elastic policy may first "
        "ask for the old size from a stale view of the cluster; a shorter attempt falls back to the "
        "workers that fit sooner (more attempts within worker_start_timeout_s).", default=60.0)
    export_at_end: bool = _doc("Write a Hugging Face export of the final model into the run.", default=True)
    peak_tflops: float = _doc(
        "Peak dense TFLOP/s of one device for MFU (0 = look up the GPU, or omit MFU on CPU).", default=0.0
    )
    compile: bool = _doc("torch.compile the model (GPU).", default=False)

    def validate(self, path: str) -> None:
        _check_min(f"{path}.epochs", self.epochs, 1)
        _check_min(f"{path}.max_steps", self.max_steps, 0)
        _check_min(f"{path}.global_batch_size", self.global_batch_size, 1)
        _check_min(f"{path}.micro_batch_size", self.micro_batch_size, 1)
        _check_range(f"{path}.lr", self.lr, 0.0, 1.0, low_open=True)
        _check_range(f"{path}.weight_decay", self.weight_decay, 0.0, 1.0)
        _check_min(f"{path}.warmup_steps", self.warmup_steps, 0)
        _check_min(f"{path}.grad_clip", self.grad_clip, 0.0)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.zero_stage: {self.zero_stage!r} is not one of 0, 1, 2, 3")
        if self.precision == "fp16" and self.zero_stage == 0:
            raise ConfigError(f"{path}.precision: fp16 needs {path}.zero_stage >= 1 (its fp32 master weights "
                              "live in ZeRO's partitions, which checkpoints read)")
        lo, hi = self.worker_bounds
        if lo < 1 or hi < lo:
            raise ConfigError(f"{path}.num_workers: {self.num_workers!r} must be N >= 1 or [min, max] with 1 <= min <= max")
        if self.global_batch_size < hi:
            raise ConfigError(
                f"{path}.global_batch_size: {self.global_batch_size} is smaller than the {hi} workers"
            )
        _check_range(f"{path}.cpus_per_worker", self.cpus_per_worker, 0.0, 1024.0, low_open=True)
        _check_range(f"{path}.worker_start_timeout_s", self.worker_start_timeout_s, 0.0, 7 * 86400.0, low_open=True)
        _check_range(f"{path}.worker_start_attempt_s", self.worker_start_attempt_s, 0.0, 3600.0, low_open=True)
        _check_range(f"{path}.checkpoint_every_minutes", self.checkpoint_every_minutes, 0.0, 7 * 1440.0)
        _check_range(f"{path}.capacity_wait_s", self.capacity_wait_s, 0.0, 30 * 86400.0, low_open=True)
        _check_range(f"{path}.capacity_log_every_s", self.capacity_log_every_s, 0.0, 86400.0, low_open=True)
        _check_min(f"{path}.max_grow_checkpoints", self.max_grow_checkpoints, 0)
        for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
            _check_min(f"{path}.{name}", getattr(self, name), 1)
        for name in ("eval_every", "eval_max_samples", "eval_generate_samples", "loader_workers"):
            _check_min(f"{path}.{name}", getattr(self, name), 0)
        _check_min(f"{path}.max_failures", self.max_failures, -1)
        _check_min(f"{path}.max_restarts_without_progress", self.max_restarts_without_progress, 0)

    @property
    def worker_bounds(self) -> tuple[int, int]:
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        if len(self.num_workers) != 2:
            raise ConfigError(f"train.num_workers: {self.num_workers!r} must be N or [min, max]")
        return int(self.num_workers[0]), int(self.num_workers[1])


@dataclass
class SearchParam:
    kind: Literal["loguniform", "uniform", "choice", "randint", "grid"] = _doc(
        "Distribution; 'grid' tries every value (times tune.num_samples).", default="uniform")
    low: float = _doc("Lower bound (loguniform/uniform/randint).", default=0.0)
    high: float = _doc("Upper bound (loguniform/uniform/randint, exclusive for randint).", default=1.0)
    values: list[Any] = _doc("Candidates (choice).", default_factory=list)

    def validate(self, path: str) -> None:
        if self.kind in ("choice", "grid"):
            if not self.values:
                raise ConfigError(f"{path}.values: a {self.kind} needs at least one value")
        elif not self.low < self.high:
            raise ConfigError(f"{path}: low={self.low} must be < high={self.high}")
        if self.kind == "loguniform" and self.low <= 0:
            raise ConfigError(f"{path}.low: loguniform needs low > 0, got {self.low}")


def _default_search_space() -> dict[str, SearchParam]:
    return {
        "train.lr": SearchParam(kind="loguniform", low=1e-5, high=1e-3),
        "masking.mask_ratio": SearchParam(kind="uniform", low=0.15, high=0.45),
        "masking.poisson_lambda": SearchParam(kind="choice", values=[2.0, 3.0, 4.0]),
        "masking.knowledge_loss_weight": SearchParam(kind="choice", values=[1.0, 2.0, 4.0]),
    }


@dataclass
class TuneConfig:
    num_samples: int = _doc("Trials to run.", default=8)
    max_concurrent_trials: int = _doc(
        "Trials at once (0 = as many trials' worker groups as the cluster's free resources hold at the start).",
        default=0)
    search_alg: Literal["random", "optuna"] = _doc(
        "'random': random/grid sampling of search_space; 'optuna': Bayesian optimisation (TPE) through "
        "Ray Tune's Optuna integration (no grid kinds). ASHA stops weak trials in both.", default="random")
    metric: Literal["valid_loss", "valid_knowledge_loss", "valid_text_loss", "description_accuracy"] = _doc(
        "Objective: loss on the valid split's mentions (all tokens, or the knowledge slots), text-infilling "
        "loss on valid text, or title accuracy of generated descriptions on valid mentions (needs "
        "train.eval_generate_samples > 0). valid is held out of training; test is kept for kilm-ray eval.",
        default="valid_loss",
    )
    grace_period: int = _doc("ASHA: validations a trial gets before it can be stopped.", default=1)
    reduction_factor: float = _doc("ASHA: keep the top 1/reduction_factor at each rung.", default=2.0)
    search_space: dict[str, SearchParam] = _doc(
        "Dotted config key -> distribution. Any numeric or choice key of the tree can be searched.",
        default_factory=_default_search_space,
    )
    trial_cpus: float = _doc("CPUs reserved by each trial's driver function (not its workers).", default=0.01)

    def validate(self, path: str) -> None:
        _check_min(f"{path}.num_samples", self.num_samples, 1)
        _check_min(f"{path}.max_concurrent_trials", self.max_concurrent_trials, 0)
        _check_min(f"{path}.grace_period", self.grace_period, 1)
        _check_range(f"{path}.reduction_factor", self.reduction_factor, 1.0, 100.0, low_open=True)
        for key, param in self.search_space.items():
            if key.startswith("tune.") or not _is_leaf_key(key):
                raise ConfigError(f"{path}.search_space: {key!r} is not a searchable config key")
            param.validate(f"{path}.search_space.{key}")
            if self.search_alg == "optuna" and param.kind == "grid":
                raise ConfigError(f"{path}.search_space.{key}: kind 'grid' needs {path}.search_alg=random "
                                  "(Optuna samples; use kind 'choice')")


@dataclass
class ServeConfig:
    host: str = _doc("HTTP bind address.", default="127.0.0.1")
    port: int = _doc("HTTP port.", default=8000)
    num_replicas: int = _doc("Model replicas (ignored when autoscaling).", default=1)
    autoscaling: bool = _doc("Scale replicas between min_replicas and max_replicas on load.", default=False)
    min_replicas: int = _doc("Autoscaling lower bound.", default=1)
    max_replicas: int = _doc("Autoscaling upper bound.", default=4)
    target_ongoing_requests: float = _doc("Autoscaling target of requests per replica.", default=32.0)
    num_cpus: float = _doc("CPUs per model replica.", default=1.0)
    num_gpus: float = _doc("GPUs per model replica.", default=0.0)
    max_batch_size: int = _doc("Dynamic batching: most requests per model call.", default=32)
    batch_wait_timeout_s: float = _doc("Dynamic batching: wait this long to fill a batch.", default=0.01)
    max_ongoing_requests: int = _doc("Requests a replica accepts at once (>= 2x batch to fill batches).", default=128)
    max_queued_requests: int = _doc("Requests queued before the service answers 503 (back-pressure).", default=256)
    max_input_tokens: int = _doc("Longest accepted encoder input, in tokens (longer: 413).", default=512)
    max_candidates: int = _doc("Most candidates in one /v1/disambiguate request.", default=32)
    default_max_new_tokens: int = _doc("Generation length when a request does not say.", default=48)
    max_new_tokens_limit: int = _doc("Largest max_new_tokens a request may ask for.", default=128)
    max_beams: int = _doc("Largest num_beams a request may ask for.", default=4)
    no_repeat_ngram_size: int = _doc(
        "Greedy describe, appositive and QA answers never repeat an n-gram of their own (the prompt is not "
        "counted; /v1/fill, which rebuilds the whole text, completions and beam answers are not affected). 0 = off.",
        default=0)
    max_request_bytes: int = _doc("Largest request body, counted as it streams in (larger: 413).", default=65536)
    max_candidate_tokens: int = _doc(
        "Longest scored candidate ('Title<sep>description'), in tokens; longer descriptions are cut.", default=64)
    score_token_budget: int = _doc("Padded decoder tokens per scoring forward pass (bounds memory).", default=4096)
    ingress_replicas: int = _doc("HTTP ingress replicas (tokenize and validate; CPU only).", default=1)
    ingress_cpus: float = _doc("CPUs per ingress replica.", default=0.1)
    log_encoding: Literal["JSON", "TEXT"] = _doc(
        "Replica log format (JSON: one object per line with request_id, endpoint, status_code, latency_ms).",
        default="JSON")
    log_to_stderr: bool = _doc(
        "Replica log lines also on stderr (forwarded to the driver / `ray job logs`); the files under the Ray "
        "session's logs/serve/ always have them.", default=False)
    access_log: bool = _doc("Also Serve's own access line per HTTP request (ours, with endpoint, status, latency "
                            "and request id, is always written).", default=False)
    auth_token: Optional[str] = _doc(
        "Bearer token required on /v1/* when set (null = open). Prefer the env KILM_SERVE_TOKEN.", default=None
    )
    app_name: str = _doc("Serve application name.", default="kilm")
    device: Literal["auto", "cpu", "cuda"] = _doc("Device of a replica.", default="auto")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = _doc("Weights dtype of a replica (auto: bf16 on GPU).", default="auto")
    drain_timeout_s: float = _doc(
        "Graceful stop (SIGTERM, Ctrl-C, a replica removed): new requests get 503 and those in flight get this "
        "long to finish.", default=20.0)

    def validate(self, path: str) -> None:
        _check_range(f"{path}.port", self.port, 1, 65535)
        for name in ("num_replicas", "min_replicas", "max_batch_size", "max_ongoing_requests", "max_input_tokens",
                     "max_candidates", "default_max_new_tokens", "max_new_tokens_limit", "max_beams",
                     "max_request_bytes", "ingress_replicas", "score_token_budget"):
            _check_min(f"{path}.{name}", getattr(self, name), 1)
        _check_min(f"{path}.max_queued_requests", self.max_queued_requests, -1)
        _check_min(f"{path}.no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        _check_min(f"{path}.max_candidate_tokens", self.max_candidate_tokens, 3)
        _check_min(f"{path}.drain_timeout_s", self.drain_timeout_s, 0)
        if self.max_replicas < self.min_replicas:
            raise ConfigError(f"{path}.max_replicas: {self.max_replicas} < min_replicas {self.min_replicas}")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ConfigError(f"{path}.default_max_new_tokens: above max_new_tokens_limit {self.max_new_tokens_limit}")


@dataclass
class EvalConfig:
    split: Literal["test", "valid"] = _doc(
        "The held-out split evaluated (articles never trained on). valid is what training validated on.",
        default="test")
    max_samples: int = _doc(
        "Held-out mentions every mention probe runs on: a seeded random sample across the split's articles "
        "(the smallest keyed hashes of sample id and entity; eval.seed). 0 = all.", default=500)
    train_recall_samples: int = _doc(
        "Training mentions whose knowledge is generated too (a seeded sample): recall of training samples, "
        "reported as such (not held out). 0 = skip.", default=256)
    max_sense_items: int = _doc(
        "WordNet usage examples in the word-sense probe (a seeded sample; 0 = all).", default=400)
    batch_size: int = _doc("Sequences per generation / scoring batch.", default=16)
    num_beams: int = _doc("Beams for description generation.", default=1)
    max_new_tokens: int = _doc("Longest generated knowledge string.", default=48)
    title_candidates: Literal["generated", "generated_or_mention"] = _doc(
        "Describe's title (slot-trained models): generated = the decoded title; generated_or_mention = the likelier, "
        "under the model (summed log-probability of title and <sep>), of the decoded title and the mention as "
        "written, the description then decoded after it. A small model's commonest title error is a misspelled "
        "copy of the mention; its own score picks the spelling. Reports also give the decoded titles' figure. "
        "Greedy decoding only.",
        default="generated")
    no_repeat_ngram_size: int = _doc(
        "Greedy decoding of slot-trained models: no n-gram repeated within one answer (the prompt is not counted; "
        "a text-form answer copies the right context, so it is left alone). 0 = off.", default=0)
    max_disambiguation_mentions: int = _doc(
        "Sampled mentions with an ambiguous anchor text scored in anchor disambiguation (0 = all).", default=500)
    max_candidates: int = _doc("Candidates per mention in disambiguation.", default=8)
    retention_max_chunks: int = _doc(
        "Held-out chunks (a seeded sample) for the text-infilling (retention) loss; as many training chunks "
        "give the training-text loss. 0 = every held-out chunk.", default=200)
    qa_file: Optional[str] = _doc(
        "Questions for zero-shot QA, .gz or not: Google's NQ-open JSONL ({question, answer: [...]} lines), DPR's "
        "TSV (question<TAB>['answer', ...], read as CSV), question<TAB>answer[<TAB>answer...], or a JSON list of "
        "{question, answer(s)} objects / [question, answers] pairs. Unreadable rows and questions holding a "
        "control token are skipped and counted.",
        default=None, path="local")
    seed: int = _doc("Seed of the samples (mentions, chunks, word senses) and of the retention test's masks.",
                     default=1234)
    actors: int = _doc("Probe actors (each holds the model) in the evaluation's Ray Data stages.", default=1)
    cpus_per_actor: float = _doc("CPUs per probe actor (also its torch threads, rounded).", default=1.0)
    gpus_per_actor: float = _doc("GPUs per probe actor: > 0 runs the probes on GPU workers (cuda).", default=0.0)

    def validate(self, path: str) -> None:
        for name in ("batch_size", "num_beams", "max_new_tokens", "max_candidates", "actors"):
            _check_min(f"{path}.{name}", getattr(self, name), 1)
        _check_min(f"{path}.no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if self.num_beams > 1 and (self.no_repeat_ngram_size or self.title_candidates != "generated"):
            key = "no_repeat_ngram_size" if self.no_repeat_ngram_size else "title_candidates"
            raise ConfigError(f"{path}.{key} applies to greedy decoding; {path}.num_beams is {self.num_beams}")
        _check_range(f"{path}.cpus_per_actor", self.cpus_per_actor, 0.0, 1024.0, low_open=True)
        _check_range(f"{path}.gpus_per_actor", self.gpus_per_actor, 0.0, 64.0)
        for name in ("max_samples", "max_disambiguation_mentions", "retention_max_chunks", "train_recall_samples",
                     "max_sense_items"):
            _check_min(f"{path}.{name}", getattr(self, name), 0)


@dataclass
class DemoConfig:
    split: Literal["test", "valid"] = _doc(
        "The held-out split of the demo's knowledge line and examples.", default="test")
    min_train_mentions: int = _doc(
        "The demo's rule, fixed before training: mentions in held-out articles of entities whose knowledge is in "
        "at least this many training mentions (all of them, in the seeded order of eval.seed).", default=2)
    examples: int = _doc("Describe probes the demo sends over HTTP (the first mentions of the same rule).",
                         default=5)

    def validate(self, path: str) -> None:
        _check_min(f"{path}.min_train_mentions", self.min_train_mentions, 1)
        _check_min(f"{path}.examples", self.examples, 0)


@dataclass
class KilmConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def validate(self) -> "KilmConfig":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if self.data.max_knowledge_tokens >= self.data.max_source_tokens * 4:
            raise ConfigError("data.max_knowledge_tokens: unreasonably long next to data.max_source_tokens")
        return self

    @property
    def max_positions(self) -> int:
        """Longest sequence the model sees: a target with ``masking.entities_per_chunk`` filled slots
        (each ``<ent></ent><ent_desc></ent_desc>`` + knowledge) around the chunk text."""
        k = self.masking.entities_per_chunk
        longest = self.data.max_text_tokens + 2 + k * (self.data.max_knowledge_tokens + 4)
        return -(-longest // 8) * 8  # batches are padded to a multiple of 8

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> "KilmConfig":
        """A copy with dotted-key overrides applied (values already typed, e.g. from Tune)."""
        new = copy.deepcopy(self)
        for key, value in overrides.items():
            _set_dotted(new, key, value, source="override")
        return new.validate()


# ----------------------------------------------------------------------------------------------
# Loading, overrides, coercion
# ----------------------------------------------------------------------------------------------


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> KilmConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, validated. ``path=None`` gives defaults."""
    cfg = KilmConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        cfg = _build(KilmConfig, data, "", str(path))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(cfg, key, value, source="command line")
    return cfg.validate()


def resolve_local_paths(cfg: KilmConfig, base: str | Path) -> KilmConfig:
    """``cfg`` with every relative local path made absolute against ``base`` (where the user typed the
    command). Ray workers run in directories of their own, so a relative path must be settled on the
    driver before the config is shipped to them. URIs (``s3://``), ``train`` and hub ids that name
    nothing on the local disk stay as they are; ``gpt2-bpe:DIR`` resolves its ``DIR``."""
    new = copy.deepcopy(cfg)
    for section in dataclasses.fields(new):
        node = getattr(new, section.name)
        for f in dataclasses.fields(node):
            kind, value = f.metadata.get("path"), getattr(node, f.name)
            if kind and isinstance(value, str) and value:
                setattr(node, f.name, _absolute_path(value, Path(base), must_exist=kind == "local_or_hub"))
    return new


def _absolute_path(value: str, base: Path, must_exist: bool) -> str:
    prefix, _, rest = value.partition(":")
    if rest and "/" not in prefix and not rest.startswith("//"):  # a scheme of ours: gpt2-bpe:DIR
        return f"{prefix}:{_absolute_path(rest, base, must_exist=False)}"
    if "://" in value or value == "train":
        return value
    candidate = base / Path(value).expanduser()
    if must_exist and not candidate.exists():
        return value  # a hub id such as facebook/bart-base
    return str(candidate.resolve())


def config_from_dict(data: dict[str, Any], source: str = "dict") -> KilmConfig:
    return _build(KilmConfig, data, "", source).validate()


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(cfg: KilmConfig, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, dict):  # e.g. tune.search_space.<dotted key>
            rest = ".".join(parts[depth:])
            hint = _type_of_dict_values(cfg, ".".join(parts[:depth]))
            node[rest] = _coerce(value, hint, key, source)
            return
        names = {f.name: f for f in dataclasses.fields(node)}
        if part not in names:
            raise ConfigError(_unknown_key_message(here, part, names, source))
        hints = typing.get_type_hints(type(node))
        if depth == len(parts) - 1:
            setattr(node, part, _coerce(value, hints[part], here, source))
            return
        node = getattr(node, part)
    raise ConfigError(f"{key}: is a section, not a value ({source})")


def _type_of_dict_values(cfg: KilmConfig, section_key: str) -> Any:
    parent_key, _, attr = section_key.rpartition(".")
    parent = cfg
    for part in parent_key.split(".") if parent_key else []:
        parent = getattr(parent, part)
    hint = typing.get_type_hints(type(parent))[attr]
    return typing.get_args(hint)[1]


def _unknown_key_message(here: str, part: str, names: dict, source: str) -> str:
    close = difflib.get_close_matches(part, list(names), n=1)
    prefix = here.rsplit(".", 1)[0] + "." if "." in here else ""
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(sorted(names))})"
    return f"unknown config key '{here}'{hint} [{source}]"


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} [{source}]")
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    obj = cls()
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(_unknown_key_message(here, str(key), names, source))
        setattr(obj, key, _coerce(value, hints[key], here, source))
    return obj


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``hint``; convert where unambiguous (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    where = f"{key}: {value!r}"
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return _build(hint, value, key, source)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where} does not fit {_type_name(hint)} [{source}]")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} is not one of {list(args)} [{source}]")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} should be a list [{source}]")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} should be a mapping [{source}]")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} should be true or false [{source}]")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} should be an integer [{source}]")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where} should be a number [{source}]")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} should be a string [{source}]")
    raise ConfigError(f"{key}: unsupported type {_type_name(hint)} [{source}]")


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_min(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}: {value!r} must be >= {low}")


def _check_range(key: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{key}: {value!r} must be in {bracket}{low}, {high}]")


def _is_leaf_key(key: str) -> bool:
    parts = key.split(".")
    node: Any = KilmConfig()
    for part in parts:
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return not dataclasses.is_dataclass(node)


# ----------------------------------------------------------------------------------------------
# Reference documentation, generated so it cannot drift from the code
# ----------------------------------------------------------------------------------------------


def config_reference_markdown() -> str:
    """A Markdown table per section: key, type, default, meaning."""
    lines: list[str] = []
    root = KilmConfig()
    for section in dataclasses.fields(root):
        obj = getattr(root, section.name)
        lines.append(f"#### `{section.name}`\n")
        lines.append("| key | type | default | meaning |")
        lines.append("| --- | --- | --- | --- |")
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            if isinstance(default, dict) and default and all(dataclasses.is_dataclass(v) for v in default.values()):
                shown = ", ".join(f"{k}: {v.kind}" for k, v in default.items())
            else:
                shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            type_name = _type_name(hints[f.name]).replace("|", "\\|")
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | {type_name} | `{shown}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)
