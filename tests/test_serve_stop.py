"""`kilm-ray serve` stops gracefully: on SIGTERM (what systemd and Kubernetes send) or Ctrl-C (SIGINT to
the whole foreground process group), the requests in flight finish, new ones get the documented 503, and
the command exits 0 with one line: no Ray fatal-signal stack dump. A real `kilm-ray serve` process with its
own local Ray, on 127.0.0.1."""

import concurrent.futures as cf
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kilm_ray.cluster import free_local_port

from conftest import TINY_CONFIG

pytestmark = pytest.mark.slow

TEXT = "Aristotle was a Greek <ent>philosopher</ent>."


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_kilm_ray_serve_stops_gracefully(trained_export, how):
    port = free_local_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # Requests wait up to 3 s for their batch to fill: they are surely in flight when the signal comes.
    cmd = [str(Path(sys.executable).parent / "kilm-ray"), "serve", "--model", trained_export, "--port", str(port),
           "--config", str(TINY_CONFIG), "serve.device=cpu", "serve.num_cpus=0.5", "serve.batch_wait_timeout_s=3",
           "serve.max_batch_size=64", "serve.drain_timeout_s=30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        with cf.ThreadPoolExecutor(16) as pool:
            in_flight = [pool.submit(httpx.post, f"{url}/v1/describe", json={"text": TEXT, "max_new_tokens": 4},
                                     timeout=120) for _ in range(3)]
            time.sleep(0.5)
            if how == "SIGTERM":
                proc.send_signal(signal.SIGTERM)  # to the process, as `kill PID` and Kubernetes do
            else:
                os.killpg(proc.pid, signal.SIGINT)  # to the foreground process group, as a terminal's Ctrl-C does
            later = []
            while proc.poll() is None and len(later) < 200:
                try:
                    later.append(httpx.post(f"{url}/v1/describe", json={"text": TEXT, "max_new_tokens": 4}, timeout=120))
                except httpx.HTTPError:
                    break  # the server is gone
                time.sleep(0.1)
            answers = [f.result() for f in in_flight]
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    refused = [r for r in later if r.status_code == 503]
    assert refused and all(r.status_code in (200, 503) for r in later), [r.status_code for r in later]
    assert "stopping" in refused[0].json()["error"] and refused[0].headers["retry-after"] == "1"
    for dump in ("SIGTERM received", "SIGINT received", "logging.cc", "Traceback", "KeyboardInterrupt"):
        assert dump not in out, out[-3000:]
    lines = out.strip().splitlines()
    signame = "SIGTERM" if how == "SIGTERM" else "SIGINT"
    assert lines[-1].startswith(f"kilm-ray serve: stopped on {signame}") and "cut off" not in lines[-1]
    assert int(re.search(r"(\d+) request\(s\) in flight finished", lines[-1]).group(1)) >= 3
    served = next(i for i, line in enumerate(lines) if "kilm probes served at" in line)
    assert lines[served + 1:] == [lines[-1]], lines[served + 1:]  # one line after the signal, nothing else
