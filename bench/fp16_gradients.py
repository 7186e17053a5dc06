"""What fp16 does to a V100 run's gradients, emulated in fp32 on the CPU (issue 32 §3).

kilm_ray's loss is the token-weighted mean over the whole global batch: each micro-step backpropagates
``sum(ce * label_weight) * W / G`` (W workers, G the global batch's label weight, ~4.5 M for 8192
sequences), DeepSpeed multiplies it by the loss scale S, and under fp16 the gradient each micro-step
produces is an fp16 number: below 6.1e-5 it is subnormal (fewer bits), below 2.98e-8 it rounds to 0.
The micro-steps' gradients are then summed, K per worker per optimizer step (K = 128 for bart-base at
W = 8, micro-batch 8), in fp16 (DeepSpeed's default under ZeRO-1/2) or in fp32
(``data_types.grad_accum_dtype: fp32``, ``train.fp16_grad_accum: fp32`` here), and the sums are then
all-reduced across the workers in fp16 (DeepSpeed's default for fp16 runs) or fp32 (what kilm_ray sets with
fp32 sums: ``communication_data_type``); the cast to fp16 is emulated, the cross-worker fp16 additions not.

This script computes real bart-base gradients of micro-batches at the real lengths (fp32, CPU), then
measures on a uniform sample of the parameters:

- per micro-step: the share of the nonzero gradient entries fp16 would hold as subnormal / flush to 0,
  at the initial scale (2^16) and at the scale the dynamic scaler settles at (the largest power of two
  whose step does not overflow fp16: for fp16 accumulation the accumulated sum must stay finite, for
  fp32 accumulation only each micro-step's gradient);
- the accumulated gradient: its relative L2 error against an fp64 sum, and the share of entries off by
  more than 10%, for fp16 and fp32 accumulation.

What it does not see (name it beside the figures): the backward's own fp16 intermediates (activation
gradients can underflow before a parameter gradient is formed); the model is randomly initialised
unless ``--pretrained`` names a local bart-base (a pretrained model's loss, hence its gradients, is
smaller); the tokens are synthetic (uniform over the vocabulary) at the real lengths and label weights.
``bench/gpu_check`` measures the real fraction on a GPU.

    python bench/fp16_gradients.py [--micro 8] [--micro-batches 3] [--accumulation 128] [--world 8]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 6.103515625e-05  # 2^-14
FP16_ROUNDS_TO_ZERO = 2.0 ** -25  # half the smallest subnormal (2^-24)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", default="", help="a local bart-base directory (default: bart-base shape, random)")
    p.add_argument("--micro", type=int, default=8, help="sequences per micro-batch (configs/bart-base-v100.yaml)")
    p.add_argument("--source", type=int, default=512, help="source tokens (data.max_source_tokens)")
    p.add_argument("--target", type=int, default=640, help="target tokens (source + data.max_knowledge_tokens)")
    p.add_argument("--knowledge-weight", type=float, default=1.0, help="masking.knowledge_loss_weight")
    p.add_argument("--micro-batches", type=int, default=3, help="distinct micro-batches computed (cycled)")
    p.add_argument("--accumulation", type=int, default=128, help="micro-steps per worker per optimizer step")
    p.add_argument("--world", type=int, default=8, help="workers (W)")
    p.add_argument("--global-batch", type=int, default=8192, help="sequences per optimizer step")
    p.add_argument("--sample", type=int, default=4_000_000, help="parameter entries sampled for the statistics")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(args):
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    if args.pretrained:
        return BartForConditionalGeneration.from_pretrained(args.pretrained, dropout=0.0)
    torch.manual_seed(args.seed)
    config = BartConfig(vocab_size=50272, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                        max_position_embeddings=1024, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return BartForConditionalGeneration(config)


def micro_batch(args, vocab: int, generator) -> dict:
    """Synthetic tokens at the real lengths, as the training loader's micro-batches hold them; the target's
    last (target - source) tokens are knowledge."""
    import torch

    source = torch.randint(4, vocab, (args.micro, args.source), generator=generator)
    labels = torch.randint(4, vocab, (args.micro, args.target), generator=generator)
    weights = torch.ones(args.micro, args.target)
    weights[:, args.source:] = args.knowledge_weight
    return {"input_ids": source, "attention_mask": torch.ones_like(source), "labels": labels, "label_weights": weights,
            "decoder_input_ids": torch.cat([torch.full((args.micro, 1), 2), labels[:, :-1]], dim=1)}


def gradient(model, batch: dict, multiplier: float = 1.0):
    """d(sum(ce * label_weight) * multiplier)/d(theta) of one micro-batch (a training loader's micro-batch
    dict), flattened, in the model's dtype; the loss is fp32 as kilm_ray's."""
    import torch

    from kilm_ray.model.bart import token_losses
    from kilm_ray.train.validation import attention_masks

    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    encoder_mask, causal = attention_masks(batch, model.config._attn_implementation, dtype)
    logits = model(input_ids=batch["input_ids"], attention_mask=encoder_mask, use_cache=False,
                   decoder_input_ids=batch["decoder_input_ids"], decoder_attention_mask=causal).logits
    ((token_losses(logits, batch["labels"]) * batch["label_weights"]).sum() * multiplier).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def fp16_shares(values, nonzero) -> dict:
    """Shares of the nonzero entries that fp16 holds as subnormal, or flushes to 0."""
    magnitude = values.abs()
    n = max(int(nonzero.sum()), 1)
    return {"subnormal": float(((magnitude < FP16_MIN_NORMAL) & nonzero).sum()) / n,
            "flushed_to_zero": float(((magnitude < FP16_ROUNDS_TO_ZERO) & nonzero).sum()) / n}


def accumulate(sampled: list, k: int, factor: float, dtype):
    """K micro-steps' fp16 gradients (cycled), summed in ``dtype`` as DeepSpeed would."""
    import torch

    total = torch.zeros_like(sampled[0], dtype=dtype)
    for i in range(k):
        total += (sampled[i % len(sampled)] * factor).to(torch.float16).to(dtype)
    return total


def accumulation_error(acc, exact) -> dict:
    import torch

    acc, exact = acc.double(), exact.double()
    nonzero = exact != 0
    relative = ((acc - exact).abs() / exact.abs().clamp_min(1e-300))[nonzero]
    return {"relative_l2_error": float(torch.linalg.vector_norm(acc - exact) / torch.linalg.vector_norm(exact)),
            "share_off_by_over_10pct": float((relative > 0.10).double().mean()),
            "overflowed": bool(torch.isinf(acc).any())}


def measured_fp16_shares(model, micro_batches: list[dict], factor: float, scale: float) -> dict:
    """The real thing, where fp16 runs (bench/gpu_check on a GPU): each micro-batch's gradient computed in
    pure fp16 (fp16 weights and backward, the loss in fp32 as kilm_ray's, times ``factor * scale``), against
    the same batch in fp32: the shares of the fp32-nonzero entries that fp16 gives as 0 or as subnormal, and
    whether any overflowed. ``micro_batches``: kilm_ray loader micro-batches, on the model's device."""
    import copy

    import torch

    half = copy.deepcopy(model).half()
    zero = subnormal = nonzero = 0
    overflowed = False
    for batch in micro_batches:
        reference = gradient(model, batch, factor) != 0
        grad16 = gradient(half, batch, factor * scale)
        overflowed |= not bool(torch.isfinite(grad16).all())
        nonzero += int(reference.sum())
        zero += int(((grad16 == 0) & reference).sum())
        subnormal += int(((grad16.abs() < FP16_MIN_NORMAL) & (grad16 != 0) & reference).sum())
    n = max(nonzero, 1)
    return {"loss_scale": scale, "micro_batches": len(micro_batches), "zero": zero / n, "subnormal": subnormal / n,
            "overflowed": overflowed}


def power_of_two_below(x: float) -> float:
    return 2.0 ** math.floor(math.log2(x)) if x > 0 else float("inf")


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model(args).train()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    batches = [micro_batch(args, vocab, generator) for _ in range(args.micro_batches)]
    # G: the global batch's label weight (every target token counts 1, knowledge tokens knowledge_weight).
    per_sequence = float(batches[0]["label_weights"].sum()) / args.micro
    global_weight = per_sequence * args.global_batch
    factor = args.world / global_weight

    started = time.perf_counter()
    grads = [gradient(model, b) for b in batches]
    seconds_per_micro_step = (time.perf_counter() - started) / len(batches)
    n_params = grads[0].numel()
    index = torch.randperm(n_params, generator=generator)[: min(args.sample, n_params)]
    sampled = [g[index].clone() for g in grads]
    # The dynamic scaler's ceiling: the largest |gradient| of one micro-step (fp32 accumulation), or of the
    # accumulated sum (fp16 accumulation), over every parameter (not the sample), must stay below 65504.
    per_step_max = max(float(g.abs().max()) for g in grads) * factor
    summed = torch.stack(grads).sum(0)
    del grads
    accumulated_max = float(summed.abs().max()) * factor * args.accumulation / args.micro_batches
    del summed
    scales = {"initial (2^16)": 2.0 ** 16,
              "settled, fp16 accumulation": min(power_of_two_below(FP16_MAX / accumulated_max), 2.0 ** 32),
              "settled, fp32 accumulation": min(power_of_two_below(FP16_MAX / per_step_max), 2.0 ** 32)}
    nonzero = sampled[0] != 0
    exact = torch.zeros_like(sampled[0], dtype=torch.float64)
    for i in range(args.accumulation):
        exact += sampled[i % len(sampled)].double()

    settings = []
    for label, scale in scales.items():
        for accum in ("fp16", "fp32"):
            if label.startswith("settled") and not label.endswith(f"{accum} accumulation"):
                continue
            acc = accumulate(sampled, args.accumulation, factor * scale, torch.float16 if accum == "fp16" else torch.float32)
            settings.append({"scale": label, "loss_scale": scale, "accumulation": accum,
                             "per_micro_step": fp16_shares(sampled[0] * factor * scale, nonzero),
                             "accumulated": accumulation_error(acc, exact * factor * scale)})
            if accum == "fp32":  # the same sum cast to fp16 for the all-reduce (DeepSpeed's default comm dtype)
                settings.append({"scale": label, "loss_scale": scale, "accumulation": "fp32, fp16 all-reduce (the cast)",
                                 "per_micro_step": settings[-1]["per_micro_step"],
                                 "accumulated": accumulation_error(acc.to(torch.float16), exact * factor * scale)})
    result = {
        "what": "fp16 gradients of bart-base emulated in fp32 on the CPU: the share of nonzero parameter-gradient "
                "entries fp16 holds as subnormal or flushes, per micro-step and accumulated over K micro-steps "
                "(synthetic tokens at the real lengths; the backward's own fp16 intermediates not emulated)",
        "model": args.pretrained or "bart-base shape, random init (seed %d)" % args.seed,
        "parameters": n_params, "sampled_entries": int(index.numel()),
        "nonzero_share_of_sample": float(nonzero.double().mean()),
        "micro_batch": args.micro, "source_tokens": args.source, "target_tokens": args.target,
        "world_size": args.world, "global_batch": args.global_batch, "global_label_weight": global_weight,
        "per_token_gradient_factor_at_initial_scale": factor * 2.0 ** 16,
        "accumulation_micro_steps": args.accumulation, "distinct_micro_batches": args.micro_batches,
        "cpu_seconds_per_micro_step": seconds_per_micro_step,
        "max_abs_micro_step_gradient_unscaled": per_step_max, "max_abs_accumulated_gradient_unscaled": accumulated_max,
        "settings": settings,
    }
    save("fp16_gradients", result)
    return result


if __name__ == "__main__":
    main()
