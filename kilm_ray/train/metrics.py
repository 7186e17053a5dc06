"""Training metrics: token-weighted loss split by knowledge / copied tokens, throughput and MFU.
Pure arithmetic on tensors and numbers; the loop decides when to reduce across workers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Dense bf16/fp16 TFLOP/s per device used for MFU (DESIGN.md §4 uses 790 for Hopper).
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def peak_tflops(configured: float, device: torch.device) -> float:
    if configured > 0:
        return configured
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy (0 where labels are -100), float32."""
    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1),
                                             ignore_index=-100, reduction="none").view(labels.shape)


@dataclass
class LossSums:
    """Sums that reduce across workers by addition; ratios are taken only at report time."""

    weighted: float = 0.0  # sum of w * ce
    weight: float = 0.0  # sum of w
    knowledge: float = 0.0  # sum of ce on knowledge tokens
    knowledge_tokens: float = 0.0
    copy: float = 0.0  # sum of ce on the other label tokens
    copy_tokens: float = 0.0
    tokens: float = 0.0  # all input + label positions, padding included (what the GPU computes)
    nonpad_tokens: float = 0.0
    sequences: float = 0.0
    extra: dict = field(default_factory=dict)

    def add_batch(self, ce: torch.Tensor, batch: dict) -> None:
        weights, know = batch["label_weights"], batch["knowledge_mask"]
        valid = batch["labels"] != -100
        copy = valid & ~know
        self.weighted += float((ce * weights).sum())
        self.weight += float(weights.sum())
        self.knowledge += float(ce[know].sum())
        self.knowledge_tokens += float(know.sum())
        self.copy += float(ce[copy].sum())
        self.copy_tokens += float(copy.sum())
        self.tokens += float(batch["input_ids"].numel() + batch["labels"].numel())
        self.nonpad_tokens += float(batch["attention_mask"].sum() + valid.sum())
        self.sequences += float((weights.sum(dim=1) > 0).sum())

    def vector(self) -> list[float]:
        return [self.weighted, self.weight, self.knowledge, self.knowledge_tokens, self.copy, self.copy_tokens,
                self.tokens, self.nonpad_tokens, self.sequences]

    @classmethod
    def from_vector(cls, v: list[float]) -> "LossSums":
        return cls(*v)

    def summary(self, prefix: str = "") -> dict[str, float]:
        def ratio(a: float, b: float) -> float:
            return a / b if b else float("nan")

        return {f"{prefix}loss": ratio(self.weighted, self.weight),
                f"{prefix}knowledge_loss": ratio(self.knowledge, self.knowledge_tokens),
                f"{prefix}copy_loss": ratio(self.copy, self.copy_tokens)}


def mfu(n_params: int, tokens_per_s: float, world_size: int, peak: float) -> float:
    """Model FLOPs utilization, 6 N tokens/s against the peak of all devices (0 when unknown)."""
    if peak <= 0 or tokens_per_s <= 0:
        return 0.0
    return 6.0 * n_params * tokens_per_s / (peak * 1e12 * world_size)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
