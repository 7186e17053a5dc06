"""Shared fixtures: one real local Ray cluster per test session, a real S3 endpoint (moto server on
loopback), the real data in ../shared/data, and a tiny KILM dataset preprocessed from it once."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from kilm_ray.cluster import free_local_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KILM_SHARED_DATA", REPO.parent / "shared" / "data"))
DUMP = SHARED_DATA / "enwiki-sample-pages-articles.xml.bz2"
WORDNET = SHARED_DATA / "wordnet-nouns.jsonl.gz"
GPT2_BPE = SHARED_DATA / "gpt2-bpe"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
RAY = str(Path(sys.executable).parent / "ray")


# The S3 endpoint and credentials must be in the environment before Ray starts, so that every Ray
# worker process (which inherits it) reaches the same moto server.
S3_PORT = free_local_port()
METRICS_PORT = free_local_port()  # Ray's Prometheus endpoint (the Serve metrics test scrapes it)
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{S3_PORT}",
})
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # reports return in 0.2 s, not 2 s
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The node's memory-mapped dataset copies live in this session's own directory (tests run in parallel
# CI jobs on one machine must not share one).
import tempfile  # noqa: E402

os.environ["KILM_RAY_CACHE"] = tempfile.mkdtemp(prefix="kilm_ray_cache_")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "kilm_ray" / "torch_extensions"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DUMP.is_file():
        pytest.fail(f"real test data missing: {DUMP} (CI runs with ../shared beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on 127.0.0.1 (moto's threaded server) and a fresh bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    client.create_bucket(Bucket="kilm")
    yield client
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session. 4 logical CPUs on 2 cores: training workers
    must not starve the Ray Data tasks that feed them (DESIGN.md §4)."""
    import ray

    ray.init(address="local", num_cpus=4, object_store_memory=1024**3, include_dashboard=False, _node_ip_address="127.0.0.1",
             _metrics_export_port=METRICS_PORT,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config():
    from kilm_ray.config import load_config

    return load_config(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, ray_cluster, shared_data, tiny_config) -> str:
    """The real excerpt + WordNet preprocessed with the tiny config (lead sections)."""
    from kilm_ray.data.plan import preprocess

    out = tmp_path_factory.mktemp("tiny_data")
    preprocess(tiny_config, [str(DUMP)], str(out), [str(WORDNET)])
    return str(out)


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory, tiny_data, tiny_config) -> str:
    """A tiny model trained briefly (same worker loop, without Ray) and exported for serving/eval."""
    from kilm_ray.train.local import run_local

    run = tmp_path_factory.mktemp("trained")
    cfg = tiny_config.with_overrides({"train.max_steps": 30, "train.num_workers": 1, "train.eval_every": 30,
                                      "train.checkpoint_every": 30, "train.eval_max_samples": 16})
    run_local(cfg, tiny_data, str(run))
    return str(run / "export")


def _processes_mentioning(text: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(text in arg for arg in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A real `ray start --head` on 127.0.0.1 with its own ports, temp dir and auth token (Ray 2.60 turns
    token auth on), in its own process group. Teardown kills only that cluster: `ray stop` would also kill
    the test session's cluster and its driver."""
    import signal

    temp = tmp_path_factory.mktemp("rayhead")
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    gcs, dash = free_local_port(), free_local_port()
    # The session's own cluster holds Ray's default agent ports (52365, ...): give this one free ports.
    agent_ports = [f"--{flag}={free_local_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    # As with an activated virtualenv: the job's `python` is the one that has kilm_ray's dependencies.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    start = [RAY, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
             "--object-store-memory=600000000", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats", *agent_ports]
    head = subprocess.Popen(start, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                pass
            for proc in _processes_mentioning(str(temp)):
                proc.send_signal(sig)
            try:
                head.wait(grace)
            except subprocess.TimeoutExpired:
                pass


# ----------------------------------------------------------------------------------------------
# One Serve instance for every serving test (test_serve, test_protocols, test_page): three
# applications of the trained export on 127.0.0.1 (the main one built from configs/serve-deploy.yaml
# as `serve deploy` builds it, a tight one for back-pressure, a locked one with a bearer token).
# ----------------------------------------------------------------------------------------------

SERVE_TEST_LIMITS = {"serve.max_batch_size": 8, "serve.batch_wait_timeout_s": 0.2, "serve.max_input_tokens": 64,
                     "serve.max_candidates": 4, "serve.max_request_bytes": 4096}
SERVE_ON_THIS_MACHINE = {"serve.num_gpus": 0, "serve.device": "cpu", "serve.num_cpus": 0.5, "serve.num_replicas": 1,
                         "serve.ingress_replicas": 1, "serve.ingress_cpus": 0.1,
                         # 127.0.0.1 only; the token auth is the "locked" application's (a token file)
                         "serve.auth": "open"}
SERVE_TOKEN = "s3cret"


def serve_deploy_args(model: str) -> dict:
    """The args of configs/serve-deploy.yaml, with this machine's resources and the tests' limits."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "serve-deploy.yaml").read_text())
    return {**raw["applications"][0]["args"], **SERVE_ON_THIS_MACHINE, **SERVE_TEST_LIMITS, "model": model}


class ServeInstance:
    """The serving tests' Serve, started on first use and released on demand: it holds about 1.3 of the
    session cluster's 4 logical CPUs, which a test that needs them free (test_tune) asks back with
    ``no_serve``; a later serving test starts it again."""

    def __init__(self, trained_export: str, tiny_config):
        self.trained_export, self.tiny_config, self.url = trained_export, tiny_config, None

    def ensure(self) -> str:
        if self.url is None:
            self.url = self._start()
        return self.url

    def release(self) -> None:
        if self.url is not None:
            from ray import serve

            serve.shutdown()
            self.url = None

    def _start(self) -> str:
        from ray import serve

        from kilm_ray.serve.app import app_builder, build_application

        trained_export = self.trained_export
        port = free_local_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app_builder(serve_deploy_args(trained_export)), name="kilm", route_prefix="/")
        settings = self.tiny_config.to_dict()["serve"]
        settings.update({k.split(".", 1)[1]: v for k, v in SERVE_TEST_LIMITS.items()}, num_cpus=0.25)
        tight = dict(settings, max_queued_requests=1, max_ongoing_requests=1, max_batch_size=4, body_timeout_s=2.0,
                     batch_wait_timeout_s=0.0)
        serve.run(build_application(trained_export, tight), name="tight", route_prefix="/tight")
        # The locked app waits up to 1 s to fill a batch: a request is surely inside its replica meanwhile.
        token_file = Path(tempfile.mkdtemp(prefix="kilm-serve-token-")) / "token"
        token_file.write_text(SERVE_TOKEN + "\n")
        locked = dict(settings, auth="required", auth_token_file=str(token_file), batch_wait_timeout_s=1.0)
        serve.run(build_application(trained_export, locked), name="locked", route_prefix="/locked")
        return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def serve_instance(ray_cluster, trained_export, tiny_config):
    instance = ServeInstance(trained_export, tiny_config)
    yield instance
    instance.release()


@pytest.fixture
def service(serve_instance) -> str:
    return serve_instance.ensure()


@pytest.fixture
def request_log(caplog):
    """``caplog`` holding the gate's request lines (``ray.serve``) once each: the logger set up as Serve sets
    it (INFO, not propagating), which a test that runs before anything imports Serve would otherwise lack."""
    import logging

    request_log = logging.getLogger("ray.serve")
    level, propagate = request_log.level, request_log.propagate
    request_log.addHandler(caplog.handler)
    request_log.setLevel(logging.INFO)
    request_log.propagate = False
    try:
        yield caplog
    finally:
        request_log.removeHandler(caplog.handler)
        request_log.setLevel(level)
        request_log.propagate = propagate


@pytest.fixture
def no_serve(serve_instance) -> None:
    """The session cluster's CPUs without the serving tests' Serve on them."""
    serve_instance.release()
