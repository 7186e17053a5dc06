"""What every section of the config tree is built from: the error that names a key, documented fields,
range checks."""

from __future__ import annotations

from dataclasses import field
from typing import Any, Optional

from kilm_ray.errors import UserInputError


class ConfigError(UserInputError, ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


def doc(text: str, path: Optional[str] = None, **kwargs: Any) -> Any:
    """A dataclass field whose help text feeds the generated config reference. ``path`` marks a value
    that names a file or directory (see :func:`kilm_ray.config.resolve_local_paths`): ``"local"`` always a path,
    ``"local_or_hub"`` a path when it exists locally, else a hub id."""
    metadata = {"help": text, **({"path": path} if path else {})}
    if "default_factory" in kwargs:
        return field(default_factory=kwargs.pop("default_factory"), metadata=metadata)
    return field(default=kwargs.pop("default"), metadata=metadata)


def check_min(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}: {value!r} must be >= {low}")


def check_range(key: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{key}: {value!r} must be in {bracket}{low}, {high}]")
