"""Ray Tune over masking and learning-rate settings (Ray Train V2 pattern).

Each trial is a function that builds and fits a TorchTrainer running the usual worker loop, with
``TuneReportCallback`` forwarding its validation reports to Tune (only those: a checkpoint taken on
a preemption notice, the clock or room to grow reports training metrics alone, which Tune's strict
metric check, ASHA and Optuna cannot take); ASHA stops weak trials early.
Masking is applied on the fly, so trials share one preprocessed dataset. An interrupted search is
restored with ``Tuner.restore`` (finished trials are not rerun). Outputs in ``<run-dir>/<name>/``:
``trials.csv`` / ``trials.json``, ``best.yaml`` (a config ``kilm-ray train --config`` takes as is) and
``validation.png``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from kilm_ray import storage
from kilm_ray.config import ConfigError, KilmConfig, SearchParam, config_from_dict

log = logging.getLogger("kilm_ray.tune")

METRICS = {  # tune.metric -> (reported key, mode)
    "valid_loss": ("valid_loss", "min"),
    "valid_knowledge_loss": ("valid_knowledge_loss", "min"),
    "valid_text_loss": ("valid_text_loss", "min"),
    "description_accuracy": ("description_accuracy", "max"),
}


def search_space(params: dict[str, SearchParam]) -> dict[str, Any]:
    """Config distributions -> Tune's (keys stay dotted config keys)."""
    from ray import tune

    space = {}
    for key, p in params.items():
        if p.kind == "loguniform":
            space[key] = tune.loguniform(p.low, p.high)
        elif p.kind == "uniform":
            space[key] = tune.uniform(p.low, p.high)
        elif p.kind == "randint":
            space[key] = tune.randint(int(p.low), int(p.high))
        elif p.kind == "grid":
            space[key] = tune.grid_search(list(p.values))
        else:
            space[key] = tune.choice(list(p.values))
    return space


def trial_config(cfg: KilmConfig) -> KilmConfig:
    """The base config adjusted so that every report a trial makes carries the objective: reports
    (and checkpoints) happen on validation steps only."""
    t = cfg.train
    if t.eval_every <= 0:
        raise ConfigError("train.eval_every must be > 0 for tuning (ASHA compares validations)")
    if cfg.tune.metric == "description_accuracy" and t.eval_generate_samples <= 0:
        raise ConfigError("tune.metric=description_accuracy needs train.eval_generate_samples > 0")
    every = max(1, round(t.checkpoint_every / t.eval_every)) * t.eval_every
    return cfg.with_overrides({"train.log_every": t.eval_every, "train.checkpoint_every": every,
                               "train.export_at_end": False})


def _trial(params: dict) -> None:
    """One trial: the base config + sampled values -> a Ray Train run reporting to Tune."""
    from ray import tune

    from kilm_ray.train.ray_trainer import build_trainer, fit

    base = config_from_dict(params["base_config"], source="tune base config")
    sampled = {k: v for k, v in params.items() if k not in ("base_config", "data_dir", "trials_uri")}
    cfg = base.with_overrides(sampled)
    name = tune.get_context().get_trial_id()
    report = ReportMetric(METRICS[cfg.tune.metric][0])
    trainer = build_trainer(cfg, params["data_dir"], params["trials_uri"], name, callbacks=[report])
    fit(trainer, cfg)


class ReportMetric(TuneReportCallback):
    """Ray's Train -> Tune bridge, forwarding only the reports that carry the search's metric. The others
    (the training metrics of a checkpoint taken on a preemption notice -- saved before its step's
    validation -- the clock or room to grow, between validations) would fail Tune's strict metric check
    and Optuna's ``result[metric]``."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class ReleaseStoppedTrials(Callback):
    """A Tune callback that frees the worker groups of trials Tune stopped.

    Ray 2.60 workaround: stopping a trial (ASHA, an error, a cancel) kills the trial's actor and with it
    the Train controller it owns, but the controller's placement group is scoped to the job, so it stays
    reserved until the search ends. Ray's own ``PlacementGroupCleaner`` is meant to remove it, but it
    asks the dashboard's state API whether the controller is alive and, on a Ray without a dashboard
    (our local default), only logs "Failed to query Ray Train Controller actor state" forever. This
    reads the GCS after every Tune step (rate-limited) instead. Module-level: Tune pickles its run
    config, callbacks included, for ``Tuner.restore``.
    """

    def __init__(self, interval_s: float = 1.0):
        self.interval_s, self.last, self.released = interval_s, 0.0, 0

    def sweep(self, force: bool = False) -> None:
        from kilm_ray.train.resources import release_orphaned_placement_groups

        if force or time.monotonic() - self.last >= self.interval_s:
            self.last = time.monotonic()
            self.released += len(release_orphaned_placement_groups())

    def on_step_end(self, iteration, trials, **info):
        self.sweep()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.sweep(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.sweep(force=True)

    def on_experiment_end(self, trials, **info):
        self.sweep(force=True)


def concurrent_trials(cfg: KilmConfig) -> int:
    """``tune.max_concurrent_trials``, or (0) as many trials' worker groups as the free resources of the
    cluster hold now. Tune itself only sees each trial's driver function (a sliver of a CPU), so left
    alone it starts trials whose workers cannot be placed."""
    import ray

    from kilm_ray.train.resources import runs_that_fit, worker_request

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    request = worker_request(cfg.train)
    fit_now = runs_that_fit(ray.available_resources(), request, cfg.tune.trial_cpus)
    if fit_now < 1:
        log.warning("not even one trial's workers (%s) fit the free resources %s now; running one trial at a "
                    "time (train.worker_start_timeout_s bounds the wait for nodes)", request.describe(),
                    {k: v for k, v in ray.available_resources().items() if k in request.per_worker})
    log.info("trials at once: %d (each: %s workers + %.2g CPU for its driver)", max(1, fit_now),
             request.describe(), cfg.tune.trial_cpus)
    return max(1, fit_now)


def search_algorithm(cfg: KilmConfig, metric: str, mode: str):
    """None (Tune's random/grid sampling of the param space) or Optuna's TPE."""
    if cfg.tune.search_alg == "random":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=metric, mode=mode, seed=cfg.train.seed)


def run_tune(cfg: KilmConfig, data_dir: str, run_dir: str, name: str) -> dict[str, Any]:
    """Run (or restore and finish) the search; write the tables, best.yaml and the plot."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from kilm_ray.store.loader import verify_tokenizer

    verify_tokenizer(data_dir)  # the trials' ids must mean the tokens of the dataset's tokenizer
    user_cfg, cfg = cfg, trial_config(cfg)
    metric, mode = METRICS[cfg.tune.metric]
    storage_fs, storage_path, root = storage.ray_storage(run_dir, name)
    trainable = tune.with_resources(_trial, {"CPU": cfg.tune.trial_cpus})
    total_steps = _total_steps(cfg, data_dir)
    scheduler = ASHAScheduler(time_attr="step", max_t=total_steps,
                              grace_period=min(cfg.tune.grace_period * cfg.train.eval_every, total_steps),
                              reduction_factor=cfg.tune.reduction_factor)
    run_config = tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                callbacks=[ReleaseStoppedTrials()])
    if tune.Tuner.can_restore(root, storage_filesystem=storage_fs):
        log.info("restoring the search in %s (finished trials are kept)", root)
        # Tune saved the run config (callbacks included) and the search algorithm's state.
        tuner = tune.Tuner.restore(root, trainable=trainable, resume_errored=True, storage_filesystem=storage_fs)
    else:
        param_space = {**search_space(cfg.tune.search_space), "base_config": cfg.to_dict(), "data_dir": data_dir,
                       "trials_uri": storage.join(root, "trials")}
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=cfg.tune.num_samples,
                                        search_alg=search_algorithm(cfg, metric, mode), scheduler=scheduler,
                                        max_concurrent_trials=concurrent_trials(cfg)),
            run_config=run_config)
    grid = tuner.fit()
    return summarize(grid, user_cfg, root, metric, mode, total_steps)


def _total_steps(cfg: KilmConfig, data_dir: str) -> int:
    """The trials' step count; checks the dataset first (before any trial starts)."""
    from kilm_ray.store.loader import BatchPlan, check_dataset

    t = cfg.train
    return BatchPlan(check_dataset(t, data_dir)["samples"]["train"], t.global_batch_size, t.micro_batch_size, 1, t.epochs,
                     t.seed, t.max_steps).total_steps


def summarize(grid, cfg: KilmConfig, root: str, metric: str, mode: str, total_steps: int) -> dict[str, Any]:
    """trials.csv/json, best.yaml (``cfg`` with the best values) and validation.png from a ResultGrid."""
    import tempfile

    keys = list(cfg.tune.search_space)
    rows, curves = [], {}
    for result in grid:
        params = {k: result.config.get(k) for k in keys}
        history = result.metrics_dataframe
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        trial_id = trial_id or Path(result.path).name
        steps = history["step"].tolist() if history is not None and "step" in history else []
        values = history[metric].tolist() if history is not None and metric in history else []
        curves[trial_id] = (steps, values)
        best_value = (min if mode == "min" else max)(values) if values else None
        rows.append({"trial": trial_id, **params, "last_step": steps[-1] if steps else 0,
                     f"last_{metric}": values[-1] if values else None, f"best_{metric}": best_value,
                     "stopped_early": bool(steps) and steps[-1] < total_steps,
                     "error": str(result.error) if result.error else None})
    scored = [r for r in rows if r[f"best_{metric}"] is not None]
    if not scored:
        errors = [f"{r['trial']}: {r['error']}" for r in rows if r["error"]]
        raise RuntimeError(f"no trial reported {metric}; see the trial logs under {root}"
                           + (f". First error: {errors[0]}" if errors else ""))
    best = (min if mode == "min" else max)(scored, key=lambda r: r[f"best_{metric}"])
    best_cfg = config_from_dict(cfg.to_dict(), source="tune").with_overrides({k: best[k] for k in keys})
    best_yaml = "# Best trial of the search " + root + f": {best['trial']} ({metric} = {best[f'best_{metric}']:.4f})\n"
    best_yaml += best_cfg.to_yaml()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "best.yaml").write_text(best_yaml)
        (out / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
        _write_csv(rows, out / "trials.csv")
        _plot(curves, metric, out / "validation.png")
        storage.upload_dir(out, root)
    return {"best": best, "trials": rows, "best_config": storage.join(root, "best.yaml")}


def _write_csv(rows: list[dict], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(curves: dict[str, tuple[list, list]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial, (steps, values) in sorted(curves.items()):
        if steps and values:
            ax.plot(steps, values, marker="o", label=trial)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("Validation per trial (ASHA stops the weak ones early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
