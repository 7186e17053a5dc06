"""Shared fixtures: one real local Ray cluster per test session, a real S3 endpoint (moto server on
loopback), the real data in ../shared/data, and a tiny KILM dataset preprocessed from it once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kilm_ray.cluster import free_local_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KILM_SHARED_DATA", REPO.parent / "shared" / "data"))
DUMP = SHARED_DATA / "enwiki-sample-pages-articles.xml.bz2"
WORDNET = SHARED_DATA / "wordnet-nouns.jsonl.gz"
GPT2_BPE = SHARED_DATA / "gpt2-bpe"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


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

    ray.init(num_cpus=4, object_store_memory=1024**3, include_dashboard=False, _node_ip_address="127.0.0.1",
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
    from kilm_ray.data import preprocess

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
