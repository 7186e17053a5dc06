"""Connecting to Ray: an existing cluster (``ray job submit``, ``RAY_ADDRESS``) or a local one sized
for a laptop, with the package shipped to every worker."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional

import kilm_ray

log = logging.getLogger("kilm_ray")


def free_local_port(preferred: int = 0) -> int:
    """``preferred`` if it is free on 127.0.0.1, else a free port the OS picks (0: always the OS's)."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# glibc's mallopt parameter: the most malloc arenas a process keeps (its default: 8 per core).
_M_ARENA_MAX = -8
DRIVER_MALLOC_ARENAS = 2


@functools.lru_cache(maxsize=1)
def _glibc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = DRIVER_MALLOC_ARENAS) -> bool:
    """Cap this process's malloc arenas (glibc; before Ray starts its threads, or it is too late: glibc
    fixes the cap once a process has 8 arenas). A driver's dozens of Ray and gRPC threads each get an
    arena, and freed memory stays in them: measured on the preprocessing driver at 640 shuffle partitions,
    525 -> 431 MB peak RSS with two (BENCHMARKS.md, "The preprocessing driver at production partition
    counts"). The driver's threads mostly wait on the network, so fewer arenas cost no measurable time."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, arenas))


def release_freed_memory() -> None:
    """Give the heap's freed pages back to the OS (glibc ``malloc_trim``): a driver between two stages
    otherwise keeps the previous stage's peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def package_runtime_env(extra_env: Optional[dict[str, str]] = None) -> dict:
    """A runtime_env that ships this kilm_ray package to every task and actor (the cluster's image
    provides the dependencies; see cluster.yaml)."""
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", ""), **(extra_env or {})}
    return {"py_modules": [str(Path(kilm_ray.__file__).parent)],
            "env_vars": {k: v for k, v in env.items() if v}}


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None,
             ship_package: Optional[bool] = None, log_to_driver: bool = True) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``); else start a local Ray.

    On a small machine the local cluster advertises at least 4 logical CPUs: Ray Train workers that
    hold every CPU would otherwise starve the Ray Data tasks that feed them (DESIGN.md §4).
    """
    import ray

    if ray.is_initialized():
        return
    limit_malloc_arenas()
    address = address or os.environ.get("RAY_ADDRESS")
    # A local Ray runs this very interpreter, which imports kilm_ray already; a cluster gets a copy.
    ship = bool(address) if ship_package is None else ship_package
    runtime_env = package_runtime_env() if ship else None
    logging.getLogger("ray").setLevel(logging.WARNING)
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver, logging_level=logging.WARNING)
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    memory = int(min(2 * 1024**3, _total_memory() * 0.2))
    dashboard_port = free_local_port(8265)
    log.info("starting a local Ray with %d logical CPUs (dashboard: http://127.0.0.1:%d)", cpus, dashboard_port)
    # The dashboard is on: Ray Train's PlacementGroupCleaner asks Ray's state API (served by the
    # dashboard) once a second whether the run's controller is alive; without it, every ask logs a
    # warning (hundreds of lines per run) and the cleaner cannot do its job. It also gives the local
    # cluster a dashboard and a job API on 127.0.0.1 (8265, or a free port when that one is taken).
    # address="local": a new cluster of our own, as documented, even where a `ray start` cluster runs on
    # this machine (ray.init() would otherwise join that one and refuse num_cpus).
    ray.init(address="local", num_cpus=cpus, object_store_memory=memory, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, runtime_env=runtime_env, configure_logging=True,
             logging_level=logging.WARNING, _node_ip_address="127.0.0.1", log_to_driver=log_to_driver)


def worker_logging(rank: int = 0) -> None:
    """INFO lines of kilm_ray (progress, resume notices) from inside Ray workers, whatever logging
    setup the worker process inherited; Ray Train's own lines once per run, not once per rank."""
    import warnings

    # DeepSpeed's ZeRO calls a torch.distributed function that torch has deprecated: nothing a user can
    # act on, printed once by every worker.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    logger = logging.getLogger("kilm_ray")
    logger.setLevel(logging.INFO)
    try:  # Ray Train logs every report of every rank at INFO: our own progress line says more
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
        if rank:  # "Checkpoint successfully created at ...": rank 0's line says it for every rank
            logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)
    except ImportError:
        pass
    if not any(getattr(h, "_kilm", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._kilm = True
        logger.addHandler(handler)
        logger.propagate = False


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 1024**3
