"""Checkpoints are verified, not trusted: a missing, truncated or foreign shard, or a tensor whose
elements are not all covered, is refused with the file (or tensor) named, by `read_checkpoint` and by
a run that resumes from it; and the DeepSpeed internals they rely on are version-checked."""

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from kilm_ray.train.checkpoint import CheckpointError, coverage_problem, read_checkpoint
from kilm_ray.train.local import run_local

STEP = 2


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_data, tiny_config):
    """Two short runs (different seeds) of one worker each; their step-2 checkpoints."""
    root = tmp_path_factory.mktemp("ckpt-runs")
    out = []
    for seed in (0, 1):
        cfg = tiny_config.with_overrides({"train.max_steps": STEP, "train.checkpoint_every": STEP, "train.seed": seed,
                                          "train.eval_every": 0, "train.num_workers": 1, "train.export_at_end": False,
                                          "model.preset": "tiny"})
        run_local(cfg, tiny_data, str(root / f"run{seed}"))
        out.append(root / f"run{seed}" / "checkpoints" / f"checkpoint_{STEP:08d}")
    return cfg, out


def _copy(path, tmp_path):
    target = tmp_path / "run" / "checkpoints" / path.name
    shutil.copytree(path, target)
    return target


def test_an_intact_checkpoint_covers_every_parameter_and_both_moments(two_runs):
    ckpt = read_checkpoint(two_runs[1][0])
    params = [k for k in ckpt.weights if not k.startswith("buffer:")]
    assert params and all(f"{m}.{k}" in ckpt.moments for k in params for m in ("exp_avg", "exp_avg_sq"))
    assert ckpt.state["checkpoint_id"].endswith(f"/{STEP}") and ckpt.model_config["d_model"] > 0


def test_a_deleted_shard_is_refused_by_name(two_runs, tmp_path):
    ckpt = _copy(two_runs[1][0], tmp_path)
    (ckpt / "optimizer-00000-of-00001.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard file optimizer-00000-of-00001.safetensors is missing"):
        read_checkpoint(ckpt)


def test_a_truncated_shard_is_refused_by_name_and_a_resume_fails_on_it(two_runs, tmp_path, tiny_data):
    cfg, (a, _) = two_runs
    ckpt = _copy(a, tmp_path)
    shard = ckpt / "model-00000-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model-00000-of-00001\.safetensors: unreadable shard \(truncated"):
        read_checkpoint(ckpt)
    # A run that would resume from it stops there, naming the file, before it trains on garbage.
    with pytest.raises(CheckpointError, match="model-00000-of-00001.safetensors"):
        run_local(cfg.with_overrides({"train.max_steps": STEP + 1}), tiny_data, str(tmp_path / "run"))


def test_a_shard_of_another_run_is_refused_by_name(two_runs, tmp_path):
    a, b = two_runs[1]
    ckpt = _copy(a, tmp_path)
    shutil.copy(b / "model-00000-of-00001.safetensors", ckpt / "model-00000-of-00001.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00000-of-00001\.safetensors: this shard belongs to checkpoint "
                                              r"'[0-9a-f]+/2', not to '[0-9a-f]+/2'"):
        read_checkpoint(ckpt)


def test_a_shard_missing_pieces_is_refused_naming_the_tensor(two_runs, tmp_path):
    ckpt = _copy(two_runs[1][0], tmp_path)
    path = ckpt / "optimizer-00000-of-00001.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    dropped = next(k for k in sorted(tensors) if k.startswith("exp_avg_sq."))
    kept = tensors.pop(dropped)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=f"{dropped.rpartition('@')[0]} is in none of the optimizer"):
        read_checkpoint(ckpt)
    # Half a tensor: its second half is in no shard.
    name = next(k for k in sorted(tensors) if k.startswith("exp_avg.") and tensors[k].numel() > 1)
    tensors[dropped] = kept
    tensors[name] = tensors[name][: tensors[name].numel() // 2].clone()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"{name.rpartition('@')[0]}: elements \[\d+, \d+\) are in no shard"):
        read_checkpoint(ckpt)


def test_coverage_problems():
    assert coverage_problem([(0, 4, "a"), (4, 6, "b")], 10) is None
    assert coverage_problem([(4, 6, "b"), (0, 4, "a")], 10) is None  # pieces in any order
    assert coverage_problem([(0, 4, "a"), (6, 4, "b")], 10) == "elements [4, 6) are in no shard (next piece from b)"
    assert coverage_problem([(0, 6, "a"), (4, 6, "b")], 10) == "elements [4, 6) are in two shards (one is b)"
    assert coverage_problem([(0, 4, "a")], 10) == "elements [4, 10) are in no shard (pieces from a)"


def test_the_state_file_announces_what_must_be_there(two_runs, tmp_path):
    ckpt = _copy(two_runs[1][0], tmp_path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "checkpoint_shards": 2}))
    with pytest.raises(CheckpointError, match="shard file model-00000-of-00002.safetensors is missing"):
        read_checkpoint(ckpt)


def test_untested_deepspeed_is_refused_clearly(monkeypatch):
    from kilm_ray.train.zero import ALLOW_UNTESTED, UntestedDeepSpeed, check_version

    check_version()  # the installed one is tested
    monkeypatch.delenv(ALLOW_UNTESTED, raising=False)
    with pytest.raises(UntestedDeepSpeed, match=r"DeepSpeed 0\.20\.1 is not one kilm_ray's checkpoints were tested "
                                                r"with \(0\.19\.8\).*KILM_RAY_ALLOW_UNTESTED_DEEPSPEED=1"):
        check_version("0.20.1")
    monkeypatch.setenv(ALLOW_UNTESTED, "1")
    check_version("0.20.1")
