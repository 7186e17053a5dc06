"""The tune section: the search space, the search and ASHA's early stopping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kilm_ray.config.fields import ConfigError, check_min, check_range, doc


@dataclass
class SearchParam:
    kind: Literal["loguniform", "uniform", "choice", "randint", "grid"] = doc(
        "Distribution; 'grid' tries every value (times tune.num_samples).", default="uniform")
    low: float = doc("Lower bound (loguniform/uniform/randint).", default=0.0)
    high: float = doc("Upper bound (loguniform/uniform/randint, exclusive for randint).", default=1.0)
    values: list[Any] = doc("Candidates (choice).", default_factory=list)

    def validate(self, path: str) -> None:
        if self.kind in ("choice", "grid"):
            if not self.values:
                raise ConfigError(f"{path}.values: a {self.kind} needs at least one value")
        elif not self.low < self.high:
            raise ConfigError(f"{path}: low={self.low} must be < high={self.high}")
        if self.kind == "loguniform" and self.low <= 0:
            raise ConfigError(f"{path}.low: loguniform needs low > 0, got {self.low}")


def _default_search_space() -> dict[str, SearchParam]:
    return {
        "train.lr": SearchParam(kind="loguniform", low=1e-5, high=1e-3),
        "masking.mask_ratio": SearchParam(kind="uniform", low=0.15, high=0.45),
        "masking.poisson_lambda": SearchParam(kind="choice", values=[2.0, 3.0, 4.0]),
        "masking.knowledge_loss_weight": SearchParam(kind="choice", values=[1.0, 2.0, 4.0]),
    }


@dataclass
class TuneConfig:
    num_samples: int = doc("Trials to run.", default=8)
    max_concurrent_trials: int = doc(
        "Trials at once (0 = as many trials' worker groups as the cluster's free resources hold at the start).",
        default=0)
    search_alg: Literal["random", "optuna"] = doc(
        "'random': random/grid sampling of search_space; 'optuna': Bayesian optimisation (TPE) through "
        "Ray Tune's Optuna integration (no grid kinds). ASHA stops weak trials in both.", default="random")
    metric: Literal["valid_loss", "valid_knowledge_loss", "valid_text_loss", "description_accuracy"] = doc(
        "Objective: loss on the valid split's mentions (all tokens, or the knowledge slots), text-infilling "
        "loss on valid text, or title accuracy of generated descriptions on valid mentions (needs "
        "train.eval_generate_samples > 0). valid is held out of training; test is kept for kilm-ray eval.",
        default="valid_loss",
    )
    grace_period: int = doc("ASHA: validations a trial gets before it can be stopped.", default=1)
    reduction_factor: float = doc("ASHA: keep the top 1/reduction_factor at each rung.", default=2.0)
    search_space: dict[str, SearchParam] = doc(
        "Dotted config key -> distribution. Any numeric or choice key of the tree can be searched.",
        default_factory=_default_search_space,
    )
    trial_cpus: float = doc("CPUs reserved by each trial's driver function (not its workers).", default=0.01)

    def validate(self, path: str) -> None:
        # That each key names a leaf of the tree is checked at the root (KilmConfig.validate).
        check_min(f"{path}.num_samples", self.num_samples, 1)
        check_min(f"{path}.max_concurrent_trials", self.max_concurrent_trials, 0)
        check_min(f"{path}.grace_period", self.grace_period, 1)
        check_range(f"{path}.reduction_factor", self.reduction_factor, 1.0, 100.0, low_open=True)
        for key, param in self.search_space.items():
            param.validate(f"{path}.search_space.{key}")
            if self.search_alg == "optuna" and param.kind == "grid":
                raise ConfigError(f"{path}.search_space.{key}: kind 'grid' needs {path}.search_alg=random "
                                  "(Optuna samples; use kind 'choice')")
