"""The GPU proof's measurements (bench/gpu_check.py): each runs in a child process
(``gpu_check.py --job KIND --payload FILE``) that imports torch, transformers, DeepSpeed and kilm_ray, and
writes its result as JSON; the orchestrator kills it at its deadline. Module level is the standard library
only, so the orchestrator can import ``write_json`` without torch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class StopMeasuring(Exception):
    """Raised from a RunEnv callback to end a measurement run early (the loop's finally cleans up)."""


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _data_settings(data_dir: str) -> dict:
    manifest = json.loads(Path(data_dir, "manifest.json").read_text())
    return manifest["config"]["data"]


def _config(p: dict, model: str, precision: str, micro: Optional[int] = None, accum: int = 1, **extra: Any):
    """A run config: the bart-* configs' settings for the dtype (bf16: h100, fp16: v100), or tiny.yaml
    for the smoke run; weights from config (no hub); the data settings of the bundle's dataset."""
    from kilm_ray.config import load_config

    name = "tiny.yaml" if p["smoke"] else f"bart-{model}-{'h100' if precision == 'bf16' else 'v100'}.yaml"
    data = _data_settings(p["data"])
    cfg = load_config(Path(p["repo"]) / "configs" / name, [
        "model.pretrained=null", f"model.preset={model}", f"data.max_source_tokens={data['max_source_tokens']}",
        f"data.max_knowledge_tokens={data['max_knowledge_tokens']}"])
    micro = micro or (2 if p["smoke"] else cfg.train.micro_batch_size)
    loader_workers = 0 if p["smoke"] else min(cfg.train.loader_workers, max(0, (os.cpu_count() or 2) // 2 - 1))
    overrides = {
        "train.precision": precision, "train.num_workers": 1, "train.use_gpu": p["device"] == "cuda",
        "train.micro_batch_size": micro, "train.global_batch_size": micro * accum, "train.eval_every": 0,
        "train.eval_max_samples": 8, "train.eval_generate_samples": 0, "train.checkpoint_every_minutes": 0.0,
        "train.max_restarts_without_progress": 0, "train.node_cache_dir": str(Path(p["scratch"]) / "node_cache"),
        "train.loader_workers": loader_workers, "train.warmup_steps": 0,
    }
    if p["smoke"]:
        overrides.update({"train.zero_stage": 0, "train.lr": 5e-5, "train.grad_clip": 1.0})
    overrides.update(extra)
    return cfg.with_overrides(overrides)


def _job_env(p: dict, deterministic: bool = False) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", p["device"])
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def job_arch(p: dict) -> dict:
    import torch

    from kilm_ray.train.gpu_arch import check
    from kilm_ray.train.metrics import spec_peak_tflops

    info = check()
    out: dict = {"status": "ok", "arch_check": info, "versions": _versions()}
    if p["device"] == "cpu":
        out.update(status="ok", support="cpu (no CUDA device: the arch check runs on the GPU)",
                   device={"name": "cpu", "torch": torch.__version__}, bf16_supported=True)
        return out
    if not torch.cuda.is_available():
        return {**out, "status": "error", "error": info.get("error") or "torch sees no CUDA device"}
    d = info["devices"][0]
    props = torch.cuda.get_device_properties(0)
    out.update(support=d["support"], bf16_supported=bool(torch.cuda.is_bf16_supported()),
               device={"name": d["name"], "arch": d["arch"], "capability": d["capability"],
                       "memory_gib": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count,
                       "torch": torch.__version__, "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version(), "arch_list": info["arch_list"],
                       "driver": _nvidia_smi("driver_version"),
                       "torch_cuda_arch_list_env": os.environ.get("TORCH_CUDA_ARCH_LIST")})
    if not info["ok"]:
        out.update(status="error", error=info["error"])
        return out
    # What a dense matmul reaches: the practical ceiling for the MFU figures below.
    rates, peaks = {}, {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if name == "bf16" and not out["bf16_supported"]:
            continue
        n = 8192
        a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t0, reps = time.perf_counter(), 20
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        rates[name] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
        peaks[name] = spec_peak_tflops(d["name"], name)
    out.update(matmul_tflops=rates, spec_peak=peaks)
    return out


def _nvidia_smi(field: str) -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _versions() -> dict:
    import importlib
    import importlib.util

    # Ray is not needed on this path (and not on a bare GPU machine): whether it is there at all.
    out: dict = {"ray": {"importable": importlib.util.find_spec("ray") is not None}}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "pyarrow", "deepspeed", "kilm_ray", "pydantic",
                 "tensorboard"):
        try:
            mod = importlib.import_module(name)
            out[name] = {"version": getattr(mod, "__version__", "?"), "from": str(Path(mod.__file__).parent)}
        except Exception as exc:  # noqa: BLE001 - recorded
            out[name] = {"error": repr(exc)}
    return out


def _recipe_data(cfg, data_dir: str, device: str):
    """The kilm_ray recipe with its data prepared (tokenizer, special ids, the loader's store), one process,
    no model: the batches the loop would train on, for runs beside it."""
    import torch

    from kilm_ray.train.loop import Recipe

    class _NoEnv:  # the recipe's data setup reads only rank, world size and device
        rank, world_size, local_rank = 0, 1, 0

    _NoEnv.device = torch.device(device)
    recipe = Recipe(cfg, data_dir, _NoEnv())
    recipe.prepare_data()
    return recipe


class PlainLoop:
    """The anchor: plain PyTorch + Hugging Face BART over the same batches as the kilm_ray loop (the
    recipe's own data loader from step 0), the same model (same seed), AdamW (fused on CUDA), the same
    clipping and accumulation; bf16 as torch autocast, fp16 as autocast + GradScaler. Nothing else.
    In fp16 this is not like for like, and the report says so ("plain AMP"): kilm_ray runs DeepSpeed's
    pure fp16 (fp16 weights and gradients, an fp32 master copy in the optimizer), the anchor AMP (fp32
    weights and gradients, fp16 matmuls). Torch has no pure-fp16 training loop to anchor on."""

    def __init__(self, cfg, data_dir: str, device: str):
        import torch

        from kilm_ray.model.bart import build_model
        from kilm_ray.train.metrics import BartDims

        recipe = _recipe_data(cfg, data_dir, device)
        self.batches = iter(recipe.data_loader(0))
        self.t, self.device = cfg.train, torch.device(device)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, len(recipe.tokenizer), recipe.sp, cfg.max_positions).to(self.device)
        self.model.train()
        self.dims = BartDims.of(self.model.config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.t.lr, weight_decay=self.t.weight_decay,
                                           betas=(self.t.adam_beta1, self.t.adam_beta2), eps=self.t.adam_eps,
                                           fused=device == "cuda")
        precision = cfg.train.precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
        self.step = 0
        self.last_loss = None

    def train_step(self, item: dict) -> list[dict]:
        import torch

        micro = item["micro_batches"]
        for mb in micro:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
            with (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()):
                loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"],
                                  use_cache=False).loss / len(micro)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()
        return micro

    def run_until(self, step: int) -> dict:
        """Train up to (not including) ``step``; seconds (synchronized) and what was computed."""
        _sync(self.device.type)
        t0 = time.perf_counter()
        done = []
        while self.step < step:
            item = next(self.batches)
            done += self.train_step(item)
            self.step = item["step"] + 1
        _sync(self.device.type)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, **batch_counts(done, self.dims)}


def batch_counts(micro_batches: list[dict], dims) -> dict:
    """Positions computed (padding included), non-pad tokens, per-stack FLOPs, sequences; CPU tensors."""
    from kilm_ray.train.metrics import bart_train_flops

    out = {"tokens": 0, "nonpad": 0, "flops": 0.0, "sequences": 0, "src_len": [], "tgt_len": []}
    for mb in micro_batches:
        valid = mb["labels"] != -100
        out["tokens"] += int(mb["input_ids"].numel() + mb["labels"].numel())
        out["nonpad"] += int(mb["attention_mask"].sum() + valid.sum())
        out["flops"] += bart_train_flops(dims, mb["attention_mask"].sum(dim=1), valid.sum(dim=1))
        out["sequences"] += int((mb["label_weights"].sum(dim=1) > 0).sum())
        out["src_len"].append(int(mb["input_ids"].shape[1]))
        out["tgt_len"].append(int(mb["labels"].shape[1]))
    return out


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def job_throughput_pair(p: dict) -> dict:
    _job_env(p)
    import torch

    from kilm_ray.train.local import LocalEnv
    from kilm_ray.train.loop import train_worker
    from kilm_ray.train.metrics import spec_peak_tflops

    smoke, device = p["smoke"], p["device"]
    accum = 2 if smoke else 8
    warm, target = (1, 2) if smoke else (2, 5)  # windows of one optimizer step each
    cfg = _config(p, p["model"], p["precision"], accum=accum, **{
        "train.max_steps": 200, "train.log_every": 1, "train.checkpoint_every": 10**6, "train.export_at_end": False})
    anchor = PlainLoop(cfg, p["data"], device)
    peak = spec_peak_tflops(_device_name(device), p["precision"]) if device == "cuda" else 0.0
    deadline = p["deadline"]

    class InterleavedEnv(LocalEnv):
        """At each of the loop's reports (one per step): time the loop's window, then run the anchor over
        the same steps; the anchor's time is not the loop's (the loop's clock restarts after it)."""

        def __init__(self, run_dir: str):
            super().__init__(run_dir, keep=1)
            self.windows: list[dict] = []
            self.mark: Optional[float] = None

        def report(self, metrics: dict) -> None:
            super().report(metrics)
            _sync(device)
            kilm_s = time.perf_counter() - self.mark if self.mark is not None else None
            plain = anchor.run_until(int(metrics["step"]))
            self.windows.append({"step": int(metrics["step"]), "kilm_s": kilm_s, **plain,
                                 "kilm_tokens_per_sequence": metrics["tokens_per_s"] / max(metrics["sequences_per_s"], 1e-9),
                                 "kilm_loss": metrics.get("train_loss"),
                                 "plain_last_micro_loss": float(anchor.last_loss) * accum})
            measured = [w for w in self.windows[warm:] if w["kilm_s"]]
            last = self.windows[-1]
            step_s = (last["kilm_s"] or 0) + last["seconds"]
            if len(measured) >= target or (measured and time.time() + 2 * step_s + 10 > deadline):
                raise StopMeasuring()
            self.mark = time.perf_counter()

        def checkpoint(self, step, metrics, write, state) -> None:  # not reached (checkpoint_every huge)
            raise StopMeasuring()

    env = InterleavedEnv(str(Path(p["scratch"]) / f"throughput_{p['model']}_{p['precision']}"))
    try:
        train_worker(cfg, p["data"], env)
    except StopMeasuring:
        pass
    measured = [w for w in env.windows[warm:] if w["kilm_s"]]
    if not measured:
        return {"status": "error", "error": f"no window measured after {len(env.windows)} (warm-up {warm})"}
    ratios = [w["seconds"] / w["kilm_s"] for w in measured]
    tokens = sum(w["tokens"] for w in measured)
    flops = sum(w["flops"] for w in measured)
    kilm_s, plain_s = sum(w["kilm_s"] for w in measured), sum(w["seconds"] for w in measured)
    same = all(abs(w["kilm_tokens_per_sequence"] - w["tokens"] / max(w["sequences"], 1)) < 1e-6 * w["tokens"]
               for w in measured)
    src = [x for w in measured for x in w["src_len"]]
    tgt = [x for w in measured for x in w["tgt_len"]]
    result = {
        "status": "ok", "model": p["model"], "precision": p["precision"], "device": _device_name(device),
        "micro_batch": cfg.train.micro_batch_size, "accumulation": accum, "zero_stage": cfg.train.zero_stage,
        "windows_measured": len(measured), "ratio": _median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "kilm_tokens_per_s": tokens / kilm_s, "plain_tokens_per_s": tokens / plain_s,
        "kilm_mfu": flops / kilm_s / (peak * 1e12) if peak else None,
        "plain_mfu": flops / plain_s / (peak * 1e12) if peak else None, "spec_peak_tflops": peak,
        "kilm_model_tflops": flops / kilm_s / 1e12, "plain_model_tflops": flops / plain_s / 1e12,
        "nonpad_share": sum(w["nonpad"] for w in measured) / tokens, "padded_source_mean": statistics.mean(src),
        "padded_target_mean": statistics.mean(tgt), "same_batches": same,
        "windows": [{k: v for k, v in w.items() if k not in ("src_len", "tgt_len")} for w in env.windows],
    }
    if device == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def _recording_env(run_dir: str, kill_at: Optional[int] = None, result_path: Optional[str] = None):
    """A LocalEnv that keeps every report and, with ``kill_at``, writes ``result_path`` and SIGKILLs its
    own process right after checkpoint ``kill_at`` is committed (no clean-up, as a crash or a lost node)."""
    from kilm_ray.train.local import LocalEnv

    class Env(LocalEnv):
        def checkpoint(self, step, metrics, write, state) -> None:
            super().checkpoint(step, metrics, write, state)
            if kill_at is not None and step == kill_at:
                self.close()  # the checkpoint is committed
                write_json(Path(result_path), {"status": "ok", "killed_at_step": step, "reports": self.reports})
                os.kill(os.getpid(), signal.SIGKILL)

    return Env(run_dir, keep=3)


def _resume_config(p: dict, precision: str):
    steps = 4 if p["smoke"] else 8
    model = "tiny" if p["smoke"] else "base"
    return _config(p, model, precision, accum=2, **{
        "train.max_steps": steps, "train.log_every": 1, "train.checkpoint_every": steps // 2,
        "train.export_at_end": False, "train.keep_checkpoints": 3,
        "model.attn_implementation": "eager"}), steps  # deterministic backward (strict mode)


def _deterministic() -> None:
    """Strict: an op without a deterministic kernel raises (naming itself) rather than letting "resume
    exact" fail when nothing is wrong. The resume runs use eager attention (SDPA's fused backward is not
    deterministic); CUBLAS_WORKSPACE_CONFIG is set by ``_job_env(deterministic=True)``."""
    import torch

    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def job_train_killed(p: dict) -> dict:
    _job_env(p, deterministic=True)
    from kilm_ray.train.loop import train_worker

    _deterministic()
    cfg, steps = _resume_config(p, p["precision"])
    env = _recording_env(p["run_b"], kill_at=steps // 2, result_path=p["result_path"])
    train_worker(cfg, p["data"], env)
    return {"status": "error", "error": f"the run was not killed at step {steps // 2}"}


def job_resume_compare(p: dict) -> dict:
    import warnings

    _job_env(p, deterministic=True)
    import torch

    from kilm_ray.train.checkpoint import read_checkpoint
    from kilm_ray.train.loop import train_worker

    _deterministic()
    cfg, steps = _resume_config(p, p["precision"])
    half = steps // 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env_a = _recording_env(p["run_a"])
        t0 = time.time()
        train_worker(cfg.with_overrides({"train.export_at_end": True}), p["data"], env_a)
        seconds_a = time.time() - t0
        env_b = _recording_env(p["run_b"])
        resumed_from = env_b.resume_checkpoint()
        train_worker(cfg, p["data"], env_b)
    nondeterministic = sorted({str(w.message)[:160] for w in caught if "deterministic" in str(w.message)})
    a = {int(m["step"]): m for m in env_a.reports}
    b = {int(m["step"]): m for m in env_b.reports}
    killed = {int(m["step"]): m for m in p["killed"].get("reports", [])}
    keys = ("train_loss", "train_knowledge_loss", "train_copy_loss", "lr", "grad_norm", "loss_scale", "skipped_steps")
    after = [s for s in range(half + 1, steps + 1)]
    diffs: dict[str, float] = {}
    exact = bool(after) and all(s in a and s in b for s in after) and min(b) == half + 1
    for s in after:
        for k in keys:
            if k in a.get(s, {}) and k in b.get(s, {}):
                d = abs(float(a[s][k]) - float(b[s][k]))
                diffs[k] = max(diffs.get(k, 0.0), d)
                exact = exact and a[s][k] == b[s][k]
    before_equal = all(a[s]["train_loss"] == killed[s]["train_loss"] for s in killed if s in a)
    # Final state of both runs: weights and Adam moments, bit for bit; the trainer state's loss scale.
    final_a, final_b = read_checkpoint(env_a.resume_checkpoint()), read_checkpoint(env_b.resume_checkpoint())
    max_diff, equal = 0.0, set(final_a.weights) == set(final_b.weights) and set(final_a.moments) == set(final_b.moments)
    for part in ("weights", "moments"):
        ta, tb = getattr(final_a, part), getattr(final_b, part)
        for name in ta:
            if name in tb:
                if not torch.equal(ta[name], tb[name]):
                    equal = False
                    max_diff = max(max_diff, float((ta[name].float() - tb[name].float()).abs().max()))
    state_keys = ("step", "adam_step", "loss_scale", "skipped_steps", "scheduler")
    state_equal = {k: final_a.state.get(k) == final_b.state.get(k) for k in state_keys}
    mid = a.get(half, {})
    result = {
        "status": "ok", "precision": p["precision"], "model": cfg.model.preset, "steps": steps, "checkpoint_at": half,
        "resumed_from": str(resumed_from.name) if resumed_from else None, "steps_compared": len(after),
        "exact": exact, "max_abs_diff": diffs, "steps_before_kill_equal": before_equal,
        "final_state_equal": equal, "final_state_max_abs_diff": max_diff, "trainer_state_equal": state_equal,
        "loss_scale_state_equal": state_equal.get("loss_scale"), "loss_scale_at_checkpoint": mid.get("loss_scale"),
        "skipped_at_checkpoint": mid.get("skipped_steps"), "uninterrupted_s": round(seconds_a, 1),
        "deterministic_algorithms": True, "nondeterministic_op_warnings": nondeterministic,
        "losses": {"uninterrupted": {s: a[s].get("train_loss") for s in sorted(a)},
                   "resumed": {s: b[s].get("train_loss") for s in sorted(b)}},
    }
    if p["precision"] == "fp16":
        result["loss_scale_moved_before_checkpoint"] = (mid.get("loss_scale") not in (None, 65536.0)
                                                        or bool(mid.get("skipped_steps")))
    export_dir = Path(p["run_a"]) / "export"
    if (export_dir / "config.json").is_file():
        result["export_dir"] = str(export_dir)
        result["export_vs_checkpoint"] = export_vs_checkpoint(export_dir, final_a.weights)
    return result


def export_vs_checkpoint(export_dir: Path, weights: dict) -> dict:
    """The export's tensors against the checkpoint's fp32 master weights (tied weights are stored once)."""
    from safetensors.torch import load_file

    exported: dict = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        exported.update(load_file(str(f)))
    common = [k for k in exported if k in weights]
    diff = max((float((exported[k].float() - weights[k].float()).abs().max()) for k in common), default=None)
    pickles = sorted(p.name for p in export_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    return {"tensors": len(exported), "compared": len(common), "max_abs_diff": diff, "pickle_files": pickles}


def job_train_export(p: dict) -> dict:
    _job_env(p)
    from kilm_ray.train.checkpoint import read_checkpoint
    from kilm_ray.train.loop import train_worker

    precision = "bf16" if p["smoke"] or p.get("bf16_supported", True) else "fp16"
    cfg = _config(p, "tiny" if p["smoke"] else "base", precision, **{
        "train.max_steps": 2, "train.log_every": 1, "train.checkpoint_every": 2, "train.export_at_end": True})
    env = _recording_env(p["run"])
    train_worker(cfg, p["data"], env)
    export_dir = Path(p["run"]) / "export"
    return {"status": "ok", "export_dir": str(export_dir),
            "export_vs_checkpoint": export_vs_checkpoint(export_dir, read_checkpoint(env.resume_checkpoint()).weights)}


def job_plain_export(p: dict) -> dict:
    """Plain transformers only: kilm_ray cannot even be imported in this process."""
    sys.modules["kilm_ray"] = None  # type: ignore[assignment]  # import kilm_ray -> ImportError
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoTokenizer, BartForConditionalGeneration

    path = Path(p["export_dir"])
    device = p["device"]
    t0 = time.perf_counter()
    model = BartForConditionalGeneration.from_pretrained(path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    load_s = time.perf_counter() - t0
    kilm = ["<ent>", "</ent>", "<ent_desc>", "</ent_desc>", "<sep>"]
    ids = tokenizer.convert_tokens_to_ids(kilm)
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        return {"status": "error", "error": f"the exported tokenizer lacks KILM tokens: {dict(zip(kilm, ids))}"}
    left, mention, right = "The city lies on the", "Seine", "river, north of the Loire."
    enc = tokenizer(f"{left} <ent>{mention}</ent><ent_desc><mask></ent_desc> {right}", return_tensors="pt").to(device)
    prefix = [model.config.decoder_start_token_id] + tokenizer(f"{left} <ent>{mention}</ent><ent_desc>")["input_ids"][:-1]
    dec = torch.tensor([prefix], device=device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, decoder_input_ids=dec, max_new_tokens=16, num_beams=2, do_sample=False)
    _sync(device)
    new = out[0, dec.shape[1]:].tolist()
    return {"status": "ok" if new else "error", "device": str(next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype), "load_s": round(load_s, 2),
            "generate_s": time.perf_counter() - t0, "new_tokens": len(new), "text": tokenizer.decode(new),
            "kilm_ray_importable": False, "files": sorted(f.name for f in path.iterdir())}


def job_generation(p: dict) -> dict:
    _job_env(p)
    import torch
    from transformers import AutoTokenizer

    from kilm_ray.config import ModelConfig
    from kilm_ray.model.generation import generate, score_candidates, score_continuations
    from kilm_ray.store.loader import SampleStore, eval_example_list, special_ids_of, verify_tokenizer
    from kilm_ray.model.bart import build_model
    from kilm_ray.method.probes import prompt_from_example

    smoke, device = p["smoke"], p["device"]
    n_req, max_new = (4, 8) if smoke else (32, 128)
    n_single_greedy, n_single_beam, n_cands, n_single_cands = (2, 1, 8, 2) if smoke else (8, 4, 64, 16)
    data = p["data"]
    sp = special_ids_of(data)
    tokenizer = AutoTokenizer.from_pretrained(verify_tokenizer(data))  # datasets/<run key>/tokenizer
    settings = _data_settings(data)
    max_positions = 1024  # room for the longest prompt + 128 new tokens
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny" if smoke else "base", dropout=0.0), len(tokenizer), sp, max_positions)
    dtype = torch.float32 if device == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    model = model.to(device=device, dtype=dtype).eval()
    weights_mib = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None
    store = SampleStore.load(data, "valid", str(Path(p["scratch"]) / "node_cache"))
    examples = [e for e in eval_example_list(store, 0, 10, sp)]
    prompts = [prompt_from_example(e.input_ids, e.labels, sp) for e in examples]
    usable = [(pr, e) for pr, e in zip(prompts, examples) if len(pr.decoder_prefix) + max_new <= max_positions]
    if len(usable) < n_req:
        return {"status": "error", "error": f"{len(usable)} valid prompts, {n_req} needed"}
    usable = usable[:max(n_req, n_cands)]
    requests = [pr for pr, _ in usable[:n_req]]
    stops = [sp.desc_end, sp.eos]
    deadline = p["deadline"]

    def run(batch: list, beams: int) -> tuple[float, list]:
        _sync(device)
        t0 = time.perf_counter()
        out = generate(model, [r.encoder_ids for r in batch], [r.decoder_prefix for r in batch], sp.pad, sp.eos,
                       stops, max_new, beams)
        _sync(device)
        return time.perf_counter() - t0, out

    run(requests[:2], 1)  # warm-up (kernels, allocator)
    result: dict = {"status": "ok", "model": "tiny" if smoke else "base", "vocab": len(tokenizer), "dtype": str(dtype),
                    "max_new_tokens": max_new, "prompt_tokens_mean": statistics.mean(len(r.encoder_ids) for r in requests),
                    "data": settings, "weights_mib": weights_mib}
    for kind, beams, n_single in (("greedy", 1, n_single_greedy), ("beam4", 4 if not smoke else 2, n_single_beam)):
        if device == "cuda" and beams == 4:
            torch.cuda.reset_peak_memory_stats()
        batched_s, out = run(requests, beams)
        if device == "cuda" and beams == 4:
            result["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        singles, single_s = 0, 0.0
        for r in requests[:n_single]:
            if time.time() > deadline - 30 and singles:
                break
            s, _ = run([r], beams)
            singles, single_s = singles + 1, single_s + s
        batched_rate, single_rate = len(requests) / batched_s, singles / single_s
        result[kind] = {"requests": len(requests), "beams": beams, "batched_s": batched_s, "batched_req_s": batched_rate,
                        "single_requests_timed": singles, "single_req_s": single_rate, "ratio": batched_rate / single_rate,
                        "new_tokens_mean": statistics.mean(len(o.tokens) for o in out)}
    # Candidate scoring: one prompt, many knowledge strings (the disambiguation probe).
    prompt = requests[0]
    cands = [[int(t) for t in e.labels[e.knowledge]] for _, e in usable[:n_cands]]
    _sync(device)
    t0 = time.perf_counter()
    score_candidates(model, prompt.encoder_ids, prompt.decoder_prefix, cands, sp.pad)
    _sync(device)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in cands[:n_single_cands]:
        score_continuations(model, [(prompt.encoder_ids, prompt.decoder_prefix, c)], sp.pad)
    _sync(device)
    single_s = time.perf_counter() - t0
    result["scoring"] = {"candidates": len(cands), "batched_s": batched_s, "single_timed": n_single_cands,
                         "ratio": (len(cands) / batched_s) / (n_single_cands / single_s)}
    return result


def job_stall(p: dict) -> dict:
    _job_env(p)
    from kilm_ray.train.loop import train_worker

    smoke = p["smoke"]
    precision = "bf16" if smoke or p.get("bf16_supported", True) else "fp16"
    model = "tiny" if smoke else "large"
    cfg = _config(p, model, precision, accum=1, **{
        "train.max_steps": 6 if smoke else 10, "train.log_every": 1, "train.checkpoint_every": 2, "train.export_at_end": False,
        "train.keep_checkpoints": 1})
    records: list[dict] = []
    from kilm_ray.train.local import LocalEnv

    class StallEnv(LocalEnv):
        """Alternates the loop's own background checkpoint with a synchronous one (the same files,
        written before the loop continues) and times how long the loop waits for each."""

        def checkpoint(self, step, metrics, write, state) -> None:
            # The first is a warm-up (first-time allocations); then synchronous and background alternate.
            mode = "warm-up" if not records else ("synchronous", "background")[(len(records) - 1) % 2]
            rec: dict = {"step": step, "mode": mode, "loop_copy_s": metrics.get("checkpoint_blocked_s"),
                         "shard_mb": metrics.get("checkpoint_shard_mb")}

            def timed_write(directory: Path) -> None:
                t = time.perf_counter()
                write(directory)
                rec["write_s"] = time.perf_counter() - t

            t0 = time.perf_counter()
            super().checkpoint(step, metrics, timed_write, state)
            if mode == "synchronous":
                self.close()
            rec["env_s"] = time.perf_counter() - t0
            rec["blocked_s"] = (rec["loop_copy_s"] or 0.0) + rec["env_s"]
            records.append(rec)

    env = StallEnv(p["run"], keep=1)
    train_worker(cfg, p["data"], env)
    blocked = {m: _median([r["blocked_s"] for r in records if r["mode"] == m]) for m in ("background", "synchronous")}
    return {"status": "ok" if blocked["background"] is not None and blocked["synchronous"] else "error",
            "model": model, "precision": precision, "zero_stage": cfg.train.zero_stage, "checkpoints": records,
            "median_blocked_s": blocked, "state_mb": records[0].get("shard_mb") if records else None,
            "ratio": (blocked["background"] / blocked["synchronous"]) if blocked["synchronous"] else None}


def job_fp16_gradients(p: dict) -> dict:
    """The share of a micro-step's gradient entries that pure fp16 gives as 0 or subnormal (issue 32 §3):
    bart-base from config on the bundle's real KILM samples, the V100 normalisation (8 workers, a global batch
    of 8192 sequences) at the initial loss scale 2^16 and 2^24, against fp32 on the same batch. On the CPU
    (smoke) the tiny preset: CPU figures."""
    _job_env(p)
    import torch

    from fp16_gradients import measured_fp16_shares
    from kilm_ray.model.bart import build_model

    smoke, device = p["smoke"], p["device"]
    # The V100 config's settings (micro-batch, lengths); this job runs its own fp16, not DeepSpeed's.
    cfg = _config(p, "tiny" if smoke else "base", "fp32" if smoke else "fp16")
    dev = torch.device(device)
    recipe = _recipe_data(cfg, p["data"], device)
    item = next(iter(recipe.data_loader(0)))
    batches = [{k: v.to(dev) for k, v in mb.items()} for mb in item["micro_batches"][:2]]
    per_sequence = float(sum(b["label_weights"].sum() for b in batches)) / sum(len(b["input_ids"]) for b in batches)
    world, global_batch = 8, 8192
    factor = world / (per_sequence * global_batch)
    torch.manual_seed(0)
    # eval(): no dropout (BART's is functional, keyed on training), so the fp32 and fp16 passes see the same network.
    model = build_model(cfg.model, len(recipe.tokenizer), recipe.sp, cfg.max_positions).to(dev).eval()
    scales = [measured_fp16_shares(model, batches, factor, 2.0 ** power) for power in (16, 24)]
    return {"status": "ok", "model": "tiny" if smoke else "base", "device": _device_name(device),
            "micro_batch": cfg.train.micro_batch_size, "per_token_factor_at_2^16": factor * 2.0 ** 16,
            "scales": scales}


JOBS: dict[str, Callable[[dict], dict]] = {
    "arch": job_arch, "throughput_pair": job_throughput_pair, "train_killed": job_train_killed,
    "resume_compare": job_resume_compare, "train_export": job_train_export, "plain_export": job_plain_export,
    "generation": job_generation, "stall": job_stall, "fp16_gradients": job_fp16_gradients,
}


def run_job(kind: str, payload_path: str) -> int:
    p = json.loads(Path(payload_path).read_text())
    try:
        result = JOBS[kind](p)
    except Exception as exc:  # noqa: BLE001 - the orchestrator records it
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    write_json(Path(p["result_path"]), result)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (DataLoader workers, CUDA contexts, DeepSpeed's process group): the
    # result is written and the orchestrator reaps the process group.
    os._exit(0 if result.get("status") == "ok" else 1)
