"""The typed config tree: YAML + dotted overrides, and errors that name the bad key."""

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
