"""An elastic training run on a simulated two-node cluster (``ray.cluster_utils.Cluster``), driven the
way spot capacity behaves: run by ``test_elastic.py`` in a process of its own (a driver can join only
one Ray cluster, and the test session already has one).

1. Two worker nodes with one training slot each, each with its spot watcher (``kilm-ray spot-watch``,
   as cluster.yaml starts it) polling its own fake instance metadata service (tests/fake_imds.py, a
   real HTTP server on loopback); the run starts with 2 workers (elastic 1-2).
2. Node B's metadata service posts a reclaim notice 60 s ahead; B's watcher drains B
   (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``, deadline from the notice); the workers
   see the notice and checkpoint; then the node is removed. Ray Train restarts the group with 1 worker
   from that checkpoint.
3. A node is added back. The workers see room for a second worker and checkpoint; Ray Train grows the
   group to 2 and training resumes from that checkpoint.

Nobody touches the run between these events. Prints a JSON summary: the final checkpoint, the resume
events (world size, steps done again) and the reasons of the checkpoints taken.

    python tests/elastic_cluster.py DATA_DIR RUN_DIR [key=value ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def wait_for(what: str, predicate, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def checkpoint_reasons(run: Path) -> dict[int, str]:
    out = {}
    for state in run.glob("checkpoint_*/trainer_state.json"):
        try:
            data = json.loads(state.read_text())
        except ValueError:  # still being copied into place
            continue
        out[int(data["step"])] = data.get("reason", "?")
    return out


def registered(run: Path) -> set[int]:
    """Steps of the checkpoints Ray Train has registered (what a restart resumes from)."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return set()
    return {int(r["checkpoint_dir_name"].rsplit("_", 1)[1]) for r in snapshot.get("checkpoint_results", [])}


def main() -> None:
    import os

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray
    from ray.cluster_utils import Cluster

    from kilm_ray.config import load_config
    from kilm_ray.train.ray_trainer import run_training

    sys.path.insert(0, str(REPO / "tests"))
    from fake_imds import FakeImds

    data_dir, run_dir, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    slot = {"num_cpus": 1, "resources": {"trainer": 1}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node_a = cluster.add_node(**slot)
    node_b = cluster.add_node(**slot)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    # Each node's spot watcher, each with its own metadata service.
    imds = {name: FakeImds().__enter__() for name in ("a", "b")}
    watchers = {name: subprocess.Popen(
        [sys.executable, "-m", "kilm_ray.cli", "spot-watch", "--imds", imds[name].url, "--address", cluster.address,
         "--node-id", node.node_id, "--poll-s", "0.2", "--lock-file", str(run_dir / f"watch-{name}.lock"), "--once"],
        stdout=subprocess.DEVNULL, stderr=open(run_dir / f"watch-{name}.log", "w"))
        for name, node in (("a", node_a), ("b", node_b))}
    run = run_dir / "elastic"
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(cfg, data_dir, str(run_dir), "elastic")
        except BaseException as exc:  # noqa: BLE001 - reported in the summary
            outcome["error"] = repr(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    timeline = []

    def mark(event: str) -> None:
        last = metrics(run)
        timeline.append({"event": event, "step": max((m["step"] for m in last), default=0), "time": time.time()})

    # Ray may start the group with 1 worker before it sees both nodes, then grow it: wait for 2.
    wait_for("2 workers", lambda: any(m.get("world_size") == 2 and "event" not in m for m in metrics(run)))
    mark("spot notice on node B (reclaim in 60 s)")
    notice_deadline = time.time() + 60
    imds["b"].notice(60)
    # A spot node stays about two minutes after its notice; it is removed here as soon as Ray has
    # registered the checkpoint taken on the notice (the time that takes is in the timeline).
    wait_for("the preemption checkpoint", lambda: any(checkpoint_reasons(run).get(s) == "preemption"
                                                      for s in registered(run)))
    mark("preemption checkpoint registered; remove node B")
    watcher_b = watchers["b"].wait(timeout=30)
    cluster.remove_node(node_b)
    wait_for("1 worker, 3 steps on", lambda: any(m.get("world_size") == 1 and m.get("step", 0) >= timeline[-1]["step"] + 3
                                                 and "event" not in m for m in metrics(run)))
    mark("add node C")
    cluster.add_node(**slot)
    wait_for("2 workers again", lambda: any(m.get("world_size") == 2 and m.get("event") == "resumed"
                                            and m["time"] > timeline[-1]["time"] for m in metrics(run)))
    mark("grown back to 2")
    thread.join(timeout=300)
    summary = {
        "error": outcome.get("error") or (outcome["result"].error and repr(outcome["result"].error)),
        "final_checkpoint": str(max(run.glob("checkpoint_0*"))),
        "resumes": [m for m in metrics(run) if m.get("event") == "resumed"],
        "checkpoints": checkpoint_reasons(run), "timeline": timeline, "node_a": node_a.node_id,
        "notice_deadline": notice_deadline, "watcher_b_exit": watcher_b,
        "watcher_b_log": (run_dir / "watch-b.log").read_text()[-2000:], "watcher_a_running": watchers["a"].poll() is None,
    }
    watchers["a"].terminate()
    for server in imds.values():
        server.__exit__()
    print(json.dumps(summary, default=str))
    ray.shutdown()
    cluster.shutdown()
    # The simulated cluster registered itself as this machine's current Ray; once it is gone, a later
    # ray.init() without an address must start a local Ray rather than look for it.
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.exists() and current.read_text().strip() == cluster.address:
        current.unlink()


if __name__ == "__main__":
    main()
