"""What a training run asks the cluster for, how many runs fit at once, and the release of what a
killed run left reserved.

The arithmetic is pure (dicts in, numbers out) and tested without Ray; the two functions at the
bottom read Ray's GCS, not the dashboard's state API, so they work on a local Ray started without a
dashboard (our default) as well as on a cluster.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

log = logging.getLogger("kilm_ray.resources")

# Ray's own per-attempt wait for a worker group (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s in 2.60).
START_ATTEMPT_S = 60.0
_EPS = 1e-9


class WorkerPlacementError(RuntimeError):
    """The training workers could not be placed in the time allowed."""


@dataclass(frozen=True)
class WorkerRequest:
    """One run's training worker group: ``num_workers`` bundles of ``per_worker``."""

    num_workers: int
    per_worker: Mapping[str, float]

    @property
    def total(self) -> dict[str, float]:
        return {k: v * self.num_workers for k, v in self.per_worker.items() if v}

    def describe(self) -> str:
        return f"{self.num_workers} x {dict(self.per_worker)}"


def worker_request(train_cfg) -> WorkerRequest:
    """The worker group a ``train`` config section asks for (the upper bound of an elastic range: a
    trial should get the shape it was configured with)."""
    _, hi = train_cfg.worker_bounds
    per_worker = {"CPU": float(train_cfg.cpus_per_worker), **{k: float(v) for k, v in train_cfg.worker_resources.items()}}
    if train_cfg.use_gpu:
        per_worker["GPU"] = 1.0
    return WorkerRequest(hi, per_worker)


def runs_that_fit(free: Mapping[str, float], request: WorkerRequest, driver_cpus: float = 0.0) -> int:
    """How many runs of ``request`` (plus ``driver_cpus`` each for the function that drives a run)
    fit into ``free`` resources at once; 0 if not even one does."""
    need = dict(request.total)
    need["CPU"] = need.get("CPU", 0.0) + driver_cpus
    counts = [math.floor((free.get(name, 0.0) + _EPS) / amount) for name, amount in need.items() if amount > 0]
    return max(0, min(counts)) if counts else 0


def can_grow(free: Mapping[str, float], per_worker: Mapping[str, float], world_size: int, max_workers: int) -> bool:
    """Whether the free resources hold one more worker of an elastic group below its maximum (Ray
    Train will then restart the group larger: checkpoint first)."""
    return world_size < max_workers and runs_that_fit(free, WorkerRequest(1, per_worker)) >= 1


def start_attempts(timeout_s: float, attempt_s: float = START_ATTEMPT_S) -> tuple[float, int]:
    """Split a total wait for the worker group into Ray's per-attempt timeout and the number of
    retries after the first attempt (``FailureConfig.controller_failure_limit``)."""
    per_attempt = min(attempt_s, timeout_s)
    return per_attempt, max(0, math.ceil(timeout_s / per_attempt - _EPS) - 1)


class CapacityWaitExceeded(WorkerPlacementError):
    """One continuous wait for the worker group's resources lasted longer than allowed."""


# Ray Train controller states in which the worker group waits to be placed.
WAITING_STATES = ("SCHEDULING", "RESCHEDULING")


class CapacityWait:
    """Waiting for spot capacity, observed through the Ray Train controller's states: a wait starts
    when the controller schedules a worker group and ends when the group runs. ``observe`` returns
    a log line at most every ``log_every_s`` of a wait, and raises :class:`CapacityWaitExceeded` once
    a single wait passes ``limit_s`` (the time is the caller's: pure, testable without Ray)."""

    def __init__(self, limit_s: float, log_every_s: float, asked: str):
        self.limit_s, self.log_every_s, self.asked = limit_s, log_every_s, asked
        self.since: float | None = None
        self.logged_at = 0.0

    def observe(self, state: str, now: float) -> str | None:
        if state not in WAITING_STATES:
            if state == "RUNNING":
                self.since = None
            return None
        if self.since is None:
            self.since, self.logged_at = now, now
            return None
        waited = now - self.since
        if waited > self.limit_s:
            raise CapacityWaitExceeded(
                f"the training workers ({self.asked}) waited {waited / 60:.1f} min for resources, longer than "
                f"train.capacity_wait_s ({self.limit_s / 60:.1f} min): no spot capacity came. Rerun the same "
                "command to resume from the last checkpoint, or raise train.capacity_wait_s.")
        if now - self.logged_at >= self.log_every_s:
            self.logged_at = now
            return (f"waiting for spot capacity: {self.asked}, {waited / 60:.1f} min so far "
                    f"(up to train.capacity_wait_s = {self.limit_s / 60:.0f} min)")
        return None


def placement_message(request: WorkerRequest, timeout_s: float, free: Mapping[str, float],
                      total: Mapping[str, float]) -> str:
    asked = request.total
    short = {k: round(v - free.get(k, 0.0), 4) for k, v in asked.items() if free.get(k, 0.0) + _EPS < v}
    return (f"the training workers could not be placed within {timeout_s:g} s: asked for {request.describe()} "
            f"(= {_fmt(asked)}); free now {_fmt({k: free.get(k, 0.0) for k in asked})} of "
            f"{_fmt({k: total.get(k, 0.0) for k in asked})} in the cluster"
            + (f"; short of {_fmt(short)}" if short else "")
            + ". Lower train.num_workers / train.cpus_per_worker / train.worker_resources, add nodes, or raise "
              "train.worker_start_timeout_s if the autoscaler is still adding them.")


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


@dataclass(frozen=True)
class PlacementGroupRow:
    """The fields of a GCS placement-group record that decide whether it was orphaned."""

    pg_id: str
    state: str
    creator_job_id: str
    creator_actor_id: str
    creator_actor_dead: bool
    is_detached: bool


def orphaned(rows: Iterable[PlacementGroupRow], job_id: str) -> list[str]:
    """Placement groups of ``job_id`` whose creating actor is dead but that are still reserved.

    Ray scopes a placement group made by a non-detached actor to the job, not to the actor: when a
    Train controller is killed (Tune stopping its trial), the worker group's reservation stays until
    the job ends. Tune's own trial groups are created by the driver (no creator actor) and never match.
    """
    return [r.pg_id for r in rows
            if r.creator_job_id == job_id and r.creator_actor_id and r.creator_actor_dead
            and not r.is_detached and r.state != "REMOVED"]


# ----------------------------------------------------------------------------------------------
# Ray wiring (GCS reads; no dashboard needed)
# ----------------------------------------------------------------------------------------------


def placement_group_rows() -> list[PlacementGroupRow]:
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    if not ray.is_initialized():
        return []
    states = {v: k for k, v in gcs_pb2.PlacementGroupTableData.PlacementGroupState.items()}
    rows = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        actor = pg.creator_actor_id.hex()
        rows.append(PlacementGroupRow(
            pg_id=pg.placement_group_id.hex(), state=states.get(pg.state, "REMOVED"),
            creator_job_id=pg.creator_job_id.hex(), creator_actor_id="" if set(actor) <= {"f", "0"} else actor,
            creator_actor_dead=pg.creator_actor_dead, is_detached=pg.is_detached))
    return rows


def release_orphaned_placement_groups() -> list[str]:
    """Remove this job's orphaned placement groups (see :func:`orphaned`); returns their ids."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()
    released = []
    for pg_id in orphaned(placement_group_rows(), job_id):
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            released.append(pg_id)
        except Exception as exc:  # already gone, or the GCS is busy: the next sweep retries
            log.debug("could not remove placement group %s: %s", pg_id, exc)
    if released:
        log.info("released %d placement group(s) of stopped training runs", len(released))
    return released
