"""The GPU proof command (issue 21): the spec-peak table, the node-setup arch check, the orchestrator's
budget and failure isolation, and, end to end (slow), the wheel folder built by bench/gpu_wheels.sh
(60 MiB bound) and `bench/gpu_check.sh --cpu-smoke` run from it on a rehearsed bare machine: only
torch, transformers, tokenizers, safetensors, pyarrow and their dependencies, plus the folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kilm_ray.train import gpu_arch
from kilm_ray.train.metrics import peak_tflops, spec_peak_tflops

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "bench"))

import gpu_check  # noqa: E402
import gpu_check_jobs  # noqa: E402
import gpu_check_wheels  # noqa: E402

CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # PyTorch 2.13 + CUDA 12.6
CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 80GB HBM3", "fp16", 989.0),
    ("NVIDIA H200", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H100 NVL", "bf16", 835.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("Tesla V100-SXM2-16GB", "bf16", 0.0), ("Tesla V100-PCIE-32GB", "fp16", 112.0), ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA L4", "bf16", 121.0), ("NVIDIA H100 80GB HBM3", "fp32", 989.0), ("Some Future GPU", "bf16", 0.0),
])
def test_spec_peak_by_device_and_dtype(name, dtype, peak):
    assert spec_peak_tflops(name, dtype) == peak


def test_peak_tflops_prefers_the_configured_value_and_has_none_on_cpu():
    assert peak_tflops(123.0, torch.device("cpu")) == 123.0
    assert peak_tflops(0.0, torch.device("cpu")) == 0.0


def test_a_v100s_peak_is_its_fp16_peak(monkeypatch):
    """MFU read 0 on V100: the loop asked for the bf16 peak, which a V100 does not have; it passes the
    run's precision now."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert peak_tflops(0.0, torch.device("cuda", 0), "fp16") == 125.0
    assert peak_tflops(0.0, torch.device("cuda", 0), "bf16") == 0.0  # what the loop asked for before


def test_the_declared_deepspeed_is_the_tested_one():
    """pyproject allowed <0.20 while train/zero.py accepts only the tested releases: the first 0.19.9 would
    have failed every fresh node, retried until the no-progress limit."""
    import re

    from kilm_ray.train.zero import TESTED_DEEPSPEED

    declared = re.search(r'"deepspeed([^"]*)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert declared == f"=={TESTED_DEEPSPEED[-1]}" and len(TESTED_DEEPSPEED) == 1


@pytest.mark.parametrize("capability, arch_list, verdict", [
    ((7, 0), CU126, ("native", "sm_70")),
    ((7, 0), CU130, ("missing", "")),
    ((9, 0), CU126, ("native", "sm_90")),
    ((8, 9), CU126, ("compatible", "sm_86")),  # same major, older minor: the machine code runs
    ((9, 0), ["sm_80", "sm_90a"], ("native", "sm_90a")),
    ((10, 0), ["sm_90a"], ("missing", "")),  # arch-specific code runs on exactly its architecture
    ((10, 0), ["sm_90", "compute_90"], ("ptx", "compute_90")),
    ((12, 1), CU130 + ["compute_120"], ("compatible", "sm_120")),
])
def test_kernel_support(capability, arch_list, verdict):
    assert gpu_arch.kernel_support(capability, arch_list) == verdict


def _fake_cuda(monkeypatch, name: str, capability: tuple[int, int], arch_list: list[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)


def test_node_setup_fails_clearly_on_a_v100_with_a_cuda13_build(monkeypatch, capsys):
    _fake_cuda(monkeypatch, "Tesla V100-SXM2-16GB", (7, 0), CU130)
    assert gpu_arch.main([]) == 1
    err = capsys.readouterr().err
    assert "Tesla V100-SXM2-16GB (sm_70)" in err and "no kernels" in err and "whl/cu126" in err


def test_node_setup_passes_on_a_v100_with_the_cu126_build(monkeypatch, capsys):
    _fake_cuda(monkeypatch, "Tesla V100-SXM2-16GB", (7, 0), CU126)
    assert gpu_arch.main([]) == 0
    assert "native kernels (sm_70)" in capsys.readouterr().out


def test_node_setup_on_cpu_nodes(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_arch, "gpu_present", lambda: False)
    assert gpu_arch.main([]) == 0
    monkeypatch.setattr(gpu_arch, "gpu_present", lambda: True)  # a GPU the build cannot see: CPU build / old driver
    assert gpu_arch.main([]) == 1
    assert "sees no CUDA device" in capsys.readouterr().err


def test_cluster_yaml_runs_the_volta_image_then_checks_the_node():
    """GPU nodes run the image built from docker/Dockerfile, whose torch is the build gpu_arch tells a V100 node
    to install (tests/test_image.py), and every node's setup checks its own GPU against it."""
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1)
    index = re.search(r"^ARG TORCH_INDEX=(\S+)$", dockerfile, re.M).group(1)
    assert f"torch=={torch_version} --index-url {index}" in gpu_arch.VOLTA_BUILD
    for name in ("v100_spot", "h100"):
        assert raw["available_node_types"][name]["docker"]["worker_image"].endswith("-cu126")
    assert any(c.strip() == "python -m kilm_ray.train.gpu_arch" for c in raw["setup_commands"])


def _fake_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "data").mkdir(parents=True)
    (bundle / "data" / "f.txt").write_text("x")
    import hashlib

    (bundle / "bundle.json").write_text(json.dumps({"limit_bytes": 60 * 2**20, "files": [
        {"path": "data/f.txt", "bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}]}))
    return bundle


def test_stages_fail_independently_and_respect_the_budget(tmp_path, monkeypatch):
    calls = []

    def ok(ctx, jobs, deadline):
        calls.append(("arch", deadline - time.time()))
        return {"status": "ok", "device": {"name": "cpu"}}

    def boom(ctx, jobs, deadline):
        calls.append(("throughput", deadline - time.time()))
        raise RuntimeError("CUDA out of memory")

    def overrun(ctx, jobs, deadline):
        calls.append(("resume", deadline - time.time()))
        time.sleep(max(0.0, deadline - time.time()) + 2.5)  # past its share (a job's grace time)
        return {"status": "ok", "runs": []}

    def later(ctx, jobs, deadline):
        calls.append(("later", deadline - time.time()))
        return {"status": "ok"}

    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 0.5)
    monkeypatch.setattr(gpu_check, "STAGE_FUNCS", {**gpu_check.STAGE_FUNCS, "arch": ok, "throughput": boom,
                                                   "resume": overrun, "export": later, "generation": later,
                                                   "checkpoint_stall": later})
    args = gpu_check.argparse.Namespace(out=str(tmp_path / "out"), bundle=str(_fake_bundle(tmp_path)), cpu_smoke=True,
                                        budget_s=4.0, started_at=time.time(), stages="")
    started = time.time()
    assert gpu_check.orchestrate(args) == 1  # a stage failed: the exit says so, the report is still written
    assert time.time() - started < 6.0
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["status"] == "partial"
    stages = report["stages"]
    assert stages["arch"]["status"] == "ok" and report["bundle"]["ok"]
    assert stages["throughput"]["status"] == "error" and "out of memory" in stages["throughput"]["error"]
    assert stages["resume"]["status"] == "ok"  # ran after the failure
    # Every stage got a share of the time left, never all of it; what the overrun left no time for is skipped.
    assert [c[0] for c in calls] == ["arch", "throughput", "resume"]
    assert all(share < 2.0 for _, share in calls)
    assert all(stages[s]["status"] == "skipped" and "out of time" in stages[s]["reason"]
               for s in ("export", "generation", "checkpoint_stall"))
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "CUDA out of memory" in md and "CPU smoke run" in md


def test_a_job_past_its_deadline_is_killed_and_a_failing_job_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "JOB_GRACE_S", 0.5)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ctx = {"out": str(tmp_path / "out"), "scratch": str(scratch), "smoke": True, "device": "cpu",
           "data": str(tmp_path / "no_data"), "repo": str(REPO)}
    jobs = gpu_check.Jobs(ctx)
    # A child that cannot finish in time whatever the machine's speed (importing torch can take < 1 s).
    monkeypatch.setattr(gpu_check, "python_cmd", lambda: [sys.executable, "-c", "import time; time.sleep(60)"])
    started = time.time()
    killed = jobs.run("generation", {}, time.time())
    assert killed["status"] == "timeout" and time.time() - started < 15
    monkeypatch.undo()
    failed = jobs.run("plain_export", {"export_dir": str(tmp_path / "missing")}, time.time() + 120)
    assert failed["status"] == "error" and failed["error"]  # the job's own exception, not a crash of ours


def test_the_report_renders_gpu_rows():
    report = {"mode": "gpu", "started": "now", "budget_s": 420, "python": "3.11", "elapsed_s": 300,
              "bundle": {"ok": True, "total_mib": 29.2}, "device": {"name": "NVIDIA H100 80GB HBM3", "torch": "2.11"},
              "stages": {
                  "throughput": {"status": "partial", "pairs": [
                      {"status": "ok", "model": "base", "precision": "bf16", "ratio": 0.95, "kilm_tokens_per_s": 3.0e5,
                       "plain_tokens_per_s": 3.2e5, "kilm_mfu": 0.31, "plain_mfu": 0.33, "spec_peak_tflops": 989.0},
                      {"status": "timeout", "model": "large", "precision": "fp16", "error": "killed"}]},
                  "resume": {"status": "ok", "runs": [
                      {"status": "ok", "precision": "fp16", "exact": True, "steps_compared": 4,
                       "max_abs_diff": {"train_loss": 0.0}, "final_state_equal": True, "loss_scale_at_checkpoint": 32768.0,
                       "skipped_at_checkpoint": 1, "loss_scale_state_equal": True}]},
                  "generation": {"status": "ok", "max_new_tokens": 128, "peak_memory_mib": 5000.0, "weights_mib": 270.0,
                                 "greedy": {"requests": 32, "beams": 1, "ratio": 25.0, "batched_req_s": 50.0,
                                            "single_req_s": 2.0}}}}
    md = gpu_check.markdown(report)
    assert "| throughput | base bf16: kilm_ray / plain tokens/s | 0.950x" in md and "not met" in md
    assert "31.0% / 33.0% of 989 TFLOP/s" in md and ">= 35% (H100/H200)" in md
    assert "large fp16 | killed" in md and "fp16: loss scale / skipped steps restored" in md
    assert "25.0x" in md and "5,000 MiB" in md and "CPU smoke" not in md


# ---------------------------------------------------------------------------------------------------
# End to end: the wheel folder and the smoke run from it on a rehearsed bare machine.

@pytest.fixture(scope="module")
def bundle(tmp_path_factory, shared_data) -> Path:
    out = tmp_path_factory.mktemp("gpu_bundle")
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_wheels.sh"), str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_wheel_folder_is_complete_and_within_60_mib(bundle):
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["total_bytes"] <= 60 * 2**20 == meta["limit_bytes"]
    assert meta["total_bytes"] == sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file() and p.name != "bundle.json")
    pins = dict(line.split("==") for line in (bundle / "wheels" / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {"deepspeed", "kilm_ray", "pydantic", "pydantic-core", "tensorboard", "protobuf", "absl-py"} <= set(pins)
    assert not {"ray", "torch", "transformers", "numpy"} & set(pins)
    assert pins["deepspeed"] == "0.19.8"
    ds = next((bundle / "wheels").glob("deepspeed-0.19.8-py3-none-any.whl"))  # no ops prebuilt: a pure wheel
    assert ds.stat().st_size < 4 * 2**20
    here = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert any(here in p.name for p in (bundle / "wheels").glob("pydantic_core-*.whl"))
    assert meta["wheels"]["pythons"][f"{sys.version_info[0]}.{sys.version_info[1]}"] == "ok"
    # Where pip is missing, gpu_check.sh unzips the wheels that fit the interpreter.
    site = bundle.parent / "unpacked"
    gpu_check_wheels.unpack_wheels(bundle / "wheels", site)
    assert (site / "deepspeed" / "__init__.py").is_file() and (site / "kilm_ray" / "train" / "gpu_arch.py").is_file()
    assert list((site / "pydantic_core").glob(f"*{here.replace('cp', 'cpython-')}*.so"))
    lengths = meta["data"]["sample_lengths"]
    assert meta["data"]["max_source_tokens"] == 512 and lengths["source_tokens"]["max"] <= 512
    assert lengths["target_tokens"]["mean"] > lengths["source_tokens"]["mean"]  # the target holds the knowledge
    assert "(50267 tokens)" in meta["data"]["source"]


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_from_the_wheel_folder_on_a_bare_machine(bundle, tmp_path):
    import bare_site

    # Fixed paths for the rehearsal's torch and the installed DeepSpeed keep the CPU op DeepSpeed JIT-builds
    # (~25 s) cached between runs (its build command names both), in a directory of its own: the venv's
    # DeepSpeed would rebuild over it and back.
    cache = Path(os.environ["TORCH_EXTENSIONS_DIR"]).parent
    shutil.rmtree(cache / "gpu_check_bare", ignore_errors=True)
    pins = (bundle / "wheels" / "requirements.txt").read_text().splitlines()
    bare = bare_site.build(cache / "gpu_check_bare", exclude=tuple(x.split("==")[0] for x in pins if "==" in x))
    assert not (bare / "deepspeed").exists() and not (bare / "ray").exists() and not (bare / "kilm_ray").exists()
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": f"{sys.executable} -S", "PYTHONPATH": str(bare),
           "KILM_GPU_SITE": str(cache / "gpu_check_site"), "TORCH_EXTENSIONS_DIR": str(cache / "gpu_check_extensions")}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--bundle", str(bundle),
                           "--cpu-smoke"], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert {k: v["status"] for k, v in stages.items()} == {k: "ok" for k in gpu_check.STAGES}, \
        json.dumps(stages, indent=1, default=str)[-4000:]
    versions = stages["arch"]["versions"]
    site = env["KILM_GPU_SITE"]
    assert versions["deepspeed"]["from"].startswith(site) and versions["kilm_ray"]["from"].startswith(site)
    assert not versions["ray"]["importable"]
    pair = stages["throughput"]["pairs"][0]
    assert pair["status"] == "ok" and pair["same_batches"] and pair["windows_measured"] >= 1 and pair["ratio"] > 0
    assert pair["padded_source_mean"] <= 512
    fp16 = [p for p in stages["throughput"]["pairs"] if p["precision"] == "fp16"][0]
    assert fp16["status"] == "skipped" and "CUDA" in fp16["reason"]
    run = next(r for r in stages["resume"]["runs"] if r["precision"] == "bf16")
    assert run["killed_run"]["returncode"] == -9 and run["resumed_from"].endswith("02")
    assert run["exact"] and run["steps_compared"] == 2 and run["final_state_equal"] and run["steps_before_kill_equal"]
    assert stages["export"]["kilm_ray_importable"] is False and stages["export"]["new_tokens"] > 0
    assert stages["export"]["export_vs_checkpoint"]["max_abs_diff"] == 0.0
    assert not stages["export"]["export_vs_checkpoint"]["pickle_files"]
    gen = stages["generation"]
    assert gen["vocab"] == 50267 and gen["greedy"]["ratio"] > 0 and gen["beam4"]["ratio"] > 0 and gen["scoring"]["ratio"] > 0
    stall = stages["checkpoint_stall"]
    assert 0 < stall["median_blocked_s"]["background"] < stall["median_blocked_s"]["synchronous"]
    shares = stages["fp16_gradients"]["scales"]
    assert [m["loss_scale"] for m in shares] == [2.0 ** 16, 2.0 ** 24]
    assert all(0 <= m["zero"] <= m["subnormal"] + m["zero"] < 1 for m in shares)
    assert shares[1]["subnormal"] < shares[0]["subnormal"]  # a larger scale lifts entries out of the subnormals
    assert "CPU smoke run" in (out / "gpu_check.md").read_text()
    # A machine without pyarrow is told so before any stage runs (it used to fail every stage but arch).
    no_arrow = bare_site.build(cache / "gpu_check_bare_no_pyarrow",
                               exclude=("pyarrow", *(x.split("==")[0] for x in pins if "==" in x)))
    refused = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out2"), "--bundle",
                              str(bundle), "--cpu-smoke"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                             env={**env, "PYTHONPATH": str(no_arrow)})
    assert refused.returncode == 2 and "lacks pyarrow" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "out2" / "gpu_check.json").exists()
    assert report["elapsed_s"] < 420


@pytest.mark.slow
def test_the_fp16_anchor_runs(bundle, tmp_path):
    """The plain loop's fp16 path (autocast + GradScaler), which the CPU smoke run cannot reach through
    DeepSpeed, on the CPU: it trains on the bundle's batches and its scaler steps."""
    p = {"smoke": True, "device": "cpu", "data": str(bundle / "data"), "repo": str(REPO), "scratch": str(tmp_path)}
    cfg = gpu_check_jobs._config(p, "tiny", "fp16", micro=1, accum=2, **{"train.zero_stage": 1, "train.max_steps": 4})
    anchor = gpu_check_jobs.PlainLoop(cfg, p["data"], "cpu")
    before = [t.detach().clone() for t in anchor.model.parameters()][:3]
    done = anchor.run_until(1)
    assert anchor.step == 1 and done["sequences"] == 2 and done["tokens"] > done["nonpad"] > 0
    assert anchor.scaler is not None and anchor.scaler.get_scale() > 0 and torch.isfinite(anchor.last_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, anchor.model.parameters()))
