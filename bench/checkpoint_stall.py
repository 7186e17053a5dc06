"""How long the training loop is blocked per checkpoint (issue 13): the synchronous checkpoint this
project wrote before (gather the full fp32 state, write it, rename it into place, all on the training
thread) against today's (copy this rank's shard to host memory; write, commit and upload in a
background thread), same model, same process, alternating A/B.

    .venv/bin/python bench/checkpoint_stall.py --data DIR [--preset large] [--repeat 3]

One process, ZeRO-1, fp32 on CPU: under n ranks each rank copies and writes 1/n of the state, so the
per-rank figures here are the single-rank worst case. Also reported: how much the training steps that
run while the background writer works slow down (the writer shares the CPU cores).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, save  # noqa: E402


def write_checkpoint(directory: Path, weights: dict, moments: dict, state: dict, model_config: dict,
                     tokenizer_dir) -> Path:
    """The synchronous single-file checkpoint of the first design (the baseline; no longer written by
    kilm_ray): the gathered fp32 state in one file, written on the training thread."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in moments.items()}, str(directory / "optimizer.safetensors"))
    (directory / "model_config.json").write_text(json.dumps(model_config, indent=2, default=str))
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, directory / "tokenizer", dirs_exist_ok=True)
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a preprocessed dataset (kilm-ray preprocess)")
    parser.add_argument("--preset", default="large")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--micro", type=int, default=2)
    args = parser.parse_args()

    import torch

    from kilm_ray.config import load_config
    from kilm_ray.train.checkpoint import (
        BackgroundWriter, LocalCheckpoints, write_rank0_files, write_shard, write_state,
    )
    from kilm_ray.train.zero import snapshot_shard
    from kilm_ray.train.local import LocalEnv
    from kilm_ray.train.loop import Recipe, setup_distributed
    from kilm_ray.train.metrics import LossSums
    from kilm_ray.train.validation import to_device
    from kilm_ray.train.zero import gather_state

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"model.preset={args.preset}", f"train.micro_batch_size={args.micro}", f"train.global_batch_size={args.micro}",
        "train.zero_stage=1", "train.num_workers=1", "model.dropout=0.0", "train.max_steps=1000"])
    work = Path(tempfile.mkdtemp(prefix="kilm_ckpt_bench_"))
    env = LocalEnv(str(work / "run"), keep=1)
    recipe = Recipe(cfg, args.data, env)
    recipe.prepare_data()
    setup_distributed(env)
    recipe.run_id = "bench"
    recipe.setup_model(None)
    recipe.sums = LossSums(env.device)
    engine = recipe.engine
    loader = iter(recipe.data_loader(0))
    checkpoints = LocalCheckpoints(work / "ckpts", keep=1)
    state = {"step": 0, "bench": True}
    model_config = engine.module.config.to_dict()

    def step() -> float:
        item = next(loader)
        micro = [to_device(mb, env.device) for mb in item["micro_batches"]]
        started = time.perf_counter()
        recipe.train_step(item["step"], micro, item["weight"], item["live"])
        return time.perf_counter() - started

    step()  # optimizer state exists from here on
    quiet_steps = [step() for _ in range(3)]

    def synchronous(k: int) -> dict:
        started = time.perf_counter()
        weights, moments = gather_state(engine)
        staging = checkpoints.shared_staging(10_000 + k)
        write_checkpoint(staging, weights, moments, state, model_config, recipe.tokenizer_dir)
        checkpoints.commit(staging, 10_000 + k)
        return {"blocked_s": time.perf_counter() - started}

    writer = BackgroundWriter()

    def background(k: int) -> dict:
        started = time.perf_counter()
        shard = snapshot_shard(engine, 0, 1)
        blocked = time.perf_counter() - started
        staging = checkpoints.shared_staging(20_000 + k)

        def job() -> None:
            write_rank0_files(staging, model_config, recipe.tokenizer_dir)
            write_shard(staging, shard, 0, 1, "bench/0")
            write_state(staging, state)
            checkpoints.commit(staging, 20_000 + k)

        writer.submit(job)
        steps_during = []
        while writer._thread is not None and writer._thread.is_alive():
            steps_during.append(step())
        writer.wait()
        return {"blocked_s": blocked, "background_s": time.perf_counter() - started, "steps_during": steps_during,
                "shard_mb": shard.nbytes / 2**20}

    runs = {"synchronous": [], "background": []}
    for k in range(args.repeat):
        runs["synchronous"].append(synchronous(k))
        runs["background"].append(background(k))
        print({name: rows[-1]["blocked_s"] for name, rows in runs.items()}, file=sys.stderr)
    sync_blocked = sorted(r["blocked_s"] for r in runs["synchronous"])[args.repeat // 2]
    async_blocked = sorted(r["blocked_s"] for r in runs["background"])[args.repeat // 2]
    during = [s for r in runs["background"] for s in r["steps_during"]]
    quiet = sum(quiet_steps) / len(quiet_steps)
    n_params = sum(p.numel() for p in engine.module.parameters())
    save("checkpoint_stall", {
        "preset": args.preset, "params": n_params, "state_mb": runs["background"][0]["shard_mb"], "runs": runs,
        "quiet_step_s": quiet, "median_blocked_s": {"synchronous": sync_blocked, "background": async_blocked},
        "blocked_ratio_background_vs_synchronous": async_blocked / sync_blocked,
        "step_slowdown_while_writing": (sum(during) / len(during) / quiet) if during else None,
    })
    shutil.rmtree(work, ignore_errors=True)
    env.close()
    del torch


if __name__ == "__main__":
    main()
