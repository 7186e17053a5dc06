"""Misbehaving clients against a running probe service on 127.0.0.1, and what normal clients get meanwhile.

One Serve application (the tiny export, serve settings as shipped, on this machine's CPUs), one run:

1. baseline: ``--clients`` normal clients (describe, greedy, ``--max-new-tokens``) for ``--seconds``;
2. attack: the same normal load while another process runs each attack alone, then all at once:
   - ``--slow-bodies`` connections that announce a 60 kB body and send a byte every 2 s (reopened when cut),
   - OpenAI completions with 4 stop sequences of the longest allowed length, and with 15,000-character ones,
   - streamed OpenAI prompt lists whose last prompt is refused (over the input limit),
   - streams whose client reads one event and vanishes.

Reported: the normal clients' success rate and p50 / p99 latency in both phases and their ratio, and what
each attack got (status counts). Goal (issue 33): under attack, normal clients keep >= 99% success and
p99 <= 2x the baseline's.

    python bench/serve_abuse.py --model DIR [--clients 8] [--seconds 40] [--slow-bodies 300]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures as cf
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, local_serve, save  # noqa: E402

TEXT = "Aristotle was a Greek <ent>philosopher</ent> and polymath during the Classical period."


def normal_load(url: str, clients: int, seconds: float, max_new_tokens: int) -> dict:
    """Closed-loop normal clients for ``seconds``: success rate and latency percentiles."""
    import httpx

    stop_at = time.monotonic() + seconds
    latencies: list[float] = []
    failures: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/describe", json={"text": TEXT, "max_new_tokens": max_new_tokens})
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                took = time.perf_counter() - started
                with lock:
                    if status == 200:
                        latencies.append(took)
                    else:
                        failures[str(status)] += 1

    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: client(), range(clients)))
    total = len(latencies) + sum(failures.values())
    ordered = sorted(latencies) or [float("nan")]
    return {"requests": total, "succeeded": len(latencies), "success_rate": len(latencies) / max(total, 1),
            "failures": dict(failures), "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 1),
            "requests_per_s": round(total / seconds, 2)}


# ----------------------------------------------------------------------------------------------
# The attacks (run in their own process, so their client-side work does not slow the normal clients' loop)
# ----------------------------------------------------------------------------------------------


async def slow_body(host: str, port: int, stop_at: float, counts: collections.Counter) -> None:
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/describe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 60000\r\n\r\n{")
            await writer.drain()
            while time.monotonic() < stop_at:
                try:
                    head = await asyncio.wait_for(reader.read(64), 2.0)
                except asyncio.TimeoutError:
                    writer.write(b" ")
                    await writer.drain()
                    continue
                counts[f"slow_body:{head[9:12].decode() or 'closed'}"] += 1
                break
            writer.close()
        except OSError as exc:
            counts[f"slow_body:{type(exc).__name__}"] += 1
            await asyncio.sleep(0.5)


async def long_stops(http, url: str, stop_at: float, counts: collections.Counter) -> None:
    allowed = ["q" * 63 + str(i) for i in range(4)]  # never matches: each token checks all four in full
    refused = ["q" * 15_000 + str(i) for i in range(4)]
    i = 0
    while time.monotonic() < stop_at:
        stops = refused if i % 2 else allowed
        r = await http.post(f"{url}/v1/completions", json={"model": "kilm", "prompt": "Aristotle was a Greek",
                                                          "max_tokens": 32, "stop": stops})
        counts[f"long_stops:{'refused' if i % 2 else 'allowed'}:{r.status_code}"] += 1
        i += 1


async def refused_prompt_lists(http, url: str, stop_at: float, counts: collections.Counter) -> None:
    prompts = ["Aristotle was a Greek"] * 7 + ["word " * 2000]  # the last one is over the input limit
    while time.monotonic() < stop_at:
        r = await http.post(f"{url}/v1/completions", json={"model": "kilm", "prompt": prompts, "max_tokens": 64,
                                                          "stream": True})
        counts[f"prompt_list:{r.status_code}"] += 1


async def vanishing_streams(http, url: str, stop_at: float, counts: collections.Counter) -> None:
    while time.monotonic() < stop_at:
        async with http.stream("POST", f"{url}/v1/describe", json={"text": TEXT, "max_new_tokens": 64,
                                                                   "stream": True}) as r:
            async for _ in r.aiter_bytes():
                break  # one event, then gone
        counts[f"vanishing:{r.status_code}"] += 1


ATTACKS = {"long_stops": long_stops, "prompt_lists": refused_prompt_lists, "vanishing_streams": vanishing_streams}


def attack(url: str, seconds: float, kinds: list[str], slow_bodies: int, result: "mp.Queue") -> None:
    import httpx

    async def run() -> dict:
        host, port = url.removeprefix("http://").split(":")
        stop_at = time.monotonic() + seconds
        counts: collections.Counter = collections.Counter()

        async def guarded(make):
            while time.monotonic() < stop_at:
                try:
                    await make()
                except (httpx.HTTPError, OSError) as exc:
                    counts[type(exc).__name__] += 1

        async with httpx.AsyncClient(timeout=60) as http:
            tasks = [slow_body(host, int(port), stop_at, counts) for _ in range(slow_bodies)] \
                if "slow_bodies" in kinds else []
            for kind, make in ATTACKS.items():
                if kind in kinds:
                    for _ in range(2):
                        tasks.append(guarded(lambda make=make: make(http, url, stop_at, counts)))
            await asyncio.gather(*tasks)
        return dict(counts)

    counts = asyncio.run(run())
    counts["attacker_cpu_s"] = round(time.process_time(), 1)  # this process's own share of the machine's CPUs
    result.put(counts)


def under_attack(url: str, args, kinds: list[str]) -> dict:
    """The normal load while the given attacks run in another process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    attacker = ctx.Process(target=attack, args=(url, args.seconds + 5, kinds, args.slow_bodies, queue))
    attacker.start()
    time.sleep(5)  # the slow bodies connected, the attack loops running
    measured = normal_load(url, args.clients, args.seconds, args.max_new_tokens)
    measured["attacks"] = queue.get(timeout=300)
    attacker.join(60)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="an exported model directory")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--slow-bodies", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=4)
    parser.add_argument("--phases", default="slow_bodies,long_stops,prompt_lists,vanishing_streams,all",
                        help="which attacks to run, one phase each (all: every attack at once)")
    parser.add_argument("--name", default="serve_abuse")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray
    from ray import serve

    from kilm_ray.config import load_config
    from kilm_ray.serve.app import build_application

    settings = load_config(args.config, args.overrides).to_dict()["serve"]
    settings.update(device="cpu", num_gpus=0)
    port = local_serve(args.cpus, settings.get("request_timeout_s"))
    serve.run(build_application(args.model, settings), name="kilm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    normal_load(url, args.clients, 5, args.max_new_tokens)  # warm-up
    baseline = normal_load(url, args.clients, args.seconds, args.max_new_tokens)
    print("baseline", baseline, flush=True)
    phases = {}
    for name in args.phases.split(","):
        kinds = ["slow_bodies", *ATTACKS] if name == "all" else [name]
        phases[name] = under_attack(url, args, kinds)
        phases[name]["p99_ratio"] = round(phases[name]["p99_ms"] / baseline["p99_ms"], 2)
        phases[name]["p50_ratio"] = round(phases[name]["p50_ms"] / baseline["p50_ms"], 2)
        print(name, phases[name], flush=True)
    serve.shutdown()
    ray.shutdown()
    result = {"config": {k: v for k, v in vars(args).items() if k != "overrides"}, "serve": settings,
              "baseline": baseline, "under_attack": phases,
              "goal_met": {name: p["success_rate"] >= 0.99 and p["p99_ratio"] <= 2.0 for name, p in phases.items()}}
    save(args.name, result)


if __name__ == "__main__":
    main()
