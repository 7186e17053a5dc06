"""Serving throughput: a concurrent load generator against the running probe service, batched
(``serve.max_batch_size`` > 1) versus unbatched (``max_batch_size=1``), same model, same replica, in one
run: requests/s and p50 / p99 latency over a mix of endpoints and options (describe with different
max_new_tokens and beam widths, disambiguate, appositive, qa, fill), overall and per endpoint.

    python bench/serve_load.py --model DIR [--clients 64] [--requests 512] [--batch 32]

Goals (issue 5): batched >= 3x unbatched throughput on CPU with the tiny model; >= 20x on a GPU with
bart-base. Both applications run side by side on one Serve instance (route prefixes /batched and
/unbatched) and are loaded one after the other.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, local_serve, save  # noqa: E402

TEXTS = [
    "Aristotle was a Greek <ent>philosopher</ent> and polymath during the Classical period.",
    "The <ent>United States</ent> is a country primarily located in North America.",
    "Paris is the capital of <ent>France</ent> and its largest city.",
    "The <ent>Iliad</ent> is an ancient Greek epic poem attributed to Homer.",
    "In <ent>mathematics</ent>, a prime number is a natural number greater than 1.",
    "Albert Einstein developed the theory of <ent>relativity</ent> in the early twentieth century.",
    "The <ent>Amazon River</ent> in South America is the largest river by discharge volume.",
    "Johann Sebastian Bach was a German <ent>composer</ent> of the Baroque period.",
]


CANDIDATES = [{"title": "Philosopher", "description": "a specialist in philosophy"},
              {"title": "Country", "description": "the territory occupied by a nation"},
              {"title": "River", "description": "a large natural stream of water"},
              {"title": "Composer", "description": "someone who composes music as a profession"}]


def mixed_request(i: int, max_new_tokens: int) -> tuple[str, dict]:
    """The i-th request of the mix: half describe (3 lengths, greedy and 2 beams), the rest spread over the
    other endpoints. The same sequence for both runs."""
    text = TEXTS[i % len(TEXTS)]
    kind = i % 8
    if kind < 4:
        body = {"text": text, "max_new_tokens": max(1, max_new_tokens * (1 + kind % 3) // 2)}
        if kind == 3:
            body["num_beams"] = 2
        return "describe", body
    if kind == 4:
        return "disambiguate", {"text": text, "candidates": CANDIDATES}
    if kind == 5:
        return "appositive", {"text": "Aristotle, <appos>, taught Alexander.", "mention": "Aristotle",
                              "max_new_tokens": max_new_tokens}
    if kind == 6:
        return "qa", {"question": "Who taught Alexander the Great?", "max_new_tokens": max_new_tokens // 2}
    return "fill", {"text": text.replace("<ent>", "").replace("</ent>", "").replace(" the ", " the <mask> ", 1)
                    if " the " in text else text.replace("<ent>", "<mask> ").replace("</ent>", ""),
                    "max_new_tokens": max_new_tokens}


def describe_request(i: int, max_new_tokens: int) -> tuple[str, dict]:
    """The earlier, uniform load: describe only, one length, greedy."""
    return "describe", {"text": TEXTS[i % len(TEXTS)], "max_new_tokens": max_new_tokens}


def load(url: str, clients: int, requests: int, max_new_tokens: int, mix: str = "mixed") -> dict:
    import httpx

    make = mixed_request if mix == "mixed" else describe_request

    def one(i: int) -> tuple[str, float]:
        endpoint, body = make(i, max_new_tokens)
        start = time.perf_counter()
        r = http.post(f"{url}/v1/{endpoint}", json=body)
        r.raise_for_status()
        return endpoint, time.perf_counter() - start

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(timeout=600, limits=limits) as http:
        for i in range(min(clients, 8)):  # warm-up: replicas loaded, code paths compiled
            one(i)
        started = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            timed = list(pool.map(one, range(requests)))
        elapsed = time.perf_counter() - started

    def summary(latencies: list[float]) -> dict:
        latencies = sorted(latencies)
        return {"requests": len(latencies), "p50_ms": 1000 * statistics.median(latencies),
                "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))], "mean_ms": 1000 * statistics.fmean(latencies)}

    per_endpoint: dict[str, list[float]] = {}
    for endpoint, seconds in timed:
        per_endpoint.setdefault(endpoint, []).append(seconds)
    return {**summary([t for _, t in timed]), "seconds": elapsed, "requests_per_s": requests / elapsed,
            "per_endpoint": {k: summary(v) for k, v in sorted(per_endpoint.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="an exported model directory")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=4)
    parser.add_argument("--mix", choices=["mixed", "describe"], default="mixed",
                        help="mixed endpoints and options (default) or the uniform describe-only load")
    parser.add_argument("--name", default="serve_load")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import httpx
    import ray
    from ray import serve

    from kilm_ray.config import load_config
    from kilm_ray.serve.app import build_application

    cfg = load_config(args.config, args.overrides)
    port = local_serve(args.cpus)
    base = cfg.to_dict()["serve"]
    base.update(max_ongoing_requests=max(4 * args.batch, args.clients), max_queued_requests=-1,
                max_input_tokens=512)
    results = {}
    for name, batch in (("unbatched", 1), ("batched", args.batch)):
        settings = dict(base, max_batch_size=batch, batch_wait_timeout_s=args.wait_ms / 1000 if batch > 1 else 0.0)
        serve.run(build_application(args.model, settings), name=name, route_prefix=f"/{name}")
        url = f"http://127.0.0.1:{port}/{name}"
        results[name] = load(url, args.clients, args.requests, args.max_new_tokens, args.mix)
        results[name]["batching"] = httpx.get(f"{url}/v1/model", timeout=60).json()["batching"]
        serve.delete(name)
        print(name, results[name], flush=True)
    serve.shutdown()
    ray.shutdown()
    result = {"config": {k: v for k, v in vars(args).items() if k != "overrides"}, **results,
              "throughput_ratio_batched_over_unbatched":
                  results["batched"]["requests_per_s"] / results["unbatched"]["requests_per_s"]}
    save(args.name, result)


if __name__ == "__main__":
    main()
