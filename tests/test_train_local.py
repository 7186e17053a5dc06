"""The same worker loop without Ray: exact resume on every ZeRO stage and precision, resuming across
stages, torchrun with two processes, and starting from pretrained weights saved locally."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kilm_ray.train.checkpoint import read_checkpoint

from kilm_ray.config import ConfigError
from kilm_ray.train.env import RunStopped
from kilm_ray.train.local import run_local

from conftest import DUMP, GPT2_BPE, REPO

STEPS = 8


@pytest.fixture(scope="module")
def local_cfg(tiny_config):
    return tiny_config.with_overrides({
        "train.max_steps": STEPS, "train.checkpoint_every": 4, "train.log_every": 4, "train.eval_every": 8,
        "train.eval_max_samples": 16, "train.num_workers": 1, "train.keep_checkpoints": 3,
    })


def tensors(path: Path, part: str = "weights") -> dict:
    """Full tensors of a checkpoint, stitched from its shards."""
    return getattr(read_checkpoint(path), part)


def assert_same_state(a: Path, b: Path) -> None:
    for part in ("weights", "moments"):
        ta, tb = tensors(a, part), tensors(b, part)
        assert ta.keys() == tb.keys() and ta
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{part} differ"


@pytest.mark.parametrize("overrides", [
    {"train.zero_stage": 0},
    {"train.zero_stage": 1},
    {"train.zero_stage": 3},
    {"train.zero_stage": 2, "train.precision": "bf16"},
], ids=["zero0", "zero1", "zero3", "zero2-bf16"])
def test_resume_is_bit_identical(overrides, local_cfg, tiny_data, tmp_path):
    cfg = local_cfg.with_overrides(overrides)
    run_local(cfg, tiny_data, str(tmp_path / "full"))
    full = tmp_path / "full" / "checkpoints"
    # Simulate a crash after step 4: only the step-4 checkpoint survives (plus a half-written temp).
    shutil.copytree(full / "checkpoint_00000004", tmp_path / "crashed" / "checkpoints" / "checkpoint_00000004")
    partial = tmp_path / "crashed" / "checkpoints" / ".tmp-checkpoint_00000008-1-1"
    partial.mkdir()
    (partial / "model-00000-of-00001.safetensors").write_bytes(b"half a file")
    run_local(cfg, tiny_data, str(tmp_path / "crashed"))
    assert_same_state(full / f"checkpoint_{STEPS:08d}", tmp_path / "crashed" / "checkpoints" / f"checkpoint_{STEPS:08d}")
    assert not partial.exists()  # the torn temporary was never used and is cleaned up
    logged = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert not any("loss_scale" in row for row in logged)  # fp16 only; these runs are fp32 / bf16


def test_resume_on_another_zero_stage(local_cfg, tiny_data, tmp_path):
    """The checkpoint is consolidated: a ZeRO-2 run continues under ZeRO-0 and ends where the ZeRO-2
    run ends (float-equal: ZeRO-2 and ZeRO-0 reduce gradients in different bucket orders)."""
    run_local(local_cfg.with_overrides({"train.zero_stage": 2}), tiny_data, str(tmp_path / "z2"))
    shutil.copytree(tmp_path / "z2" / "checkpoints" / "checkpoint_00000004",
                    tmp_path / "mixed" / "checkpoints" / "checkpoint_00000004")
    run_local(local_cfg.with_overrides({"train.zero_stage": 0}), tiny_data, str(tmp_path / "mixed"))
    a = tensors(tmp_path / "z2" / "checkpoints" / f"checkpoint_{STEPS:08d}")
    b = tensors(tmp_path / "mixed" / "checkpoints" / f"checkpoint_{STEPS:08d}")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_without_ray(local_cfg, tiny_data, tmp_path):
    """``kilm-ray train --no-ray`` under torchrun: 2 processes, gloo, the same loop and checkpoints.
    The mini preset's embedding fits in rank 0's ZeRO-2 partition alone: checkpointing must not let
    the ranks take different collective paths."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kilm_ray.cli", "train", "--no-ray", "--data", tiny_data, "--run-dir", str(tmp_path / "tr"),
           "--config", str(REPO / "configs" / "tiny.yaml"), f"train.max_steps={STEPS}", "train.checkpoint_every=4",
           "train.log_every=4", "train.eval_every=8", "train.eval_max_samples=16", "train.num_workers=2",
           "model.preset=mini", "train.eval_generate_samples=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "tr" / "checkpoints" / f"checkpoint_{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == STEPS
    assert (tmp_path / "tr" / "export" / "model.safetensors").is_file()
    # The same run in one process, elastic between 1 and 2 workers: the global batch is dealt to 2
    # shares whatever the worker count, so one worker computes the same micro-batches and the same
    # update (two micro-batch gradients a step: a + b on one worker, b + a across two): bit-identical.
    single = [sys.executable, "-m", "kilm_ray.cli", *cmd[cmd.index("kilm_ray.cli") + 1:], "train.num_workers=[1,2]",
              "train.export_at_end=false"]
    single[single.index("--run-dir") + 1] = str(tmp_path / "one")
    proc = subprocess.run(single, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_state(tmp_path / "tr" / "checkpoints" / f"checkpoint_{STEPS:08d}",
                      tmp_path / "one" / "checkpoints" / f"checkpoint_{STEPS:08d}")


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, shared_data):
    """A locally saved 'pretrained' BART with the GPT-2 BPE tokenizer, as facebook/bart-base is laid out."""
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizerFast

    out = tmp_path_factory.mktemp("pretrained-bart")
    tokenizer = BartTokenizerFast(vocab=str(GPT2_BPE / "encoder.json"), merges=str(GPT2_BPE / "vocab.bpe"))
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_continue_pretraining_from_a_local_pretrained_model(pretrained_dir, local_cfg, ray_cluster, tmp_path):
    from transformers import BartForConditionalGeneration

    from kilm_ray.data.plan import preprocess

    source = tmp_path / "bart"  # a copy that goes away before the resume below
    shutil.copytree(pretrained_dir, source)
    cfg = local_cfg.with_overrides({"tokenizer.source": str(source), "model.pretrained": str(source),
                                    "corpus.max_pages": 40, "train.max_steps": 4, "train.eval_every": 4,
                                    "train.checkpoint_every": 2, "train.epochs": 20})
    data = tmp_path / "data"
    preprocess(cfg, [str(DUMP)], str(data))
    run_local(cfg, str(data), str(tmp_path / "run"))
    # A resume (and its export) reads nothing of model.pretrained: the source is gone, and with it any
    # way to load it (a missing local path would be tried as a hub id and fail here, offline).
    shutil.copytree(tmp_path / "run" / "checkpoints" / "checkpoint_00000002",
                    tmp_path / "resumed" / "checkpoints" / "checkpoint_00000002")
    shutil.rmtree(source)
    run_local(cfg, str(data), str(tmp_path / "resumed"))
    assert_same_state(tmp_path / "run" / "checkpoints" / "checkpoint_00000004",
                      tmp_path / "resumed" / "checkpoints" / "checkpoint_00000004")
    cfg = cfg.with_overrides({"tokenizer.source": str(pretrained_dir), "model.pretrained": str(pretrained_dir)})
    before = BartForConditionalGeneration.from_pretrained(pretrained_dir)
    after = BartForConditionalGeneration.from_pretrained(tmp_path / "resumed" / "export")
    old_vocab = before.config.vocab_size
    assert after.config.vocab_size >= old_vocab + 5  # the five KILM tokens got embeddings
    assert after.config.d_model == 32  # the pretrained architecture, not the preset
    # Old rows moved only by a few small steps from the pretrained values; new rows exist.
    drift = (after.model.shared.weight[:old_vocab] - before.model.shared.weight).abs().max()
    assert 0 < drift < 0.05
    # Data tokenized differently from the pretrained weights is refused with a clear error.
    bpe_data = tmp_path / "bpe-data"
    preprocess(local_cfg.with_overrides({"corpus.max_pages": 30}), [str(DUMP)], str(bpe_data))
    with pytest.raises(ConfigError, match="does not match model.pretrained"):
        run_local(cfg, str(bpe_data), str(tmp_path / "bad"))


def test_export_command_local_and_s3(local_cfg, tiny_data, tmp_path, s3_server):
    """`kilm-ray export`: a checkpoint -> a Hugging Face directory (also to s3://) whose weights are the
    checkpoint's fp32 master weights, loadable by plain transformers."""
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from kilm_ray import storage
    from kilm_ray.cli import main

    run_local(local_cfg.with_overrides({"train.max_steps": 4, "train.export_at_end": False}), tiny_data,
              str(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint_00000004"
    assert not (tmp_path / "run" / "export").exists()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    model = BartForConditionalGeneration.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    weights = tensors(ckpt)
    assert torch.equal(model.model.shared.weight, weights["model.shared.weight"])
    assert tokenizer.convert_tokens_to_ids("<ent_desc>") != tokenizer.unk_token_id
    meta = json.loads((tmp_path / "hf" / "kilm_ray.json").read_text())
    assert meta["step"] == 4 and meta["checkpoint"] == str(ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--out", "s3://kilm/exports/tiny"]) == 0
    assert storage.exists("s3://kilm/exports/tiny/model.safetensors")
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2


def test_time_based_checkpoints_and_resume_refuses_other_data_or_settings(local_cfg, tiny_data, tmp_path):
    """train.checkpoint_every_minutes checkpoints on rank 0's clock (agreed by all ranks); a resume whose
    dataset, seed or schedule differs from the checkpoint's is refused by name, not silently shifted."""
    from kilm_ray.train.checkpoint import resume_conflicts

    cfg = local_cfg.with_overrides({"train.max_steps": 3, "train.checkpoint_every": 100, "train.log_every": 100,
                                    "train.eval_every": 0, "train.checkpoint_every_minutes": 1e-6})
    run_local(cfg, tiny_data, str(tmp_path / "run"))
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("checkpoint_*"))
    assert saved == ["checkpoint_00000001", "checkpoint_00000002", "checkpoint_00000003"]
    state = json.loads((tmp_path / "run" / "checkpoints" / saved[-1] / "trainer_state.json").read_text())
    assert state["dataset"] and state["seed"] == cfg.train.seed and state["total_steps"] == 3
    with pytest.raises(ConfigError, match=r"seed: checkpoint \d+, now 4242.*start a new run"):
        run_local(cfg.with_overrides({"train.seed": 4242}), tiny_data, str(tmp_path / "run"))
    assert resume_conflicts({"dataset": "a", "seed": 1}, {"dataset": "b", "seed": 1, "total_steps": 9}) == [
        "dataset: checkpoint 'a', now 'b'"]


def test_restarts_that_make_no_progress_stop_the_run(local_cfg, tiny_data, tmp_path):
    """An unlimited-retry run stops (rather than loops) once it restarted too often from one checkpoint."""
    from kilm_ray.train.loop import restarts_without_progress

    assert restarts_without_progress(None, 0) == {"start_step": 0, "without_progress": 0}
    assert restarts_without_progress({"start_step": 4, "without_progress": 2}, 4)["without_progress"] == 3
    assert restarts_without_progress({"start_step": 4, "without_progress": 2}, 8)["without_progress"] == 0
    run = tmp_path / "stalled"
    run.mkdir()
    (run / "restarts.json").write_text(json.dumps({"start_step": 0, "without_progress": 2}))
    (run / "last_error.json").write_text(json.dumps({"rank": 1, "step": 3, "error": "RuntimeError: boom"}))
    with pytest.raises(RunStopped, match=r"3 restarts in a row from step 0 made no progress.*rank 1 at step 3: "
                                         r"RuntimeError: boom"):
        run_local(local_cfg.with_overrides({"train.max_restarts_without_progress": 2}), tiny_data, str(run))
    assert not (run / "checkpoints" / "checkpoint_00000004").exists()
