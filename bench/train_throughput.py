"""Training throughput: the same model and batch trained by
  (a) the kilm_ray worker loop under Ray Train + DeepSpeed,
  (b) the same loop without Ray (DeepSpeed, one process),
  (c) a plain PyTorch loop (no Ray, no DeepSpeed: AdamW, autocast on GPU),
in one run, reporting tokens/s, MFU and the ratios against (c).

    python bench/train_throughput.py --data DIR [--preset small] [--steps 40] [--micro 16]
    python bench/train_throughput.py --data DIR --device cuda --preset base --precision bf16 --no-ray

On the GPU machine (no Ray there) run with --no-ray: (b) against (c). Throughput is measured over
the steps after the first ``--warmup`` ones (compilation, allocator warm-up).

``--accounting`` instead measures the per-micro-batch bookkeeping (issue 22): the loop as it is, whose
loss sums stay on the device and are read once per log step, against the loop as it was, which read
~10 values back to the host per micro-batch (``HostLossSums`` below, the previous code, kept here
only as the baseline, with 2-D attention masks that transformers reads back per forward),
alternating A/B in one process, with ``--accumulation`` micro-steps per
optimizer step (64: what bart-base on 32 V100s runs). It also counts the host reads per step (each a
device sync on a GPU) with ``kilm_ray.train.metrics.host_reads``.

    python bench/train_throughput.py --data DIR --accounting --preset tiny --micro 2 --accumulation 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, save  # noqa: E402


def build_config(args):
    from kilm_ray.config import load_config

    overrides = [f"model.preset={args.preset}", f"train.micro_batch_size={args.micro}",
                 f"train.global_batch_size={args.micro * args.accumulation}", f"train.max_steps={args.steps}",
                 f"train.precision={args.precision}", f"train.zero_stage={args.zero}", "train.num_workers=1",
                 f"train.log_every={args.log_every}", "train.eval_every=0", f"train.checkpoint_every={10**6}",
                 "train.export_at_end=false", "model.dropout=0.0", f"train.use_gpu={str(args.device == 'cuda').lower()}",
                 f"train.compile={str(args.compile).lower()}", f"train.cpus_per_worker={args.cpus}"]
    return load_config(REPO / "configs" / "tiny.yaml", overrides + args.overrides)


def steady_tokens_per_s(metrics: list[dict], warmup: int) -> tuple[float, float]:
    rows = [m for m in metrics if "tokens_per_s" in m and m["step"] > warmup]
    if not rows:
        raise RuntimeError("no metrics after warm-up; run more steps")
    return (sum(m["tokens_per_s"] for m in rows) / len(rows), sum(m.get("mfu", 0.0) for m in rows) / len(rows))


def run_ray(cfg, data: str, warmup: int) -> dict:
    import ray

    from kilm_ray.train.ray_trainer import run_training

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=1024**3)
    with tempfile.TemporaryDirectory() as runs:
        run_training(cfg, data, runs, "bench")
        metrics = [json.loads(line) for line in (Path(runs) / "bench" / "metrics.jsonl").read_text().splitlines()]
    ray.shutdown()
    tps, mfu = steady_tokens_per_s(metrics, warmup)
    return {"tokens_per_s": tps, "mfu": mfu}


def run_local_loop(cfg, data: str, warmup: int) -> dict:
    from kilm_ray.train.local import LocalEnv
    from kilm_ray.train.loop import train_worker

    with tempfile.TemporaryDirectory() as run:
        env = LocalEnv(run, keep=1)
        train_worker(cfg, data, env)
    tps, mfu = steady_tokens_per_s(env.reports, warmup)
    return {"tokens_per_s": tps, "mfu": mfu}


def run_plain(cfg, data: str, warmup: int, device: str) -> dict:
    """nanoGPT-style: the same batches, model, optimizer and loss, nothing else."""
    import torch
    from transformers import AutoTokenizer

    from kilm_ray import storage
    from kilm_ray.store.loader import BatchPlan, SampleStore, StepDataset, special_ids_of
    from kilm_ray.method.masking import MaskingParams
    from kilm_ray.model.bart import build_model
    from kilm_ray.store.loader import verify_tokenizer
    from kilm_ray.model.bart import token_losses
    from kilm_ray.train.metrics import BartDims, bart_train_flops, mfu, peak_tflops

    sp = special_ids_of(data)
    tokenizer = AutoTokenizer.from_pretrained(str(storage.local_copy(verify_tokenizer(data))))
    store = SampleStore.load(data, "train")
    t = cfg.train
    plan = BatchPlan(len(store), t.global_batch_size, t.micro_batch_size, 1, t.epochs, t.seed, t.max_steps)
    dataset = StepDataset(store, plan, 0, 0, MaskingParams(), sp, 1.0)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, len(tokenizer), sp, cfg.max_positions).to(device)
    dims = BartDims.of(model.config)
    if t.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=device == "cuda")
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=t.precision == "bf16" and device == "cuda")
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=t.loader_workers,
                                         pin_memory=device == "cuda")
    tokens, flops, started = 0, 0.0, None
    for item in loader:
        step = item["step"]
        for mb in item["micro_batches"]:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            with autocast:
                logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                               decoder_input_ids=mb["decoder_input_ids"], use_cache=False).logits
            ce = token_losses(logits, mb["labels"])
            loss = (ce * mb["label_weights"]).sum() / mb["label_weights"].sum()
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step + 1 > warmup:
                tokens += mb["input_ids"].numel() + mb["labels"].numel()
                flops += bart_train_flops(dims, mb["attention_mask"].sum(dim=1), (mb["labels"] != -100).sum(dim=1))
        if step + 1 == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    tps = tokens / elapsed
    return {"tokens_per_s": tps, "mfu": mfu(flops / elapsed, 1, peak_tflops(t.peak_tflops, torch.device(device), t.precision))}


class HostLossSums:
    """The previous per-micro-batch accounting (baseline only): every sum read back with ``float``."""

    def __init__(self, device=None):
        self.v = [0.0] * 10

    def add_batch(self, ce, batch, dims=None) -> None:
        from kilm_ray.train.metrics import bart_train_flops

        weights, know = batch["label_weights"], batch["knowledge_mask"]
        valid = batch["labels"] != -100
        copy = valid & ~know
        for i, value in enumerate((
                (ce * weights).sum(), weights.sum(), ce[know].sum(), know.sum(), ce[copy].sum(), copy.sum(),
                batch["attention_mask"].sum() + valid.sum(), (weights.sum(dim=1) > 0).sum())):
            self.v[i] += float(value)
        if dims is not None:
            self.v[8] += bart_train_flops(dims, batch["attention_mask"].sum(dim=1), valid.sum(dim=1))
        self.v[9] += float(batch["input_ids"].numel() + batch["labels"].numel())

    def finite(self):
        import math

        import torch

        return torch.tensor(math.isfinite(self.v[0]))

    def vector(self):
        import torch

        return torch.tensor(self.v, dtype=torch.float64)


def run_accounting(cfg, data: str, repeats: int, warmup: int) -> dict:
    """A/B of the micro-step bookkeeping in one process (see the module docstring)."""
    import torch

    from kilm_ray.train.local import LocalEnv
    from kilm_ray.train.loop import Recipe, setup_distributed
    from kilm_ray.train.metrics import LossSums, host_reads
    from kilm_ray.train.validation import to_device

    work = Path(tempfile.mkdtemp(prefix="kilm_accounting_"))
    env = LocalEnv(str(work), keep=1)
    recipe = Recipe(cfg, data, env)
    recipe.prepare_data()
    setup_distributed(env)
    recipe.run_id = "bench"
    recipe.setup_model(None)
    recipe.start_clocks(0)
    loader = iter(recipe.data_loader(0))
    steps_per_run = max(1, cfg.train.max_steps // (2 * repeats + 2))

    def old_train_step(step: int, micro: list, global_weight: float) -> None:
        """The previous micro-step: 2-D attention masks (transformers reads each back to decide
        whether to skip it) and HostLossSums."""
        from kilm_ray.train.loop import _reseed
        from kilm_ray.model.bart import token_losses

        engine, scale = recipe.engine, env.world_size / global_weight
        for unit, mb in zip(recipe.plan.unit_ids(env.rank), micro):
            _reseed(cfg.train.seed, step, unit)
            out = engine(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                         decoder_input_ids=mb["decoder_input_ids"], use_cache=False)
            ce = token_losses(out.logits, mb["labels"])
            engine.backward((ce * mb["label_weights"]).sum() * scale, scale_wrt_gas=False)
            engine.step()
            recipe.sums.add_batch(ce.detach(), mb, recipe.dims)

    def one_step(variant: str) -> None:
        item = next(loader)
        micro = [to_device(mb, env.device) for mb in item["micro_batches"]]
        if variant == "before":
            # the old loop: the loss weight summed on the device, read back once per step
            weight = float(sum(mb["label_weights"].sum() for mb in micro))
            plan = recipe.agree(item["step"], recipe.signals(), weight)
            old_train_step(item["step"], micro, plan.global_weight)
        else:
            # One agreement per step as the loop makes (there after the step, carrying the next step's
            # weight; here before it, carrying this one's: the same collective and host read).
            plan = recipe.agree(item["step"], recipe.signals(), item["weight"])
            recipe.train_step(item["step"], micro, plan.global_weight, item["live"])

    def run(variant: str, n: int) -> float:
        recipe.sums = HostLossSums() if variant == "before" else LossSums(env.device)
        started = time.perf_counter()
        for _ in range(n):
            one_step(variant)
        if variant == "after":
            recipe.sums.vector().tolist()  # the one read of the log step
        return time.perf_counter() - started

    for variant in ("before", "after"):  # warm-up (allocator, DeepSpeed's first steps)
        run(variant, warmup)
    reads = {}
    for variant in ("before", "after"):
        with host_reads() as counter:
            run(variant, 1)
        reads[variant] = {"per_step": counter.count, "by_package": dict(counter.origins),
                          "names": sorted(set(counter.names))}
    times = {"before": [], "after": []}
    for _ in range(repeats):
        for variant in ("before", "after"):
            times[variant].append(run(variant, steps_per_run) / steps_per_run)
    env.close()
    micro_steps = recipe.plan.grad_accum
    step_s = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"micro_steps_per_step": micro_steps, "steps_per_run": steps_per_run, "repeats": repeats,
            "host_reads_per_step": reads, "step_s_cpu": times, "median_step_s_cpu": step_s,
            "speedup_after_vs_before_cpu": step_s["before"] / step_s["after"],
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="a preprocessed dataset (kilm-ray preprocess)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpus", type=float, default=2.0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-ray", action="store_true", help="skip (a): machines without Ray")
    parser.add_argument("--accounting", action="store_true",
                        help="A/B the per-micro-batch bookkeeping (host reads) instead of (a)-(c)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-steps per optimizer step")
    parser.add_argument("--repeats", type=int, default=3, help="--accounting: A/B rounds")
    parser.add_argument("--name", default=None, help="result file (default train_throughput, "
                                                      "train_throughput_accounting with --accounting)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    cfg = build_config(args)
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "overrides"}}
    if args.accounting:
        result["accounting"] = run_accounting(cfg, args.data, args.repeats, args.warmup)
        save(args.name or "train_throughput_accounting", result)
        return
    result["plain_pytorch"] = run_plain(cfg, args.data, args.warmup, args.device)
    result["kilm_loop_deepspeed_no_ray"] = run_local_loop(cfg, args.data, args.warmup)
    if not args.no_ray:
        result["kilm_loop_deepspeed_ray_train"] = run_ray(cfg, args.data, args.warmup)
    base = result["plain_pytorch"]["tokens_per_s"]
    result["ratios_vs_plain"] = {k: v["tokens_per_s"] / base for k, v in result.items()
                                 if isinstance(v, dict) and "tokens_per_s" in v}
    save(args.name or "train_throughput", result)


if __name__ == "__main__":
    main()
