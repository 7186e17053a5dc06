"""The GPU proof in one command (issue 21): run by bench/gpu_check.sh, which first installs the wheel
folder of bench/gpu_wheels.sh. Writes OUT/gpu_check.json and OUT/gpu_check.md, after every stage (a
window that closes early still leaves what was measured).

    bench/gpu_check.sh OUT [--bundle DIR] [--budget-s 420] [--stages arch,throughput,...] [--cpu-smoke]

Stages, each with its own share of the time budget, each failing on its own (the error goes into the
JSON and the next stage runs); the heavy work runs in child processes that are killed at their deadline:

  arch              the build has kernels for the GPU (kilm_ray.train.gpu_arch), versions, a bf16/fp16 matmul rate
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
  generation        kilm_ray.model.generation at bart-base with the 50k vocabulary: 32 requests batched against
                    one at a time (greedy and 4 beams, 128 new tokens), peak GPU memory of 32 x 4 beams x
                    128 tokens, and candidate scoring batched against one at a time
  checkpoint_stall  the loop's blocked time per checkpoint, background (the loop's) against synchronous,
                    bart-large, alternating in one run
  fp16_gradients    the share of a micro-step's gradient entries pure fp16 gives as 0 or subnormal at the
                    V100 normalisation, scales 2^16 and 2^24, against fp32 on the same batches (bart-base,
                    real samples; the CPU emulation's counterpart: bench/fp16_gradients.py)

The stages' code: gpu_check_jobs.py (the measurements, in child processes), gpu_check_report.py (the
Markdown report and the goals), gpu_check_wheels.py (installing the wheel folder without pip).

--cpu-smoke runs every stage on the CPU with the tiny preset and a few steps (the test suite does, so
the script cannot rot); its figures are CPU figures and say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from gpu_check_jobs import write_json
from gpu_check_report import STAGES, markdown

REPO = Path(__file__).resolve().parents[1]
# Shares of the time left when a stage starts (time a stage does not use goes to the next ones).
WEIGHTS = {"arch": 0.04, "throughput": 0.40, "resume": 0.21, "export": 0.06, "generation": 0.11,
           "checkpoint_stall": 0.13, "fp16_gradients": 0.05}
MIN_STAGE_S = 8.0  # a stage with less than this left is recorded as skipped
JOB_GRACE_S = 20.0  # a job past its deadline by this much is killed


# ---------------------------------------------------------------------------------------------------
# Plumbing (standard library only: the orchestrator never imports torch, so a broken CUDA install or a
# crashed job cannot take it down).

def python_cmd() -> list[str]:
    """This interpreter as child processes must run it (``-S`` kept: the bare-machine rehearsal)."""
    return [sys.executable] + (["-S"] if sys.flags.no_site else [])


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


def stage_fp16_gradients(ctx: dict, jobs: Jobs, deadline: float) -> dict:
    return jobs.run("fp16_gradients", {}, deadline)


STAGE_FUNCS: dict[str, Callable[[dict, Jobs, float], dict]] = {
    "arch": stage_arch, "throughput": stage_throughput, "resume": stage_resume, "export": stage_export,
    "generation": stage_generation, "checkpoint_stall": stage_checkpoint_stall,
    "fp16_gradients": stage_fp16_gradients,
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
    overall = _status(list(report["stages"].values()))
    report["status"] = overall
    write_json(out / "gpu_check.json", report)
    print(f"[gpu_check] {overall}: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['elapsed_s']} s")
    # A script that spends a GPU window on this must see a failure as one: 0 only when every stage that the
    # device allows ran to the end (a stage skipped for lack of time, or failed, is exit 1; the report stays).
    return 0 if overall == "ok" else 1


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
        from gpu_check_jobs import run_job

        return run_job(args.job, args.payload)
    from gpu_check_wheels import restore_mtimes, unpack_wheels

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
