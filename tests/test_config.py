"""The typed config tree: YAML + dotted overrides, and errors that name the bad key."""

from pathlib import Path

import pytest

from kilm_ray.config import ConfigError, KilmConfig, config_reference_markdown, load_config

from conftest import REPO, TINY_CONFIG


def test_defaults_are_the_official_kilm_hyperparameters():
    cfg = KilmConfig().validate()
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps) == (5e-5, 0.01, 0)
    assert (cfg.masking.mask_ratio, cfg.masking.poisson_lambda) == (0.3, 3.0)
    assert (cfg.data.max_source_tokens, cfg.max_positions) == (512, 640)


def test_yaml_then_overrides_with_types():
    cfg = load_config(TINY_CONFIG, ["train.lr=1e-4", "train.num_workers=[1,2]", "model.pretrained=/x/bart",
                                    "masking.mask_ratio=0.2", "tune.search_space.train.lr={kind: choice, values: [0.1]}"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.worker_bounds == (1, 2)
    assert cfg.model.pretrained == "/x/bart"
    assert cfg.tune.search_space["train.lr"].values == [0.1]
    assert cfg.train.global_batch_size == 16  # from tiny.yaml


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("train.lr=fast", "train.lr: 'fast' should be a number"),
    ("train.zero_stage=5", "train.zero_stage: 5 is not one of 0, 1, 2, 3"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of ['fp32', 'fp16', 'bf16']"),
    ("masking.mask_ratio=1.5", "masking.mask_ratio: 1.5 must be in [0.0, 0.95]"),
    ("train.epochs=2.5", "train.epochs: 2.5 should be an integer"),
    ("train", "override 'train' is not of the form key=value"),
    ("train=3", "train: expected a mapping, got int"),
    ("tune.search_space.train.nope={kind: uniform}", "'train.nope' is not a searchable config key"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_CONFIG, [override])
    assert message in str(err.value)


def test_bad_yaml_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-4\n  warmpu_steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "train.warmpu_steps" in str(err.value) and "did you mean 'train.warmup_steps'" in str(err.value)
    assert str(bad) in str(err.value)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_is_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name.startswith("serve-deploy"):
            continue  # a Serve deployment file, not a kilm_ray config
        load_config(path)


def test_reference_covers_every_key():
    ref = config_reference_markdown()
    for section, obj in KilmConfig().__dict__.items():
        for key in obj.__dataclass_fields__:
            assert f"`{section}.{key}`" in ref


def test_relative_paths_in_the_config_resolve_where_the_command_was_typed(tmp_path):
    """Ray workers run in directories of their own: the driver settles every relative path first."""
    from kilm_ray.config import resolve_local_paths

    (tmp_path / "bart").mkdir()
    cfg = load_config(None, ["tokenizer.source=gpt2-bpe:bpe", "model.pretrained=bart", "eval.qa_file=qa.tsv",
                             "train.node_cache_dir=~/cache"])
    resolved = resolve_local_paths(cfg, tmp_path)
    assert resolved.tokenizer.source == f"gpt2-bpe:{tmp_path / 'bpe'}"
    assert resolved.model.pretrained == str(tmp_path / "bart")  # exists here: a local directory
    assert resolved.eval.qa_file == str(tmp_path / "qa.tsv")
    assert resolved.train.node_cache_dir == str(Path("~/cache").expanduser())
    hub = resolve_local_paths(load_config(None, ["model.pretrained=facebook/bart-base",
                                                 "tokenizer.source=train"]), tmp_path)
    assert hub.model.pretrained == "facebook/bart-base" and hub.tokenizer.source == "train"  # not paths here
    remote = resolve_local_paths(load_config(None, ["eval.qa_file=s3://bucket/qa.tsv"]), tmp_path)
    assert remote.eval.qa_file == "s3://bucket/qa.tsv" and cfg.eval.qa_file == "qa.tsv"  # a copy; URIs kept


def test_cli_resolves_path_arguments_on_the_driver(tmp_path, monkeypatch):
    """Every path argument of every command is made absolute before anything reaches Ray; in a job of
    `ray job submit` (which runs in Ray's temporary copy of the working directory) a relative output is
    refused with a message that says why and what to give instead."""
    from kilm_ray.cli import absolute_path_arguments, build_parser
    from kilm_ray.errors import UsageError

    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    args = absolute_path_arguments(parser.parse_args(
        ["preprocess", "--dump", "a.xml.bz2,s3://b/c.bz2", "--dump", "d/*.bz2", "--out", "runs/data",
         "--knowledge", "kb.jsonl", "--config", "configs/x.yaml"]))
    assert args.dump == [f"{tmp_path}/a.xml.bz2,s3://b/c.bz2", f"{tmp_path}/d/*.bz2"]
    assert (args.out, args.knowledge, args.config) == (
        f"{tmp_path}/runs/data", [f"{tmp_path}/kb.jsonl"], f"{tmp_path}/configs/x.yaml")
    args = absolute_path_arguments(parser.parse_args(
        ["eval", "--model", "m", "--data", "d", "--report", "r", "--run", "runs/x", "--qa", "q.tsv"]))
    assert [args.model, args.data, args.report, args.run, args.qa] == [str(tmp_path / p) for p in
                                                                       ("m", "d", "r", "runs/x", "q.tsv")]
    train = ["train", "--data", "configs/../d", "--run-dir", "s3://bkt/runs"]
    args = absolute_path_arguments(parser.parse_args(train), in_submitted_job=True)
    assert args.data == str(tmp_path / "d") and args.run_dir == "s3://bkt/runs"  # inputs: the job's copy
    with pytest.raises(UsageError, match=r"--run-dir runs: a relative path in a job of `ray job submit`.*"
                                         r"s3://\.\.\. or an absolute path"):
        absolute_path_arguments(parser.parse_args(["train", "--data", "d", "--run-dir", "runs"]),
                                in_submitted_job=True)


def test_fp16_gradients_accumulate_in_fp32_where_deepspeed_offers_it():
    from kilm_ray.train.deepspeed_config import deepspeed_config

    v100 = load_config(REPO / "configs" / "bart-base-v100.yaml").train
    assert v100.precision == "fp16" and v100.fp16_grad_accum == "fp32"
    ds = deepspeed_config(v100, 8, 128, True)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    plain = load_config(TINY_CONFIG, ["train.precision=fp16", "train.zero_stage=1"]).train
    assert not {"data_types", "communication_data_type"} & set(deepspeed_config(plain, 1, 1, False))  # fp16 sums
    with pytest.raises(ConfigError, match="train.fp16_grad_accum: fp32 needs train.zero_stage 1 or 2"):
        load_config(TINY_CONFIG, ["train.precision=fp16", "train.zero_stage=3", "train.fp16_grad_accum=fp32"])
