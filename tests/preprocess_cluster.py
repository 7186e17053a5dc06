"""Preprocessing on a simulated two-node cluster (``ray.cluster_utils.Cluster``) while a worker process is
killed in the middle of the parse stage: run by ``test_preprocess.py`` in a process of its own (a driver
can join one Ray cluster only, and the test session has one).

1. A head that runs no tasks and two worker nodes of 2 CPUs.
2. A local ``--out`` is refused (each node would write to its own disk) ...
3. ... and accepted once declared shared (``corpus.shared_paths``; here it is: one machine).
4. The first write task of the run to finish writing its files dies before it reports them (SIGKILL of
   its own worker process: ``KILM_RAY_TEST_KILL_AFTER_WRITE``); Ray runs it again.

Prints a JSON summary: the refusal, the pid of the killed worker, the run's stats.

    python tests/preprocess_cluster.py OUT MARKER DUMP KNOWLEDGE [key=value ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    out, marker, dump, knowledge, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    from kilm_ray.data.stages import KILL_AFTER_WRITE_ENV

    os.environ[KILL_AFTER_WRITE_ENV] = marker  # before the nodes start: their workers inherit it
    import ray
    from ray.cluster_utils import Cluster

    from kilm_ray import storage
    from kilm_ray.config import load_config
    from kilm_ray.data.plan import preprocess

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=300 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
        try:
            preprocess(cfg, [dump], out, [knowledge])
            refused = None
        except storage.InputError as exc:
            refused = str(exc)
        shared = sorted({str(Path(p).resolve().parent) for p in (out, dump, knowledge)})
        cfg = cfg.with_overrides({"corpus.shared_paths": shared})
        stats = preprocess(cfg, [dump], out, [knowledge])
        killed = Path(marker).read_text().strip() if Path(marker).exists() else None
        print(json.dumps({"refused": refused, "killed": killed, "stats": stats}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
