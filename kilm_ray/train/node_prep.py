"""Each node's copy of the dataset (``kilm_ray.store.node_cache``), prepared by a Ray task on that node
before any training worker runs there, so that no rank waits in a collective (NCCL: 30 min timeout)
while a node converts its data.

- Before ``fit``: one task per alive node that can host a training worker; ``fit`` starts when all
  are done (a failure names the node).
- While the run lasts: a thread looks for nodes that joined (spot capacity that came back) and
  prepares them the same way. Its task reserves the node's units of the scarcest resource a worker
  needs (e.g. all 8 ``trainer``), so Ray Train sees no room there, and neither grows onto the node
  nor checkpoints for a grow, until the copy is ready.
- A node Ray Train reaches anyway (it joined between two looks) builds its copy in the worker,
  still before the first collective, and the other ranks wait in Ray Train's barrier, which has no
  timeout (``RunEnv.wait_for_nodes``).

The choice of nodes and of what to reserve is pure (:func:`nodes_to_prepare`); the Ray calls are thin.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Mapping, Optional

log = logging.getLogger("kilm_ray.train")

SPLITS = ("train", "valid")
POLL_S = 5.0


def workers_fitting(node: Mapping[str, float], per_worker: Mapping[str, float]) -> dict[str, int]:
    """For each resource a worker asks for: how many workers the node's total of it holds."""
    return {name: int(node.get(name, 0.0) // amount + 1e-9) for name, amount in per_worker.items() if amount > 0}


def reservation(node: Mapping[str, float], per_worker: Mapping[str, float]) -> dict[str, float]:
    """What a preparation task takes on ``node`` so that no training worker can be placed there while
    it runs: the node's whole amount of the resource that fits the fewest workers (a custom resource
    such as ``trainer`` before GPU before CPU, on a tie)."""
    fits = workers_fitting(node, per_worker)
    rank = {"CPU": 2, "GPU": 1}
    name = min(fits, key=lambda n: (fits[n], rank.get(n, 0), n))
    return {name: float(node[name])}


def nodes_to_prepare(nodes: list[dict], per_worker: Mapping[str, float], seen: set[str]) -> list[tuple[str, dict]]:
    """(node id, reservation) of each alive node not yet in ``seen`` that can host a worker
    (``nodes``: ``ray.nodes()`` rows)."""
    out = []
    for node in nodes:
        resources = node.get("Resources") or {}
        if not node.get("Alive") or node["NodeID"] in seen:
            continue
        if min(workers_fitting(resources, per_worker).values(), default=0) >= 1:
            out.append((node["NodeID"], reservation(resources, per_worker)))
    return out


def prepare_here(data_dir: str, cache_dir: Optional[str]) -> dict:
    """The task's body: build (or find) this node's copies of the splits training reads."""
    import socket

    from kilm_ray.store.loader import SampleStore

    started = time.perf_counter()
    rows = {}
    for split in SPLITS:
        try:
            rows[split] = len(SampleStore.load(data_dir, split, cache_dir))
        except Exception:
            if split == "train":
                raise
            rows[split] = 0  # an empty or missing valid split: validation is skipped
    return {"host": socket.gethostname(), "rows": rows, "seconds": time.perf_counter() - started}


class NodePreparer:
    """``with NodePreparer(cfg, data_dir): fit(...)``: prepares the nodes present, then watches for
    new ones until the block ends."""

    def __init__(self, cfg, data_dir: str, poll_s: float = POLL_S):
        from kilm_ray.train.resources import worker_request

        self.data_dir, self.poll_s = data_dir, poll_s
        self.cache_dir = cfg.train.node_cache_dir or None
        self.per_worker = dict(worker_request(cfg.train).per_worker)
        self.seen: set[str] = set()
        self.pending: dict = {}  # object ref -> node id
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "NodePreparer":
        import ray

        self._launch(reserve=False)  # no workers yet: nothing to keep off these nodes
        if self.pending:
            log.info("preparing the dataset on %d node(s) before the workers start", len(self.pending))
        while self.pending:
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=60.0)
            if not done:
                log.info("still preparing the dataset on %d node(s)", len(self.pending))
            for ref in done:
                node = self.pending.pop(ref)
                try:
                    info = ray.get(ref)
                except Exception as exc:
                    raise RuntimeError(f"preparing the dataset on node {node} failed: {exc}") from exc
                log.info("node %s (%s) ready: %s rows in %.1f s", node[:8], info["host"], info["rows"]["train"],
                         info["seconds"])
        self._thread = threading.Thread(target=self._watch, name="kilm-node-prep", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _launch(self, reserve: bool) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(prepare_here)
        for node, held in nodes_to_prepare(ray.nodes(), self.per_worker, self.seen):
            self.seen.add(node)
            held = held if reserve else {}
            options = {"num_cpus": held.pop("CPU", 0.0), "num_gpus": held.pop("GPU", 0.0), "resources": held,
                       "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False), "max_retries": 0}
            self.pending[task.options(**options).remote(self.data_dir, self.cache_dir)] = node

    def _watch(self) -> None:
        import ray

        while not self._stop.wait(self.poll_s):
            try:
                self._launch(reserve=True)
                if not self.pending:
                    continue
                done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
                for ref in done:
                    node = self.pending.pop(ref)
                    try:
                        info = ray.get(ref)
                        log.info("node %s (%s), which joined the run, is ready: %.1f s", node[:8], info["host"],
                                 info["seconds"])
                    except Exception as exc:  # its workers will build the copy themselves
                        log.warning("preparing the dataset on node %s failed: %s", node[:8], exc)
            except Exception as exc:  # noqa: BLE001 - the watcher must not end the run
                log.debug("node preparation watch: %s", exc)
