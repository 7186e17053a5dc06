"""The preprocessing plan's S3 traffic (issue 31 §5): what the driver sends to S3 before any Ray Data work,
for a dump and a knowledge base of many shards (``kilm-ray import-kb`` writes ~1,500 for Wikidata), against
moto's S3 server on loopback. Counts the requests by method and times ``make_plan``; a real S3 request
costs ~20-50 ms from EC2 where loopback costs ~1-3 ms, so the count is the figure that carries over.

    python bench/plan_s3.py [--shards 1500]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_DATA, save  # noqa: E402


class RequestCounter(logging.Handler):
    """Counts the requests moto's server logs (werkzeug's access log: '"HEAD /bucket/key HTTP/1.1" 200')."""

    def __init__(self):
        super().__init__()
        self.methods: collections.Counter = collections.Counter()

    def emit(self, record):
        message = record.getMessage()
        for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
            if f"{method} /" in message:
                self.methods[method + (" (list)" if method == "GET" and "list-type" in message else "")] += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=1500)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    from kilm_ray.cluster import free_local_port
    from kilm_ray.config import load_config
    from kilm_ray.data.plan import make_plan

    port = args.port or free_local_port()
    os.environ.update(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=True)
    server.start()
    counter = RequestCounter()
    logging.getLogger("werkzeug").addHandler(counter)
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    s3.create_bucket(Bucket="kilm")
    s3.put_object(Bucket="kilm", Key="dump/enwiki-sample-pages-articles.xml.bz2",
                  Body=(SHARED_DATA / "enwiki-sample-pages-articles.xml.bz2").read_bytes())
    names = [f"part-{i:05d}.jsonl" for i in range(args.shards)]
    for i, name in enumerate(names):
        s3.put_object(Bucket="kilm", Key=f"kb/wikidata/{name}", Body=b'{"key": "Q%d", "description": "x"}\n' % i)
    s3.put_object(Bucket="kilm", Key="kb/wikidata/import.json",
                  Body=json.dumps({"complete": True, "files": names}).encode())
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    counter.methods.clear()
    started = time.perf_counter()
    plan = make_plan(cfg, ["s3://kilm/dump/enwiki-sample-pages-articles.xml.bz2"], ["s3://kilm/kb/wikidata"],
                     "s3://kilm/out")
    seconds = time.perf_counter() - started
    requests = dict(counter.methods)
    ray.shutdown()
    server.stop()
    total = sum(requests.values())
    save("plan_s3", {"shards": args.shards, "kb_files_in_plan": len(plan.kb_sources), "make_plan_s": seconds,
                     "requests": requests, "requests_total": total, "requests_per_shard": total / args.shards,
                     "projected_s_at_30ms_per_request": total * 0.030})


if __name__ == "__main__":
    main()
