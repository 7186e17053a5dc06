"""Ray Train wiring: a TorchTrainer whose workers run ``train_worker`` (thin on purpose).

Fault tolerance comes from Ray Train V2: a failed worker group restarts (``FailureConfig``) and each
worker resumes from ``ray.train.get_checkpoint()``; rerunning the same ``--run-dir`` / ``--name``
after a driver failure restores the run's checkpoint history from storage; ``num_workers: [min, max]``
makes the run elastic. A checkpoint is registered only once fully persisted, so a crash mid-write
leaves the previous one in place.

Before ``fit`` every node that can host a worker is prepared (``node_prep``); while the run lasts,
nodes that join are prepared before Ray Train can place workers on them. A run that stops without
finishing raises :class:`RunStopped` naming the cause; with ``train.max_failures: -1`` waiting for
spot capacity is not a failure (:class:`CapacityWatch`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from kilm_ray import storage
from kilm_ray.config import KilmConfig, config_from_dict
from kilm_ray.errors import UserInputError, input_error_of
from kilm_ray.train.env import RunEnv, RunStopped, clear_stop, read_stop
from kilm_ray.train.loop import train_worker

log = logging.getLogger("kilm_ray.train")


class RayEnv(RunEnv):
    def __init__(self, run_uri: str, train_cfg):
        import ray.train

        from kilm_ray.train.resources import worker_request

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self._run_uri = run_uri
        self._tmp = Path(tempfile.mkdtemp(prefix="kilm_ckpt_"))
        self._resume_copy: Optional[Path] = None
        self._pending: Optional[threading.Event] = None
        self._per_worker = dict(worker_request(train_cfg).per_worker)
        self._max_workers = train_cfg.worker_bounds[1]
        self._cache_root = Path(train_cfg.node_cache_dir) if train_cfg.node_cache_dir else None
        self._preemption = _preemption_context()
        self._told = False  # the notice was logged

    @property
    def run_uri(self) -> str:
        return self._run_uri

    def resume_checkpoint(self) -> Optional[Path]:
        """Local storage is read in place; remote storage is downloaded once per node (the first rank
        of the node downloads under a lock, the others wait and read the same copy)."""
        import pyarrow.fs
        import ray.train

        from kilm_ray.store import node_cache
        from kilm_ray.train.checkpoint import STATE_FILE

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and Path(checkpoint.path).is_dir():
            return Path(checkpoint.path)
        key = hashlib.sha256(f"{self._run_uri}|{checkpoint.path}".encode()).hexdigest()[:20]
        copy = (self._cache_root or node_cache.default_root()) / "checkpoints" / key
        with node_cache.node_lock(copy.with_name(f"{key}.lock")):
            if not (copy / STATE_FILE).is_file():
                partial = copy.with_name(f".tmp-{key}-{os.getpid()}")
                checkpoint.to_directory(str(partial))
                shutil.rmtree(copy, ignore_errors=True)
                os.replace(partial, copy)
        self._resume_copy = copy
        return copy

    def release_resume(self) -> None:
        if self._resume_copy is None:
            return
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank of every node has read it
        if self.local_rank == 0:
            shutil.rmtree(self._resume_copy, ignore_errors=True)
        self._resume_copy = None

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics)

    def checkpoint(self, step: int, metrics: dict[str, Any], write: Callable[[Path], None],
                   state: Optional[dict]) -> None:
        """Ray Train's asynchronous upload: ``report`` returns at once; Ray's upload thread runs our
        ``write`` (this rank's shard to local disk), then copies the directory to storage and deletes
        it. Ray registers the checkpoint when every rank's upload is done. One checkpoint in flight
        per rank: the next one first waits for this one."""
        import ray.train
        from ray.train import CheckpointUploadMode

        from kilm_ray.train.checkpoint import write_state

        if self._pending is not None:
            self._pending.wait()
        directory = self._tmp / f"checkpoint_{step:08d}"
        directory.mkdir(parents=True, exist_ok=True)
        done = self._pending = threading.Event()

        def upload(checkpoint, dir_name: str):
            try:
                write(directory)
                if state is not None:
                    write_state(directory, state)
                return ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
            finally:
                # Removed here, before ``close`` may remove the parent: Ray's own removal after the upload
                # would race with it (and log a FileNotFoundError traceback per rank).
                shutil.rmtree(directory, ignore_errors=True)
                done.set()

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=f"checkpoint_{step:08d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, checkpoint_upload_fn=upload,
                         delete_local_checkpoint_after_upload=False)

    def wait_for_nodes(self) -> None:
        """Ray Train's own barrier (its synchronization actor): it waits without a timeout, where a
        torch collective would time out (NCCL: 30 min) while a late node converts its data."""
        import ray.train.collective

        if self.world_size > 1:
            ray.train.collective.barrier()

    def heard_preemption(self) -> bool:
        """This worker's own copy of Ray Train's preemption notice (set on every worker by the run's
        PreemptionWatcher when a node of the run is drained: a spot notice turned into
        ``ray drain-node`` by ``kilm-ray spot-watch``). Read locally, without the barrier of
        ``ray.train.get_preemption_info``: the step's control vector makes the ranks agree."""
        info = self._preemption.preemption_info
        if info is not None and not self._told:
            self._told = True
            if self.rank == 0:
                log.warning("preemption notice: nodes %s (ranks %s) go at %s; checkpointing now",
                            info.preempted_node_ids, info.preempted_ranks,
                            time.strftime("%H:%M:%S", time.localtime(info.deadline_ms / 1000))
                            if info.deadline_ms else "an unknown time")
        return info is not None

    def room_to_grow(self) -> bool:
        import ray

        from kilm_ray.train.resources import can_grow

        grow = can_grow(ray.available_resources(), self._per_worker, self.world_size, self._max_workers)
        if grow:
            log.info("room for another worker (%d now, up to %d): checkpointing before Ray grows the group",
                     self.world_size, self._max_workers)
        return grow

    def close(self) -> None:
        if self._pending is not None:
            self._pending.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)


def _worker(config: dict) -> None:
    import ray.train

    from kilm_ray.cluster import worker_logging

    worker_logging(ray.train.get_context().get_world_rank())
    cfg = config_from_dict(config["cfg"], source="train_loop_config")
    try:
        train_worker(cfg, config["data_dir"], RayEnv(config["run_uri"], cfg.train))
    except UserInputError as exc:
        # The message names the input; the traceback Ray logs for every rank would say nothing more.
        raise exc.with_traceback(None) from None


def _preemption_context():
    """Ray Train V2's per-worker preemption state (private in Ray 2.60: the public
    ``ray.train.get_preemption_info`` adds a barrier across workers to every call)."""
    import ray
    from ray.train.v2._internal.execution.context import get_train_context

    context = getattr(get_train_context(), "preemption_context", None)
    if context is None or not hasattr(context, "preemption_info"):
        raise RuntimeError(f"Ray {ray.__version__}: the train context has no preemption_context.preemption_info "
                           "(kilm_ray reads preemption notices from it; tested with Ray 2.60)")
    return context


def _bound_worker_start(t) -> tuple[float, int]:
    """Ray's per-attempt wait for the worker group (an environment variable the controller inherits
    from the process calling ``fit``) and the number of retries (``controller_failure_limit``).

    With ``max_failures >= 0`` a group that cannot be placed within ``worker_start_timeout_s`` in all
    fails the run. With ``max_failures: -1`` (spot capacity) placement is retried without limit:
    Ray counts every failed attempt of the run's lifetime against that limit, so any bound would end
    a long spot run that waited a few times; :class:`CapacityWatch` bounds each continuous wait
    instead (``train.capacity_wait_s``) and logs while it lasts."""
    from kilm_ray.train.resources import start_attempts

    if t.max_failures == -1:
        per_attempt, retries = min(t.worker_start_attempt_s, t.capacity_wait_s), -1
    else:
        per_attempt, retries = start_attempts(t.worker_start_timeout_s, t.worker_start_attempt_s)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{per_attempt:g}"
    return per_attempt, retries


def capacity_watch(t):
    """A Ray Train controller callback that turns the controller's scheduling states into
    :class:`kilm_ray.train.resources.CapacityWait` observations: a log line every
    ``train.capacity_log_every_s`` while the worker group waits for resources, and a clear error once
    one wait exceeds ``train.capacity_wait_s``."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    from kilm_ray.train.resources import CapacityWait, worker_request

    class CapacityWatch(ControllerCallback):
        def __init__(self):
            self.wait = CapacityWait(limit_s=t.capacity_wait_s, log_every_s=t.capacity_log_every_s,
                                     asked=worker_request(t).describe())

        def after_controller_state_update(self, previous_state, current_state):
            line = self.wait.observe(current_state._state_type.name, time.time())
            if line:
                log.warning("%s", line)

    return CapacityWatch()


def stop_on_input_errors():
    """A Ray Train callback (it runs in the run's controller) that ends the run when a worker failed on
    the user's input: a missing or uncommitted dataset, a bad config value, a tokenizer that does not
    match. Such a failure recurs after every restart, and Ray Train V2 retries every worker error
    (``max_failures`` times, forever under -1), so the first one ends the run and ``fit`` raises it.
    Transient storage errors (an S3 endpoint that did not answer) are still retried."""
    from ray.train import UserCallback

    class StopOnInputErrors(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank in sorted(worker_exceptions):
                error = input_error_of(worker_exceptions[rank])
                if error is not None and not error.transient:
                    # Raised here, in the controller, it becomes a ControllerError that Ray never retries.
                    raise error

    return StopOnInputErrors()


def build_trainer(cfg: KilmConfig, data_dir: str, run_dir: str, name: str, callbacks: Optional[list] = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kilm_ray.train.resources import worker_request

    t = cfg.train
    lo, hi = t.worker_bounds
    resources = dict(worker_request(t).per_worker)
    storage_fs, storage_path, run_uri = storage.ray_storage(run_dir, name)
    _, start_retries = _bound_worker_start(t)
    return TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config={"cfg": cfg.to_dict(), "data_dir": data_dir, "run_uri": run_uri},
        scaling_config=ScalingConfig(num_workers=lo if lo == hi else (lo, hi), use_gpu=t.use_gpu,
                                     resources_per_worker=resources,
                                     **({} if lo == hi else {"elastic_resize_monitor_interval_s": t.elastic_resize_check_s})),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            # Preemptions (drained nodes) are retried without limit and do not count as failures; the
            # checkpoint taken on the notice makes them cost nothing. The survivors get a grace past the
            # deadline to finish registering it. Collectives are not relaxed: a checkpoint registered
            # without the reclaimed ranks would lack their ZeRO shards and could not be resumed.
            failure_config=FailureConfig(max_failures=t.max_failures, max_preemption_failures=-1,
                                         controller_failure_limit=start_retries,
                                         preemption_grace_s=t.preemption_grace_s,
                                         relax_collectives_on_preemption=False),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[stop_on_input_errors(), *([capacity_watch(t)] if t.max_failures == -1 else []),
                       *(callbacks or [])],
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )


def fit(trainer, cfg: KilmConfig):
    """``trainer.fit()``, with an unplaceable worker group reported as what was asked and what is free."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from kilm_ray.train.resources import CapacityWaitExceeded, WorkerPlacementError, placement_message, worker_request

    try:
        return trainer.fit()
    except ControllerError as exc:
        input_error = input_error_of(exc)
        if input_error is not None:  # stop_on_input_errors: the worker's own one-line message
            raise input_error from None
        if isinstance(exc.controller_failure, CapacityWaitExceeded):
            raise WorkerPlacementError(str(exc.controller_failure)) from None
        if not isinstance(exc.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        import ray

        message = placement_message(worker_request(cfg.train), cfg.train.worker_start_timeout_s,
                                    ray.available_resources(), ray.cluster_resources())
        raise WorkerPlacementError(message) from None


def run_training(cfg: KilmConfig, data_dir: str, run_dir: str, name: str):
    """Fit (or resume) the run ``run_dir/name``; returns Ray's Result. The dataset is checked here,
    on the driver, before any worker starts: a missing or uncommitted one fails at once. Raises
    :class:`RunStopped` when the workers stopped without finishing: Ray's result then holds the last
    *checkpointed* report, so it cannot tell by itself."""
    from kilm_ray.store.loader import BatchPlan, check_dataset
    from kilm_ray.train.node_prep import NodePreparer

    t = cfg.train
    manifest = check_dataset(t, data_dir)
    _, _, run_uri = storage.ray_storage(run_dir, name)
    total_steps = BatchPlan(int(manifest["samples"]["train"]), t.global_batch_size, t.micro_batch_size,
                            1, t.epochs, t.seed, t.max_steps).total_steps
    clear_stop(run_uri)
    with NodePreparer(cfg, data_dir):  # every node present now, before fit; nodes that join, while it runs
        result = fit(build_trainer(cfg, data_dir, run_dir, name), cfg)
    if result.error is not None:
        return result
    stopped = read_stop(run_uri)
    if stopped:
        raise RunStopped(f"stopped at step {stopped['step']} of {total_steps}: {stopped['cause']}")
    step = int((result.metrics or {}).get("step", 0))
    if step < total_steps:
        raise RunStopped(f"the workers returned at step {step} of {total_steps} without an error or a recorded "
                         "cause (see the workers' logs)")
    return result
