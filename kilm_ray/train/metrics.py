"""Training metrics: token-weighted loss split by knowledge / copied tokens, throughput and MFU.
Pure arithmetic on tensors and numbers; the loop decides when to reduce across workers.

The sums stay on the device: adding a micro-batch launches a few small kernels and reads nothing
back, because a host read (``float(t)``, ``t.item()``, boolean indexing) waits for every kernel queued
before it, stalling the GPU between micro-batches. They are read once per log step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Spec peak: dense (no sparsity) tensor-core TFLOP/s per device and 16-bit dtype, from NVIDIA's data
# sheets; MFU is measured against it. Matched against torch.cuda.get_device_name in order, the more
# specific names first ("NVIDIA H100 80GB HBM3" is the SXM part; PCIe and NVL parts run slower clocks).
# V100 has no bf16 tensor cores. (DESIGN.md §4 used 790 for the H100 SXM, which reads MFU 1.25x high.)
SPEC_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0}),
    ("A10G", {"bf16": 125.0, "fp16": 125.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0}),
    ("L40", {"bf16": 181.0, "fp16": 181.0}),
    ("L4", {"bf16": 121.0, "fp16": 121.0}),
    ("V100S", {"fp16": 130.0}),
    ("V100-PCIE", {"fp16": 112.0}),
    ("V100", {"fp16": 125.0}),
)


def spec_peak_tflops(device_name: str, dtype: str = "bf16") -> float:
    """The spec peak of ``device_name`` (``torch.cuda.get_device_name``) for ``dtype`` ("bf16" or "fp16";
    "fp32" training is measured against the 16-bit tensor-core peak too); 0 when unknown or unsupported."""
    dtype = "bf16" if dtype == "fp32" else dtype
    for fragment, peaks in SPEC_PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return peaks.get(dtype, 0.0)
    return 0.0


def peak_tflops(configured: float, device: torch.device, precision: str = "bf16") -> float:
    if configured > 0:
        return configured
    if device.type != "cuda":
        return 0.0
    return spec_peak_tflops(torch.cuda.get_device_name(device), precision)


# What LossSums accumulates on the device, in order.
SUM_FIELDS = ("weighted", "weight", "knowledge", "knowledge_tokens", "copy", "copy_tokens", "nonpad_tokens",
              "sequences", "model_flops")


class LossSums:
    """Sums over micro-batches that reduce across workers by addition, kept on ``device``.

    ``weighted`` / ``weight``: sum of w * ce and of w (the loss); ``knowledge`` / ``copy``: ce on the
    knowledge tokens and on the other label tokens, with their token counts; ``tokens``: all input and
    label positions, padding included (what the GPU computes; known on the host from the shapes);
    ``nonpad_tokens``, ``sequences``; ``model_flops``: training FLOPs of the non-pad tokens
    (:func:`bart_train_flops`, 0 without dims)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.acc = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=self.device)
        self.tokens = 0.0

    def add_batch(self, ce: torch.Tensor, batch: dict, dims: "BartDims | None" = None) -> None:
        weights, know = batch["label_weights"], batch["knowledge_mask"]
        valid = batch["labels"] != -100
        copy = valid & ~know
        ce = ce.float()
        lengths = batch["attention_mask"].sum(dim=1), valid.sum(dim=1)
        parts = [(ce * weights).sum(), weights.sum(), (ce * know).sum(), know.sum(), (ce * copy).sum(), copy.sum(),
                 lengths[0].sum() + lengths[1].sum(), (weights.sum(dim=1) > 0).sum(),
                 bart_flops_tensor(dims, *lengths) if dims is not None else ce.new_zeros(())]
        self.acc += torch.stack([part.to(torch.float64) for part in parts])
        self.tokens += float(batch["input_ids"].numel() + batch["labels"].numel())

    def finite(self) -> torch.Tensor:
        """Whether the loss summed so far is finite (a device bool: reading it is the caller's sync)."""
        return torch.isfinite(self.acc[0])

    def vector(self) -> torch.Tensor:
        """The sums as one device vector (what the workers all-reduce)."""
        return torch.cat([self.acc, self.acc.new_tensor([self.tokens])])

    @staticmethod
    def totals(vector: list[float]) -> "LossTotals":
        return LossTotals(**dict(zip((*SUM_FIELDS, "tokens"), vector)))


@dataclass(frozen=True)
class LossTotals:
    """LossSums read back to the host (after the reduction across workers)."""

    weighted: float = 0.0
    weight: float = 0.0
    knowledge: float = 0.0
    knowledge_tokens: float = 0.0
    copy: float = 0.0
    copy_tokens: float = 0.0
    nonpad_tokens: float = 0.0
    sequences: float = 0.0
    model_flops: float = 0.0
    tokens: float = 0.0

    def summary(self, prefix: str = "") -> dict[str, float]:
        def ratio(a: float, b: float) -> float:
            return a / b if b else float("nan")

        return {f"{prefix}loss": ratio(self.weighted, self.weight),
                f"{prefix}knowledge_loss": ratio(self.knowledge, self.knowledge_tokens),
                f"{prefix}copy_loss": ratio(self.copy, self.copy_tokens)}


@dataclass(frozen=True)
class BartDims:
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_ffn: int
    decoder_ffn: int
    vocab: int

    @classmethod
    def of(cls, config) -> "BartDims":
        return cls(config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_ffn_dim,
                   config.decoder_ffn_dim, config.vocab_size)


def bart_train_flops(dims: BartDims, source_tokens, target_tokens) -> float:
    """Training FLOPs (forward + backward = 3x forward) of sequences with these non-pad lengths.

    Each token is counted only through the stack it passes, not as 6 N for every position:
    source tokens through the encoder layers (attention projections, FFN, attention scores over the
    source) and the decoder's cross-attention K/V; target tokens through the decoder layers (self-
    and cross-attention projections, FFN, scores over the target and the source) and the LM head.
    Embedding lookups are free. For bart-base at 512/128 this gives 239 GFLOP a sequence where
    6 N x 640 gives 535 (shared/DESIGN.md section 4). Padding does no useful work and is not counted.
    """
    return float(bart_flops_tensor(dims, torch.as_tensor(source_tokens), torch.as_tensor(target_tokens)))


def bart_flops_tensor(dims: BartDims, source_tokens: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """:func:`bart_train_flops` as a 0-d float64 tensor on the lengths' device (nothing read back)."""
    d = dims.d_model
    s = source_tokens.to(torch.float64)
    t = target_tokens.to(torch.float64)
    encoder = 2 * s * dims.encoder_layers * (4 * d * d + 2 * d * dims.encoder_ffn) \
        + 4 * dims.encoder_layers * d * s * s
    decoder = 2 * t * dims.decoder_layers * (6 * d * d + 2 * d * dims.decoder_ffn) \
        + 2 * s * dims.decoder_layers * 2 * d * d \
        + 4 * dims.decoder_layers * d * (t * t + t * s) + 2 * t * dims.vocab * d
    return 3 * (encoder + decoder).sum()


def mfu(flops_per_s: float, world_size: int, peak: float) -> float:
    """Model FLOPs utilization: useful training FLOP/s (``bart_train_flops``) against the peak of all
    devices (0 when the peak is unknown)."""
    if peak <= 0 or flops_per_s <= 0:
        return 0.0
    return flops_per_s / (peak * 1e12 * world_size)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def host_reads():
    """A context manager counting the tensor operations that read a value back to the host (on a GPU,
    each waits for every kernel queued before it): ``item``, ``tolist``, ``float()``/``int()``/
    ``bool()`` of a tensor, ``numpy``, ``nonzero`` and boolean-mask indexing. After use: ``.count``,
    ``.names`` (in order) and ``.origins`` (how many came from code of each package: kilm_ray,
    transformers, deepspeed, torch). For tests and ``bench/train_throughput.py``."""
    import collections
    import traceback

    from torch.overrides import TorchFunctionMode

    reading = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "nonzero"}

    class HostReads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []
            self.origins: collections.Counter = collections.Counter()

        @property
        def count(self) -> int:
            return len(self.names)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in reading or (name == "__getitem__" and any(
                    isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:])):
                self.names.append(name)
                caller = next((f.filename for f in reversed(traceback.extract_stack()[:-1])
                               if "torch/overrides" not in f.filename and "torch/_tensor" not in f.filename), "")
                self.origins[next((pkg for pkg in ("kilm_ray", "transformers", "deepspeed", "torch", "bench")
                                   if f"/{pkg}/" in caller), "other")] += 1
            return func(*args, **(kwargs or {}))

    return HostReads()
