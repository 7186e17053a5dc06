"""The spot watcher (`kilm-ray spot-watch`) against a fake IMDSv2 on loopback: a notice becomes one
drain with the notice's deadline; errors, timeouts and 404s never drain; the rebalance advice is
logged once. The drain itself, on a real two-node Ray cluster with training running, is
tests/test_elastic.py. Also: Ray 2.60's autoscaler does not poll notices (why the watcher exists),
`ray stop` does not kill the watcher, and cluster.yaml starts one on every worker node."""

import time
from pathlib import Path

import pytest
import yaml

from kilm_ray.train.spot import Imds, ImdsError, Observation, SpotWatch, node_to_drain, notice_deadline, parse_time

from conftest import REPO
from fake_imds import FakeImds


def test_a_notice_drains_once_with_its_deadline_and_nothing_else_drains():
    watch = SpotWatch(margin_s=15)
    with FakeImds() as imds:
        client = Imds(imds.url, timeout_s=0.3)
        assert watch.observe(client.look(), time.time()) == ([], None)  # 404: no notice
        imds.fail = 2  # the service errs: logged, no drain
        lines, order = watch.observe(client.look(), time.time())
        assert order is None and "HTTP 500" in lines[0] and "nothing drained" in lines[0]
        imds.delay_s = 0.6  # slower than the client waits: a timeout, no drain
        lines, order = watch.observe(client.look(), time.time())
        assert order is None and "nothing drained" in lines[0]
        imds.delay_s = 0.0
        imds.rebalance = {"noticeTime": "2026-11-29T08:17:00Z"}
        lines, order = watch.observe(client.look(), time.time())
        assert order is None and lines == ['rebalance recommendation (early warning, a reclaim may follow): '
                                           '{"noticeTime": "2026-11-29T08:17:00Z"}']
        imds.notice(120)
        lines, order = watch.observe(client.look(), time.time())
        assert order.action == "terminate" and 100 <= order.deadline_s <= 105  # 120 s minus the 15 s margin
        assert "spot interruption notice" in lines[-1] and not any("rebalance" in line for line in lines)
        _, again = watch.observe(client.look(), time.time())
        assert again is not None  # not drained yet (the drain failed, say): ordered again
        watch.drain_done()
        imds.notice(60, action="stop")  # a second notice is a no-op
        assert watch.observe(client.look(), time.time()) == ([], None)
        assert all(r.startswith(("PUT /latest/api/token", "GET /latest/meta-data/")) for r in imds.requests)


def test_the_token_is_refreshed_when_the_service_forgets_it():
    with FakeImds() as imds:
        client = Imds(imds.url, timeout_s=1)
        assert client.get("/latest/meta-data/spot/instance-action") is None
        imds.tokens.clear()  # the service restarted: 401, then a new token
        imds.notice(30)
        assert '"terminate"' in client.get("/latest/meta-data/spot/instance-action")
        assert sum(r.startswith("PUT") for r in imds.requests) == 2
    with pytest.raises(ImdsError):  # nobody there
        Imds(imds.url, timeout_s=0.3).get("/latest/meta-data/spot/instance-action")


def test_notice_deadlines_and_node_lookup():
    now = parse_time("2026-11-29T08:20:00Z")
    assert notice_deadline('{"action": "terminate", "time": "2026-11-29T08:22:00Z"}', now, 15) == ("terminate", 105)
    assert notice_deadline('{"action": "stop", "time": "2026-11-29T08:19:00Z"}', now, 15) == ("stop", 1)  # late
    assert notice_deadline("not json", now, 15) == ("unknown", 105)  # unreadable: AWS's two minutes
    nodes = [{"node_id": "a", "ip": "10.0.0.1", "alive": True}, {"node_id": "b", "ip": "10.0.0.2", "alive": False},
             {"node_id": "c", "ip": "10.0.0.2", "alive": True}]
    assert node_to_drain(nodes, "10.0.0.2") == "c"  # after a Ray restart: the node's new id
    assert node_to_drain(nodes + [{"node_id": "d", "ip": "10.0.0.2", "alive": True}], "10.0.0.2") is None
    assert node_to_drain(nodes, "10.0.0.9") is None
    assert SpotWatch(15).observe(Observation(action=ImdsError("x"), rebalance=None), now)[1] is None


def test_ray_260_autoscaler_does_not_poll_spot_notices_and_ray_stop_spares_the_watcher():
    """If a Ray upgrade starts polling the instance-action notice, this fails: the watcher may go."""
    import ray
    from ray.autoscaler._private.constants import RAY_PROCESSES

    autoscaler = Path(ray.__file__).parent / "autoscaler"
    sources = "".join(p.read_text(errors="replace") for p in autoscaler.rglob("*.py"))
    assert "instance-action" not in sources and "169.254.169.254" not in sources
    watcher = "/usr/bin/python3 /home/ray/.local/bin/kilm-ray spot-watch --address=10.0.0.1:6379"
    assert not any((keyword in "kilm-ray") if by_name else (keyword in watcher) for keyword, by_name in RAY_PROCESSES)


def test_cluster_yaml_starts_one_watcher_per_worker_node():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    started = [c for c in raw["worker_start_ray_commands"] if "kilm-ray spot-watch" in c]
    assert len(started) == 1 and "nohup" in started[0] and started[0].rstrip().endswith("&")
    assert raw["worker_start_ray_commands"].index(started[0]) > [i for i, c in enumerate(raw["worker_start_ray_commands"])
                                                                 if "ray start" in c][0]
    assert "--address=$RAY_HEAD_IP:6379" in started[0]


def test_one_watcher_per_node(tmp_path):
    import fcntl

    from kilm_ray.train.spot import SpotWatchSettings, watch

    lock = tmp_path / "watch.lock"
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.time()
        assert watch(SpotWatchSettings(imds="http://127.0.0.1:9", lock_file=str(lock))) == 0
        assert time.time() - started < 1  # exited at once: another watcher holds the lock
