"""Uncertainty of held-out figures: bootstrap intervals and paired tests. Pure numpy, seeded, so a
report regenerated from the same per-item scores prints the same intervals.

- :func:`interval`: the mean of per-item scores with a percentile bootstrap 95% interval (items
  resampled with replacement).
- :func:`ratio_interval`: a ratio of sums (a token-weighted loss: loss sum / tokens over chunks), or of
  two models' means on the same items (KILM as a fraction of the memory ceiling), items resampled
  jointly.
- :func:`paired_test`: two models on the same items: the mean difference with its bootstrap interval
  and a two-sided paired randomization (sign-flip) p-value.
- :func:`claim`: what may be said of two figures: a difference only where their intervals do not
  overlap (and the paired interval excludes zero); otherwise none.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng([int(seed), n, 0xB007]).integers(0, n, size=(resamples, n))


def _bounds(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def interval(values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES,
             level: float = LEVEL) -> dict[str, float]:
    """``{"mean", "low", "high", "n"}``: the mean and its percentile bootstrap interval (NaN when empty;
    a single item's interval is the item)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    means = x[_indices(x.size, resamples, seed)].mean(axis=1)
    low, high = _bounds(means, level)
    return {"mean": float(x.mean()), "low": low, "high": high, "n": int(x.size)}


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float], seed: int = 0,
                   resamples: int = RESAMPLES, level: float = LEVEL) -> dict[str, float]:
    """``sum(numerators) / sum(denominators)`` with a bootstrap interval over items (pairs resampled
    together). Per-item means of two models on the same items give the ratio of their means."""
    a = np.asarray(numerators, dtype=np.float64)
    b = np.asarray(denominators, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ratio over {a.size} numerators and {b.size} denominators: pair them item by item")
    if a.size == 0 or b.sum() == 0:
        return {"ratio": float("nan"), "low": float("nan"), "high": float("nan"), "n": int(a.size)}
    idx = _indices(a.size, resamples, seed)
    sa, sb = a[idx].sum(axis=1), b[idx].sum(axis=1)
    ratios = np.divide(sa, sb, out=np.full_like(sa, np.nan), where=sb != 0)
    low, high = _bounds(ratios[~np.isnan(ratios)], level)
    return {"ratio": float(a.sum() / b.sum()), "low": low, "high": high, "n": int(a.size)}


def paired_test(a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = RESAMPLES,
                level: float = LEVEL) -> dict[str, float]:
    """Model A vs model B on the same items (``a[i]`` and ``b[i]`` score item i): the mean difference
    A - B, its bootstrap interval, and the two-sided p-value of a paired randomization test (each
    item's difference keeps its size and gets a random sign; p = share of signed means at least as far
    from zero as the observed one, counting the observed one)."""
    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"a paired test needs the same items: {len(a)} vs {len(b)} scores")
    if x.size == 0:
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "p_value": float("nan"),
                "n": 0}
    means = x[_indices(x.size, resamples, seed)].mean(axis=1)
    low, high = _bounds(means, level)
    signs = np.random.default_rng([int(seed), x.size, 0x519]).choice([-1.0, 1.0], size=(resamples, x.size))
    observed = abs(x.mean())
    extreme = int((np.abs((signs * x).mean(axis=1)) >= observed - 1e-12).sum())
    return {"difference": float(x.mean()), "low": low, "high": high,
            "p_value": (extreme + 1) / (resamples + 1), "n": int(x.size)}


def overlap(x: dict, y: dict) -> bool:
    """Do two intervals (``low``/``high``) overlap?"""
    return not (x["high"] < y["low"] or y["high"] < x["low"])


def claim(x: dict, y: dict, paired: Optional[dict] = None) -> str:
    """``"higher"`` / ``"lower"`` (x against y) only where the intervals do not overlap and the paired
    interval, when given, excludes zero; else ``"no difference claimed"``."""
    if any(v != v for v in (x["low"], x["high"], y["low"], y["high"])) or overlap(x, y):
        return "no difference claimed"
    if paired is not None and paired["low"] <= 0 <= paired["high"]:
        return "no difference claimed"
    return "higher" if x["mean"] > y["mean"] else "lower"
