"""The GPU proof in one command (issue 21): run by bench/gpu_check.sh, which first installs the wheel
folder of bench/gpu_wheels.sh. Writes OUT/gpu_check.json and OUT/gpu_check.md, after every stage (a
window that closes early still leaves what was measured).

    bench/gpu_check.sh OUT [--bundle DIR] [--budget-s 420] [--stages arch,throughput,...] [--cpu-smoke]

Stages, each with its own share of the time budget, each failing on its own (the error goes into the
JSON and the next stage runs); the heavy work runs in child processes that are killed at their deadline:

  arch              the build has kernels for the GPU (kilm_ray.gpu_arch), versions, a bf16/fp16 matmul rate
  throughput        the kilm_ray worker loop under DeepSpeed without Ray (train_worker, as `kilm-ray train
                    --no-ray` runs it) against a plain PyTorch + Hugging Face loop (the anchor) in one
                    process, interleaved window by window over the same batches: bart-base and bart-large
                    from config (random weights), the bundle's real KILM samples (max_source_tokens 512),
                    bf16 with the h100 configs' settings and fp16 ZeRO-1 dynamic loss scaling with the v100
                    configs' settings; tokens/s, the ratio, and MFU counted per stack on non-pad tokens
                    against the GPU's spec peak for the dtype
  resume            N steps with a checkpoint at N/2, the process SIGKILLed right after it, resumed: per-step
                    losses, lr, grad norm, loss scale and skipped steps against an uninterrupted run, and
                    the final weights and Adam moments bit for bit (fp16 and bf16)
  export            the run's Hugging Face export loads in plain transformers (kilm_ray blocked from import)
                    on the GPU and generates; its weights against the checkpoint's
  generation        kilm_ray.generation at bart-base with the 50k vocabulary: 32 requests batched against
                    one at a time (greedy and 4 beams, 128 new tokens), peak GPU memory of 32 x 4 beams x
                    128 tokens, and candidate scoring batched against one at a time
  checkpoint_stall  the loop's blocked time per checkpoint, background (the loop's) against synchronous,
                    bart-large, alternating in one run

--cpu-smoke runs every stage on the CPU with the tiny preset and a few steps (the test suite does, so
the script cannot rot); its figures are CPU figures and say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
STAGES = ("arch", "throughput", "resume", "export", "generation", "checkpoint_stall")
# Shares of the time left when a stage starts (time a stage does not use goes to the next ones).
WEIGHTS = {"arch": 0.04, "throughput": 0.42, "resume": 0.22, "export": 0.06, "generation": 0.12,
           "checkpoint_stall": 0.14}
MIN_STAGE_S = 8.0  # a stage with less than this left is recorded as skipped
JOB_GRACE_S = 20.0  # a job past its deadline by this much is killed
GOALS = {"ratio": 0.97, "mfu_bf16": {"base": 0.35, "large": 0.45}, "batched_generation": 20.0}


# ---------------------------------------------------------------------------------------------------
# Plumbing (standard library only: the orchestrator never imports torch, so a broken CUDA install or a
# crashed job cannot take it down).

def python_cmd() -> list[str]:
    """This interpreter as child processes must run it (``-S`` kept: the bare-machine rehearsal)."""
    return [sys.executable] + (["-S"] if sys.flags.no_site else [])


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Jobs:
    """Runs ``gpu_check.py --job KIND`` child processes with a deadline; their logs go to OUT/logs."""

    def __init__(self, ctx: dict):
        self.ctx = ctx
        self.logs = Path(ctx["out"]) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def run(self, kind: str, payload: dict, deadline: float) -> dict:
        self.count += 1
        name = f"{self.count:02d}-{kind}"
        work = Path(self.ctx["scratch"]) / "jobs"
        work.mkdir(parents=True, exist_ok=True)
        result_path = work / f"{name}.result.json"
        payload = {**self.ctx, **payload, "deadline": deadline, "result_path": str(result_path)}
        payload_path = work / f"{name}.payload.json"
        write_json(payload_path, payload)
        log = self.logs / f"{name}.log"
        started = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen(python_cmd() + [str(Path(__file__).resolve()), "--job", kind, "--payload",
                                                    str(payload_path)], stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.ctx["scratch"])
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.time()) + JOB_GRACE_S)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc, timed_out = proc.wait(), True
        try:  # a child that forked DataLoader workers: none may outlive it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        out = {"job": name, "returncode": rc, "seconds": round(time.time() - started, 1), "log": str(log)}
        if timed_out:
            out.update(status="timeout", error=f"{kind} ran past its deadline and was killed", log_tail=tail(log))
        elif result is None:
            out.update(status="error", error=f"{kind} exited {rc} without a result", log_tail=tail(log))
        else:
            out.update(result)
            if rc not in (0, -signal.SIGKILL) and out.get("status") == "ok":
                out.update(status="error", error=f"{kind} exited {rc}", log_tail=tail(log))
        return out


def share(deadline: float, parts: int) -> float:
    """The deadline of the next of ``parts`` equal parts of the time left."""
    return time.time() + max(0.0, deadline - time.time()) / max(parts, 1)


def _status(rows: list[dict]) -> str:
    """ok when every row that could run did (rows skipped for what the device lacks do not count)."""
    states = {r.get("status") for r in rows if not (r.get("status") == "skipped" and r.get("reason") != "out of time")}
    if not states:
        return "skipped"
    if states <= {"ok"}:
        return "ok"
    if "ok" in states:
        return "partial"
    if states <= {"skipped"}:
        return "skipped"
    return "error"


# ---------------------------------------------------------------------------------------------------
# Stages (in the orchestrator: they only plan and run jobs)

def stage_arch(ctx: dict, jobs: Jobs, deadline: float) -> dict:
    return jobs.run("arch", {}, deadline)


def precisions(ctx: dict) -> list[tuple[str, Optional[str]]]:
    """(precision, reason to skip) in the order measured: the CPU has no fp16 DeepSpeed engine, V100 no bf16."""
    if ctx["smoke"]:
        return [("bf16", None), ("fp16", "fp16 needs a CUDA device (DeepSpeed's CPU accelerator has no fp16)")]
    bf16 = ctx.get("bf16_supported", True)
    return [("bf16", None if bf16 else "this GPU has no bf16 (V100: fp16 only)"), ("fp16", None)]


def stage_throughput(ctx: dict, jobs: Jobs, deadline: float) -> dict:
    models = ["tiny"] if ctx["smoke"] else ["base", "large"]
    plan = [(m, p, why) for m in models for p, why in precisions(ctx)]
    rows = []
    todo = [x for x in plan if x[2] is None]
    for model, precision, why in plan:
        if why:
            rows.append({"model": model, "precision": precision, "status": "skipped", "reason": why})
            continue
        if deadline - time.time() < MIN_STAGE_S:
            rows.append({"model": model, "precision": precision, "status": "skipped", "reason": "out of time"})
            todo.pop(0)
            continue
        rows.append(jobs.run("throughput_pair", {"model": model, "precision": precision}, share(deadline, len(todo))))
        rows[-1].setdefault("model", model)
        rows[-1].setdefault("precision", precision)
        todo.pop(0)
    return {"status": _status(rows), "pairs": rows}


def stage_resume(ctx: dict, jobs: Jobs, deadline: float) -> dict:
    runs = []
    order = sorted(precisions(ctx), key=lambda x: x[0] != "fp16")  # fp16 first: its goal is exactness
    todo = [x for x in order if x[1] is None]
    for precision, why in order:
        if why:
            runs.append({"precision": precision, "status": "skipped", "reason": why})
            continue
        part = share(deadline, len(todo))
        todo.pop(0)
        if part - time.time() < MIN_STAGE_S:
            runs.append({"precision": precision, "status": "skipped", "reason": "out of time"})
            continue
        root = Path(ctx["scratch"]) / "resume" / precision
        payload = {"precision": precision, "run_a": str(root / "uninterrupted"), "run_b": str(root / "interrupted")}
        # The killed run gets about a third of the part: half the steps and one checkpoint.
        killed = jobs.run("train_killed", payload, time.time() + (part - time.time()) * 0.4)
        if killed.get("status") != "ok":
            runs.append({"precision": precision, "status": "error", "error": "the run to be killed failed",
                         "killed_run": killed})
            continue
        compared = jobs.run("resume_compare", {**payload, "killed": killed}, part)
        compared.setdefault("precision", precision)
        compared["killed_run"] = {k: killed.get(k) for k in ("returncode", "killed_at_step", "seconds", "status")}
        runs.append(compared)
        if compared.get("export_dir") and not ctx.get("resume_export"):
            ctx["resume_export"] = compared["export_dir"]
            ctx["resume_export_check"] = compared.get("export_vs_checkpoint")
    return {"status": _status(runs), "runs": runs}


def stage_export(ctx: dict, jobs: Jobs, deadline: float) -> dict:
    export_dir, check, source = ctx.get("resume_export"), ctx.get("resume_export_check"), "the resume stage's run"
    if not export_dir or not Path(export_dir, "config.json").is_file():
        made = jobs.run("train_export", {"run": str(Path(ctx["scratch"]) / "export_run")}, share(deadline, 2))
        if made.get("status") != "ok":
            return {"status": "error", "error": "training a model to export failed", "train": made}
        export_dir, check, source = made["export_dir"], made.get("export_vs_checkpoint"), "a short run of its own"
    loaded = jobs.run("plain_export", {"export_dir": export_dir}, deadline)
    loaded.update(export_from=source, export_vs_checkpoint=check)
    return loaded


def stage_generation(ctx: dict, jobs: Jobs, deadline: float) -> dict:
    return jobs.run("generation", {}, deadline)


def stage_checkpoint_stall(ctx: dict, jobs: Jobs, deadline: float) -> dict:
    return jobs.run("stall", {"run": str(Path(ctx["scratch"]) / "stall_run")}, deadline)


STAGE_FUNCS: dict[str, Callable[[dict, Jobs, float], dict]] = {
    "arch": stage_arch, "throughput": stage_throughput, "resume": stage_resume, "export": stage_export,
    "generation": stage_generation, "checkpoint_stall": stage_checkpoint_stall,
}


def check_bundle(bundle: Path) -> dict:
    """The wheel folder against its own bundle.json: sizes, hashes and the 60 MiB bound."""
    import hashlib

    meta_path = bundle / "bundle.json"
    if not meta_path.is_file():
        return {"ok": False, "error": f"{meta_path} not found: build the folder with bench/gpu_wheels.sh"}
    meta = json.loads(meta_path.read_text())
    bad = []
    for f in meta.get("files", []):
        path = bundle / f["path"]
        if not path.is_file() or path.stat().st_size != f["bytes"] or \
                hashlib.sha256(path.read_bytes()).hexdigest() != f["sha256"]:
            bad.append(f["path"])
    total = sum(f["bytes"] for f in meta.get("files", []))
    ok = not bad and total <= meta.get("limit_bytes", 60 * 2**20)
    out = {"ok": ok, "total_mib": round(total / 2**20, 2), "limit_mib": meta.get("limit_bytes", 0) / 2**20,
           "built_at": meta.get("built_at"), "commit": meta.get("commit"), "kilm_ray_tree": meta.get("kilm_ray_tree"),
           "kilm_ray_dirty": meta.get("kilm_ray_dirty"), "shipped": meta.get("wheels", {}).get("shipped"),
           "sample_lengths": meta.get("data", {}).get("sample_lengths"), "data": {k: v for k, v in meta.get("data", {}).items()
                                                                              if k != "sample_lengths"}}
    if bad:
        out["error"] = f"files differ from bundle.json: {bad[:5]}"
    try:
        here = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD:kilm_ray"], capture_output=True, text=True)
        if here.returncode == 0:
            out["matches_checkout"] = here.stdout.strip() == meta.get("kilm_ray_tree") and not meta.get("kilm_ray_dirty")
    except OSError:
        pass
    return out


def orchestrate(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = args.started_at or time.time()
    deadline = started + args.budget_s
    bundle = Path(args.bundle).resolve()
    scratch = Path(tempfile.mkdtemp(prefix="kilm_gpu_check_"))
    ctx = {"out": str(out), "bundle": str(bundle), "data": str(bundle / "data"), "scratch": str(scratch),
           "repo": str(REPO), "smoke": args.cpu_smoke, "device": "cpu" if args.cpu_smoke else "cuda"}
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    report: dict = {"mode": "cpu-smoke (CPU figures, not GPU)" if args.cpu_smoke else "gpu",
                    "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                    "budget_s": args.budget_s, "python": sys.version.split()[0], "bundle": check_bundle(bundle),
                    "stages": {}}
    jobs = Jobs(ctx)

    def save() -> None:
        report["elapsed_s"] = round(time.time() - started, 1)
        write_json(out / "gpu_check.json", report)
        (out / "gpu_check.md").write_text(markdown(report))

    save()
    try:
        for i, name in enumerate(stages):
            left = deadline - time.time()
            if left < MIN_STAGE_S:
                report["stages"][name] = {"status": "skipped", "reason": f"out of time ({left:.0f} s left)"}
                save()
                continue
            weight_left = sum(WEIGHTS[s] for s in stages[i:])
            stage_deadline = time.time() + left * WEIGHTS[name] / weight_left
            t0 = time.time()
            print(f"[gpu_check] {name}: {stage_deadline - t0:.0f} s of {left:.0f} s left", flush=True)
            try:
                result = STAGE_FUNCS[name](ctx, jobs, stage_deadline)
            except Exception as exc:  # noqa: BLE001 - recorded; the next stage runs
                result = {"status": "error", "error": repr(exc), "traceback": traceback.format_exc()}
            result["stage_seconds"] = round(time.time() - t0, 1)
            report["stages"][name] = result
            if name == "arch" and result.get("status") == "ok":
                ctx["bf16_supported"] = result.get("bf16_supported", True)
                report["device"] = result.get("device")
            print(f"[gpu_check] {name}: {result.get('status')} in {result['stage_seconds']} s", flush=True)
            save()
    finally:
        save()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['elapsed_s']} s")
    return 0


# ---------------------------------------------------------------------------------------------------
# The report

def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _pct(x: Optional[float]) -> str:
    return "n/a" if not x else f"{100 * x:.1f}%"


def markdown(report: dict) -> str:
    dev = report.get("device") or {}
    gpu = report["mode"] == "gpu"

    def verdict(met: bool) -> str:  # goals are stated for GPUs: a CPU figure neither meets nor misses them
        return ("met" if met else "not met") if gpu else "CPU figure"

    lines = [f"# GPU check ({report['mode']})", "",
             f"Started {report['started']}, {report.get('elapsed_s', 0)} s of a {report['budget_s']} s budget. "
             f"Device: {dev.get('name', 'none')} (torch {dev.get('torch', '?')}, CUDA {dev.get('cuda', '-')}), "
             f"Python {report['python']}. Bundle: {report['bundle'].get('total_mib')} MiB "
             f"({'ok' if report['bundle'].get('ok') else report['bundle'].get('error', 'not ok')}).", "",
             "| stage | measure | value | goal | status |", "|---|---|---|---|---|"]

    def row(stage: str, measure: str, value: str, goal: str = "", status: str = "") -> None:
        cells = [str(c).replace("|", "/").replace("\n", " ")[:300] for c in (stage, measure, value, goal, status)]
        lines.append("| " + " | ".join(cells) + " |")

    stages = report["stages"]
    for name in STAGES:
        r = stages.get(name)
        if r is None:
            continue
        content = {"throughput": "pairs", "resume": "runs"}.get(name)
        if r.get("status") in ("skipped", "error", "timeout") and not (content and r.get(content)):
            row(name, "", r.get("reason") or r.get("error", ""), "", r["status"])
            continue
        if name == "arch":
            d = r.get("device") or {}
            row(name, "kernels for the device", f"{d.get('name', 'cpu')} {d.get('arch', '')}: {r.get('support')}".replace(
                "cpu : ", "") + f"; torch {d.get('torch', '?')}, CUDA {d.get('cuda') or '-'}", "native or compatible", r["status"])
            for dtype, rate in (r.get("matmul_tflops") or {}).items():
                row(name, f"{dtype} matmul 8192^3", f"{rate:.0f} TFLOP/s of {r.get('spec_peak', {}).get(dtype, 0):.0f} spec",
                    "", "")
        elif name == "throughput":
            for p in r.get("pairs", []):
                label = f"{p.get('model')} {p.get('precision')}"
                if p.get("status") != "ok":
                    row(name, label, p.get("reason") or p.get("error", ""), "", p.get("status", ""))
                    continue
                goal_mfu = GOALS["mfu_bf16"].get(p["model"]) if p["precision"] == "bf16" else None
                row(name, f"{label}: kilm_ray / plain tokens/s",
                    f"{p['ratio']:.3f}x ({p['kilm_tokens_per_s']:,.0f} / {p['plain_tokens_per_s']:,.0f})",
                    f">= {GOALS['ratio']}x", verdict(p["ratio"] >= GOALS["ratio"]))
                row(name, f"{label}: MFU per stack, non-pad (kilm_ray / plain)",
                    f"{_pct(p.get('kilm_mfu'))} / {_pct(p.get('plain_mfu'))} of {_fmt(p.get('spec_peak_tflops'), 0)} TFLOP/s",
                    f">= {goal_mfu:.0%} (H100/H200)" if goal_mfu else "",
                    "" if not goal_mfu or not p.get("kilm_mfu") else verdict(p["kilm_mfu"] >= goal_mfu))
        elif name == "resume":
            for run in r.get("runs", []):
                label = run.get("precision", "")
                if run.get("status") != "ok":
                    row(name, label, run.get("reason") or run.get("error", ""), "", run.get("status", ""))
                    continue
                row(name, f"{label}: losses after resume = uninterrupted, step for step",
                    f"{run['steps_compared']} steps, max abs diff {run['max_abs_diff'].get('train_loss', 0):.3g}",
                    "exact", ("met" if run["exact"] else "not met") if gpu else f"CPU: {'exact' if run['exact'] else 'not exact'}")
                row(name, f"{label}: final weights and Adam moments", "bit-identical" if run["final_state_equal"]
                    else f"max abs diff {run.get('final_state_max_abs_diff')}", "identical", "")
                if label == "fp16":
                    row(name, "fp16: loss scale / skipped steps restored",
                        f"{run.get('loss_scale_at_checkpoint')} / {run.get('skipped_at_checkpoint')} at the checkpoint; "
                        f"trainer state equal: {run.get('loss_scale_state_equal')}", "restored", "")
        elif name == "export":
            row(name, "loads in plain transformers and generates",
                f"{r.get('device')}: {r.get('new_tokens')} new tokens in {_fmt(r.get('generate_s'))} s", "", r["status"])
            check = r.get("export_vs_checkpoint") or {}
            if check:
                row(name, "export weights = checkpoint fp32 weights", f"max abs diff {check.get('max_abs_diff')}", "0", "")
        elif name == "generation":
            for kind in ("greedy", "beam4"):
                g = r.get(kind) or {}
                if g:
                    row(name, f"{g['requests']} requests x {g['beams']} beam(s) x {r.get('max_new_tokens')} tokens: "
                              "batched / one at a time (req/s)",
                        f"{g['ratio']:.1f}x ({g['batched_req_s']:.2f} / {g['single_req_s']:.2f})",
                        f">= {GOALS['batched_generation']:.0f}x" if kind == "greedy" else "",
                        verdict(g["ratio"] >= GOALS["batched_generation"]) if kind == "greedy" else "")
            if r.get("peak_memory_mib"):
                row(name, f"peak GPU memory, {r.get('beam4', {}).get('requests')} x 4 beams x {r.get('max_new_tokens')} tokens",
                    f"{r['peak_memory_mib']:,.0f} MiB (weights {r.get('weights_mib', 0):,.0f} MiB)", "", "")
            s = r.get("scoring") or {}
            if s:
                row(name, f"scoring {s['candidates']} candidates batched / one at a time",
                    f"{s['ratio']:.1f}x", "", "")
        elif name == "checkpoint_stall":
            row(name, f"{r.get('model')} {r.get('precision')}: blocked per checkpoint, background / synchronous",
                f"{_fmt(r.get('ratio'), 3)} ({_fmt(r.get('median_blocked_s', {}).get('background'), 3)} s / "
                f"{_fmt(r.get('median_blocked_s', {}).get('synchronous'), 3)} s, {_fmt(r.get('state_mb'), 0)} MB)",
                "", r["status"])
    lines += ["", "Goals (GPU only): kilm_ray loop >= 0.97x plain; MFU per stack >= 35% bart-base / >= 45% bart-large "
              "in bf16 on an H100/H200; fp16 resume exact; batched generation >= 20x one at a time."]
    if report["mode"] != "gpu":
        lines += ["", "**CPU smoke run: these are CPU figures of the tiny preset, not GPU measurements.**"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Jobs (child processes: import torch, transformers, DeepSpeed, kilm_ray)

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

    from kilm_ray.gpu_arch import check
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


class PlainLoop:
    """The anchor: plain PyTorch + Hugging Face BART over the same batches as the kilm_ray loop (the
    recipe's own data loader from step 0), the same model (same seed), AdamW (fused on CUDA), the same
    clipping and accumulation; bf16 as torch autocast, fp16 as autocast + GradScaler. Nothing else."""

    def __init__(self, cfg, data_dir: str, device: str):
        import torch

        from kilm_ray.model import build_model
        from kilm_ray.train.loop import Recipe
        from kilm_ray.train.metrics import BartDims

        dev = torch.device(device)

        class _NoEnv:  # the recipe's data setup reads only rank, world size and device
            rank, world_size, local_rank = 0, 1, 0
            device = dev

        recipe = Recipe(cfg, data_dir, _NoEnv())
        recipe.prepare_data()
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
        "train.export_at_end": False, "train.keep_checkpoints": 3}), steps


def _deterministic() -> None:
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
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
    from kilm_ray.generation import generate, score_candidates, score_continuations
    from kilm_ray.loader import SampleStore, eval_example_list, special_ids_of, verify_tokenizer
    from kilm_ray.model import build_model
    from kilm_ray.probes import prompt_from_example

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


JOBS: dict[str, Callable[[dict], dict]] = {
    "arch": job_arch, "throughput_pair": job_throughput_pair, "train_killed": job_train_killed,
    "resume_compare": job_resume_compare, "train_export": job_train_export, "plain_export": job_plain_export,
    "generation": job_generation, "stall": job_stall,
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


# ---------------------------------------------------------------------------------------------------
# Installing the wheel folder where pip is missing (gpu_check.sh uses pip when it can)

def unpack_wheels(wheels: Path, target: Path) -> None:
    """Extract the requirements' wheels that fit this interpreter into ``target``: what pip --target does
    for these packages, except console scripts (ninja's: only DeepSpeed's CPU JIT builds call it)."""
    import zipfile

    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename

    wanted = {canonicalize_name(line.split("==")[0]): line.split("==")[1].strip()
              for line in (wheels / "requirements.txt").read_text().splitlines() if "==" in line and not line.startswith("#")}
    supported = list(sys_tags())
    chosen: dict = {}
    for whl in wheels.glob("*.whl"):
        name, version, _, tags = parse_wheel_filename(whl.name)
        if name not in wanted or str(version) != wanted[name]:
            continue
        rank = min((supported.index(t) for t in tags if t in supported), default=None)
        if rank is not None and (name not in chosen or rank < chosen[name][0]):
            chosen[name] = (rank, whl)
    missing = sorted(set(wanted) - set(chosen))
    if missing:
        raise SystemExit(f"no wheel in {wheels} fits this Python for {missing}")
    target.mkdir(parents=True, exist_ok=True)
    for _, whl in chosen.values():
        with zipfile.ZipFile(whl) as z:
            z.extractall(target)


def restore_mtimes(wheels: Path, target: Path) -> int:
    """Give installed files the times recorded in their wheels (pip stamps them with the install time).
    Reinstalling the same DeepSpeed then leaves the sources of the op it JIT-builds on a CPU unchanged in
    ninja's eyes, so the op built once (about 25 s) is not rebuilt; on a GPU nothing is JIT-built."""
    import zipfile

    touched = 0
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                path = target / info.filename
                if not info.is_dir() and path.is_file():
                    stamp = time.mktime(info.date_time + (0, 0, -1))
                    os.utime(path, (stamp, stamp))
                    touched += 1
    return touched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="directory for gpu_check.json, gpu_check.md and logs/")
    parser.add_argument("--bundle", default=str(REPO / ".gpu_bundle"), help="the folder bench/gpu_wheels.sh built")
    parser.add_argument("--cpu-smoke", action="store_true", help="every stage on the CPU, tiny preset, few steps")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole command's time budget")
    parser.add_argument("--started-at", type=float, default=0.0, help="when gpu_check.sh started (epoch s)")
    parser.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    parser.add_argument("--unpack-wheels", nargs=2, metavar=("WHEELS", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--restore-mtimes", nargs=2, metavar=("WHEELS", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return run_job(args.job, args.payload)
    if args.unpack_wheels:
        unpack_wheels(Path(args.unpack_wheels[0]), Path(args.unpack_wheels[1]))
        return 0
    if args.restore_mtimes:
        restore_mtimes(Path(args.restore_mtimes[0]), Path(args.restore_mtimes[1]))
        return 0
    if not args.out:
        parser.error("OUT is required")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
