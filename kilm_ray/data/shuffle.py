"""How the stages ask Ray Data for work: task placement and CPU shares, bucketed group-bys, and the
sizes of shuffles, planned for the cluster the job will have (an autoscaling cluster's configured
maximum), not only the nodes present when a stage is planned."""

from __future__ import annotations

import logging
from typing import Optional

from kilm_ray.config import KilmConfig
from kilm_ray.data.rows import with_bucket

log = logging.getLogger("kilm_ray.pipeline")

# Steps that mostly wait on I/O or convert rows (reads, re-keying, writes) ask for a quarter of a CPU:
# at most four of them run per CPU wherever they land, so worker processes stay bounded per node as
# nodes come and go (no task pool sized once from the nodes present at planning), and their resource
# shape differs from the parse step's, so that Ray Data does not fuse a read into its parse.
LIGHT_CPUS = 0.25
MAX_PARTITIONS = 8192


def task_resources(cfg: KilmConfig) -> dict:
    """Ray remote args that place preprocessing tasks (corpus.task_resources, e.g. CPU nodes)."""
    return {"resources": dict(cfg.corpus.task_resources)} if cfg.corpus.task_resources else {}


def light_args(cfg: KilmConfig) -> dict:
    return {"num_cpus": LIGHT_CPUS, **task_resources(cfg)}


def map_rows(ds, fn, cfg: KilmConfig, num_cpus: float = 1, batch_size: Optional[int] = None, **kwargs):
    """``fn(batch, **kwargs)`` over pyarrow batches (whole blocks unless ``batch_size``)."""
    return ds.map_batches(fn, batch_format="pyarrow", batch_size=batch_size, num_cpus=num_cpus, fn_kwargs=kwargs,
                          **task_resources(cfg))


def light_map(ds, fn, cfg: KilmConfig, **kwargs):
    return map_rows(ds, fn, cfg, num_cpus=LIGHT_CPUS, **kwargs)


def bucketed(ds, column: str, fn, cfg: KilmConfig, partitions: int, **fn_kwargs):
    """``fn`` once per bucket of rows whose ``column`` hashes alike: all rows of a key meet in one call,
    and a call holds about 1/(4 x partitions) of the data. Grouping by bucket instead of by key keeps
    Ray Data's guarantee (a group is never split) without a Python call per key, which cost 300 us
    each: 45 s for the 118 k keys of WordNet alone on 2 CPUs."""
    keyed = light_map(ds, with_bucket, cfg, column=column, buckets=4 * partitions)
    return keyed.groupby("bucket", num_partitions=partitions).map_groups(
        fn, batch_format="pyarrow", fn_kwargs=fn_kwargs, **task_resources(cfg))


def planned_cpus(present: float, configured_max: Optional[float], override: int = 0) -> int:
    """CPUs to plan a stage for: ``corpus.cluster_cpus`` if set, else the larger of the CPUs present and
    the autoscaler's configured maximum (spot CPU nodes start at zero and join minutes later)."""
    if override:
        return override
    return int(max(present, configured_max or 0, 1))


def cluster_cpus(cfg: KilmConfig) -> int:
    import ray

    configured = None
    try:
        import ray._private.state

        configured = (ray._private.state.state.get_max_resources_from_cluster_config() or {}).get("CPU")
    except Exception:  # no autoscaler config in this cluster (a local Ray, a fixed-size cluster)
        configured = None
    if configured and configured > 1 << 30:  # "no limit": plan for what is present
        configured = None
    return planned_cpus(ray.cluster_resources().get("CPU", 1), configured, cfg.corpus.cluster_cpus)


def autoscaling_enabled() -> bool:
    try:
        from ray.data._internal.cluster_autoscaler.util import is_autoscaling_enabled

        return bool(is_autoscaling_enabled())
    except Exception:
        return False


def shuffle_partitions(configured: int, input_bytes: int, partition_mb: float, cpus: int) -> int:
    """Partitions of a group-by: as configured, else one per ``partition_mb`` of input (a reduce task
    holds one partition, so its memory stays flat as the corpus grows), at least one per CPU."""
    if configured:
        return configured
    by_size = -(-input_bytes // max(1, int(partition_mb * 2**20)))
    return int(max(2, cpus, min(MAX_PARTITIONS, by_size)))


def partitions_for(cfg: KilmConfig, input_bytes: int, what: str) -> int:
    partitions = shuffle_partitions(cfg.corpus.shuffle_partitions, input_bytes, cfg.corpus.shuffle_partition_mb,
                                    cluster_cpus(cfg))
    log.info("%s: %.1f MB of input -> %d shuffle partitions", what, input_bytes / 1e6, partitions)
    return partitions


def light_repartition(ds, rows: int, cfg: KilmConfig):
    """Re-cut a stream into blocks of ``rows`` rows (streaming, no barrier), the re-cutting running as a
    light task. By default each streaming-repartition task takes a whole CPU and keeps it while it waits
    for the next step to take its output: on a 1-CPU node they held the CPU the parse tasks needed, and 8
    dump files took 534 s instead of 55 s. ``Dataset.repartition`` takes no remote args, so they are set
    on its logical operator."""
    out = ds.repartition(target_num_rows_per_block=rows)
    op = out._logical_plan.dag
    if hasattr(op, "ray_remote_args"):
        object.__setattr__(op, "ray_remote_args", light_args(cfg))
    else:
        log.warning("this Ray version's repartition operator has no ray_remote_args; it takes 1 CPU per task")
    return out
