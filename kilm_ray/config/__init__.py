"""One typed configuration tree for every kilm_ray command: its root (``KilmConfig``), loading, overrides
and the generated reference. The sections live beside it, one file per stage that owns them:
``data.py`` (corpus, tokenizer, data, masking), ``train.py`` (model, train), ``tune.py``, ``serve.py``,
``eval.py`` (eval, demo); ``fields.py`` has what they are built from.

A config is built from dataclass defaults, then a YAML file, then dotted ``key=value`` overrides
(``train.lr=1e-4``). Every step validates: an unknown key, a value of the wrong type or out of range
raises :class:`ConfigError` naming the dotted key (and the file), with a suggestion for typos.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from kilm_ray.config.data import CorpusConfig, DataConfig, MaskingConfig, TokenizerConfig
from kilm_ray.config.eval import DemoConfig, EvalConfig
from kilm_ray.config.fields import ConfigError
from kilm_ray.config.serve import ServeConfig
from kilm_ray.config.train import MODEL_PRESETS, ModelConfig, TrainConfig
from kilm_ray.config.tune import SearchParam, TuneConfig

__all__ = [
    "MODEL_PRESETS", "ConfigError", "CorpusConfig", "DataConfig", "DemoConfig", "EvalConfig", "KilmConfig",
    "MaskingConfig", "ModelConfig", "SearchParam", "ServeConfig", "TokenizerConfig", "TrainConfig", "TuneConfig",
    "config_from_dict", "config_reference_markdown", "load_config", "parse_override", "resolve_local_paths",
]


@dataclass
class KilmConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def validate(self) -> "KilmConfig":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        for key in self.tune.search_space:
            if key.startswith("tune.") or not _is_leaf_key(key):
                raise ConfigError(f"tune.search_space: {key!r} is not a searchable config key")
        if self.data.max_knowledge_tokens >= self.data.max_source_tokens * 4:
            raise ConfigError("data.max_knowledge_tokens: unreasonably long next to data.max_source_tokens")
        return self

    @property
    def max_positions(self) -> int:
        """Longest sequence the model sees: a target with ``masking.entities_per_chunk`` filled slots
        (each ``<ent></ent><ent_desc></ent_desc>`` + knowledge) around the chunk text."""
        k = self.masking.entities_per_chunk
        longest = self.data.max_text_tokens + 2 + k * (self.data.max_knowledge_tokens + 4)
        return -(-longest // 8) * 8  # batches are padded to a multiple of 8

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any]) -> "KilmConfig":
        """A copy with dotted-key overrides applied (values already typed, e.g. from Tune)."""
        new = copy.deepcopy(self)
        for key, value in overrides.items():
            _set_dotted(new, key, value, source="override")
        return new.validate()


# ----------------------------------------------------------------------------------------------
# Loading, overrides, coercion
# ----------------------------------------------------------------------------------------------


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> KilmConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, validated. ``path=None`` gives defaults."""
    cfg = KilmConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        cfg = _build(KilmConfig, data, "", str(path))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(cfg, key, value, source="command line")
    return cfg.validate()


def resolve_local_paths(cfg: KilmConfig, base: str | Path) -> KilmConfig:
    """``cfg`` with every relative local path made absolute against ``base`` (where the user typed the
    command). Ray workers run in directories of their own, so a relative path must be settled on the
    driver before the config is shipped to them. URIs (``s3://``), ``train`` and hub ids that name
    nothing on the local disk stay as they are; ``gpt2-bpe:DIR`` resolves its ``DIR``."""
    new = copy.deepcopy(cfg)
    for section in dataclasses.fields(new):
        node = getattr(new, section.name)
        for f in dataclasses.fields(node):
            kind, value = f.metadata.get("path"), getattr(node, f.name)
            if kind and isinstance(value, str) and value:
                setattr(node, f.name, _absolute_path(value, Path(base), must_exist=kind == "local_or_hub"))
    return new


def _absolute_path(value: str, base: Path, must_exist: bool) -> str:
    prefix, _, rest = value.partition(":")
    if rest and "/" not in prefix and not rest.startswith("//"):  # a scheme of ours: gpt2-bpe:DIR
        return f"{prefix}:{_absolute_path(rest, base, must_exist=False)}"
    if "://" in value or value == "train":
        return value
    candidate = base / Path(value).expanduser()
    if must_exist and not candidate.exists():
        return value  # a hub id such as facebook/bart-base
    return str(candidate.resolve())


def config_from_dict(data: dict[str, Any], source: str = "dict") -> KilmConfig:
    return _build(KilmConfig, data, "", source).validate()


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(cfg: KilmConfig, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, dict):  # e.g. tune.search_space.<dotted key>
            rest = ".".join(parts[depth:])
            hint = _type_of_dict_values(cfg, ".".join(parts[:depth]))
            node[rest] = _coerce(value, hint, key, source)
            return
        names = {f.name: f for f in dataclasses.fields(node)}
        if part not in names:
            raise ConfigError(_unknown_key_message(here, part, names, source))
        hints = typing.get_type_hints(type(node))
        if depth == len(parts) - 1:
            setattr(node, part, _coerce(value, hints[part], here, source))
            return
        node = getattr(node, part)
    raise ConfigError(f"{key}: is a section, not a value ({source})")


def _type_of_dict_values(cfg: KilmConfig, section_key: str) -> Any:
    parent_key, _, attr = section_key.rpartition(".")
    parent = cfg
    for part in parent_key.split(".") if parent_key else []:
        parent = getattr(parent, part)
    hint = typing.get_type_hints(type(parent))[attr]
    return typing.get_args(hint)[1]


# Keys that existed once, with why they went and what replaces them.
REMOVED_KEYS = {
    "serve.auth_token": "removed: a token in the config shows in Serve's application config (the dashboard); put "
                        "it in the environment variable named by serve.auth_token_env (KILM_SERVE_TOKEN) or in a "
                        "file named by serve.auth_token_file (a mounted Kubernetes Secret)",
}


def _unknown_key_message(here: str, part: str, names: dict, source: str) -> str:
    if here in REMOVED_KEYS:
        return f"config key '{here}': {REMOVED_KEYS[here]} [{source}]"
    close = difflib.get_close_matches(part, list(names), n=1)
    prefix = here.rsplit(".", 1)[0] + "." if "." in here else ""
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(sorted(names))})"
    return f"unknown config key '{here}'{hint} [{source}]"


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} [{source}]")
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    obj = cls()
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(_unknown_key_message(here, str(key), names, source))
        setattr(obj, key, _coerce(value, hints[key], here, source))
    return obj


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``hint``; convert where unambiguous (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    where = f"{key}: {value!r}"
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return _build(hint, value, key, source)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where} does not fit {_type_name(hint)} [{source}]")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} is not one of {list(args)} [{source}]")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} should be a list [{source}]")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} should be a mapping [{source}]")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} should be true or false [{source}]")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} should be an integer [{source}]")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where} should be a number [{source}]")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} should be a string [{source}]")
    raise ConfigError(f"{key}: unsupported type {_type_name(hint)} [{source}]")


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")




def _is_leaf_key(key: str) -> bool:
    parts = key.split(".")
    node: Any = KilmConfig()
    for part in parts:
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return not dataclasses.is_dataclass(node)


# ----------------------------------------------------------------------------------------------
# Reference documentation, generated so it cannot drift from the code
# ----------------------------------------------------------------------------------------------


def config_reference_markdown() -> str:
    """A Markdown table per section: key, type, default, meaning."""
    lines: list[str] = []
    root = KilmConfig()
    for section in dataclasses.fields(root):
        obj = getattr(root, section.name)
        lines.append(f"#### `{section.name}`\n")
        lines.append("| key | type | default | meaning |")
        lines.append("| --- | --- | --- | --- |")
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            if isinstance(default, dict) and default and all(dataclasses.is_dataclass(v) for v in default.values()):
                shown = ", ".join(f"{k}: {v.kind}" for k, v in default.items())
            else:
                shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            type_name = _type_name(hints[f.name]).replace("|", "\\|")
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | {type_name} | `{shown}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)
