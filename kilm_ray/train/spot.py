"""``kilm-ray spot-watch``: the EC2 spot interruption notice, turned into a Ray drain of this node.

AWS posts a reclaim notice two minutes ahead at the instance metadata service (IMDSv2: a session
token from ``PUT /latest/api/token``, then ``GET /latest/meta-data/spot/instance-action``, which
answers 404 until a notice exists and then ``{"action": "terminate", "time": "...Z"}``); the
rebalance recommendation (``/latest/meta-data/events/recommendations/rebalance``) may come earlier
and is only advice. Ray 2.60's ``ray up`` autoscaler polls neither: its AWS node provider and
``StandardAutoscaler`` drain only the nodes they terminate themselves (idle ones), and a node's own
drain-on-SIGTERM (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``) fires when the instance is already
shutting down (``tests/test_spot.py`` checks the autoscaler's sources for any such poll). So
without this watcher ``ray.train`` never hears of a reclaim on AWS, and a reclaim costs every step
since the last periodic checkpoint plus a restart.

One watcher runs on every worker node (``cluster.yaml`` starts it after ``ray start``). It polls the
metadata service every ``poll_s``; on a notice it drains its node once, as
``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N`` with ``N``
taken from the notice's time (minus ``margin_s``). Ray Train then tells the workers
(``ray.train`` preemption info), which checkpoint at once and keep training until the node goes.
Errors, timeouts and 404s of the metadata service never drain (logged, retried); a drain that fails
(Ray restarting) is retried at the next poll; once drained, later notices are no-ops.

It outlives Ray restarts: it is not a Ray process (``ray stop`` kills only Ray's own), it holds no
Ray connection between polls, and it looks up its node's id when it drains (the alive node with this
machine's IP, or ``--node-id``). A file lock keeps one watcher per node, so ``ray up`` may start it
again on every restart.

The decisions (:class:`SpotWatch`) are pure; the HTTP client and the drain are thin.
"""

from __future__ import annotations

import calendar
import fcntl
import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("kilm_ray.spot")

TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TOKEN_TTL_S = 21600
NOTICE_S = 120  # AWS's warning time, for a notice whose time cannot be read


class ImdsError(RuntimeError):
    """The metadata service did not answer usefully (error status, timeout, unreachable)."""


# ----------------------------------------------------------------------------------------------
# Pure decisions
# ----------------------------------------------------------------------------------------------


def parse_time(value: str) -> Optional[float]:
    """Epoch seconds of an IMDS timestamp such as ``2026-11-29T08:22:00Z`` (None if unreadable)."""
    try:
        return float(calendar.timegm(time.strptime(value.strip(), "%Y-%m-%dT%H:%M:%SZ")))
    except (AttributeError, ValueError):
        return None


def notice_deadline(body: str, now: float, margin_s: float) -> tuple[str, int]:
    """(action, seconds left to drain) of an instance-action body: the notice's time minus now and
    ``margin_s``, at least 1; two minutes from now if the time cannot be read."""
    try:
        notice = json.loads(body)
    except ValueError:
        notice = {}
    if not isinstance(notice, dict):
        notice = {}
    at = parse_time(str(notice.get("time", ""))) if notice.get("time") else None
    left = (at - now if at is not None else NOTICE_S) - margin_s
    return str(notice.get("action", "unknown")), max(1, int(left))


@dataclass
class Observation:
    """One look at the metadata service: each part is the body, None for 404, or an ImdsError."""

    action: object = None
    rebalance: object = None


@dataclass(frozen=True)
class Drain:
    action: str
    deadline_s: int
    body: str


class SpotWatch:
    """What to do after each look: log lines, and a :class:`Drain` order until one succeeded."""

    def __init__(self, margin_s: float):
        self.margin_s = margin_s
        self.drained = False
        self.rebalance_seen = False
        self.errors = 0

    def observe(self, seen: Observation, now: float) -> tuple[list[str], Optional[Drain]]:
        lines: list[str] = []
        for part in (seen.action, seen.rebalance):
            if isinstance(part, Exception):
                self.errors += 1
                lines.append(f"metadata service: {part} (retrying; nothing drained)")
                break
        if isinstance(seen.rebalance, str) and not self.rebalance_seen:
            self.rebalance_seen = True
            lines.append(f"rebalance recommendation (early warning, a reclaim may follow): {seen.rebalance.strip()}")
        if not isinstance(seen.action, str) or self.drained:
            return lines, None
        action, deadline = notice_deadline(seen.action, now, self.margin_s)
        lines.append(f"spot interruption notice: {seen.action.strip()} -> draining this node, deadline in {deadline} s")
        return lines, Drain(action, deadline, seen.action.strip())

    def drain_done(self) -> None:
        self.drained = True


def node_to_drain(nodes: list[dict], ip: str) -> Optional[str]:
    """The id of the one alive Ray node at ``ip`` (``nodes``: ``{"node_id", "ip", "alive"}``), or
    None when there is none or several (then only ``--node-id`` can say which)."""
    found = [n["node_id"] for n in nodes if n["alive"] and n["ip"] == ip]
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------------------------
# The metadata service (IMDSv2)
# ----------------------------------------------------------------------------------------------


class Imds:
    """A session-token IMDSv2 client at ``base`` (``http://169.254.169.254`` on EC2)."""

    def __init__(self, base: str, timeout_s: float = 2.0):
        self.base, self.timeout_s = base.rstrip("/"), timeout_s
        self.token: Optional[str] = None
        self.token_until = 0.0

    def _request(self, method: str, path: str, headers: dict) -> tuple[int, str]:
        request = urllib.request.Request(self.base + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise ImdsError(f"{method} {path}: {getattr(exc, 'reason', exc)}") from None

    def _token(self) -> str:
        if self.token is None or time.time() > self.token_until:
            status, body = self._request("PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            if status != 200 or not body:
                raise ImdsError(f"PUT {TOKEN_PATH}: HTTP {status}")
            self.token, self.token_until = body.strip(), time.time() + TOKEN_TTL_S - 60
        return self.token

    def get(self, path: str) -> Optional[str]:
        """The body at ``path``; None on 404 (no notice); ImdsError otherwise."""
        status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._token()})
        if status == 401:  # the token expired early (the service restarted): once more with a new one
            self.token = None
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._token()})
        if status == 404:
            return None
        if status != 200:
            raise ImdsError(f"GET {path}: HTTP {status}")
        return body

    def look(self) -> Observation:
        seen = Observation()
        for name, path in (("action", ACTION_PATH), ("rebalance", REBALANCE_PATH)):
            try:
                setattr(seen, name, self.get(path))
            except ImdsError as exc:
                setattr(seen, name, exc)
        return seen


# ----------------------------------------------------------------------------------------------
# Ray: find this node, drain it
# ----------------------------------------------------------------------------------------------


def ray_nodes(address: str) -> list[dict]:
    """The cluster's nodes from the GCS (no driver connection: the watcher must not hold one)."""
    from ray._private.services import canonicalize_bootstrap_address_or_die
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    gcs = GcsClient(address=canonicalize_bootstrap_address_or_die(address))
    infos = gcs.get_all_node_info(timeout=10).values()
    return [{"node_id": info.node_id.hex(), "ip": info.node_manager_address,
             "alive": info.state == GcsNodeInfo.GcsNodeState.ALIVE} for info in infos]


def this_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def drain_node(address: str, node_id: str, drain: Drain) -> None:
    """``ray drain-node`` for a preemption with the notice's deadline; raises on failure."""
    beside = Path(sys.executable).with_name("ray")  # the Ray of this interpreter first
    ray = str(beside) if beside.exists() else (shutil.which("ray") or "ray")
    cmd = [ray, "drain-node", "--address", address, "--node-id", node_id, "--reason",
           "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", f"spot {drain.action} notice: {drain.body}"[:500],
           "--deadline-remaining-seconds", str(drain.deadline_s)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"ray drain-node exited {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpotWatchSettings:
    imds: str = "http://169.254.169.254"
    ray_address: str = "auto"
    node_id: Optional[str] = None
    poll_s: float = 5.0
    margin_s: float = 15.0
    lock_file: str = "/tmp/kilm-ray-spot-watch.lock"
    once: bool = False
    imds_timeout_s: float = 2.0


def watch(settings: SpotWatchSettings) -> int:
    """Run until killed (or, with ``once``, until the node is drained). Returns the exit status."""
    lock = open(settings.lock_file, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.info("another spot watcher holds %s: this one exits", settings.lock_file)
        return 0
    imds, state = Imds(settings.imds, settings.imds_timeout_s), SpotWatch(settings.margin_s)
    log.info("watching %s for spot interruption notices every %g s", settings.imds, settings.poll_s)
    while True:
        lines, order = state.observe(imds.look(), time.time())
        for line in lines:
            log.warning("%s", line)
        if order is not None:
            try:
                node = settings.node_id or node_to_drain(ray_nodes(settings.ray_address), this_ip())
                if node is None:
                    raise RuntimeError(f"no single alive Ray node at {this_ip()} (pass --node-id)")
                drain_node(settings.ray_address, node, order)
                state.drain_done()
                log.warning("drained Ray node %s (preemption, deadline in %d s)", node, order.deadline_s)
            except Exception as exc:  # noqa: BLE001 - Ray may be restarting: the next poll retries
                log.error("could not drain this node yet: %s (retrying)", exc)
        if settings.once and state.drained:
            return 0
        time.sleep(settings.poll_s)
