"""The preprocessing driver at the shuffle partition counts production gets (issue 31): the same small
synthetic enwiki-shaped dump through ``kilm_ray.data.plan.preprocess`` with ``corpus.shuffle_partitions``
set to each count, every process watched (bench/preprocess_scale.py's watcher).

    python bench/driver_partitions.py --articles 10000 --partitions 32 128 320 640

Why: Ray returns a task result under 100 KiB inline to its owner (the driver, which runs Ray Data's
executor), where it lives in the driver's heap; a shuffle with hundreds of partitions cuts its map
outputs into pieces of tens of KB. Tests at 2 CPUs use 2-32 partitions (pieces of hundreds of KB) and
never enter that regime. Per run: the driver's peak RSS, and what it owns at its peak (object refs, inline
objects in its memory store and their MB, sampled every second in the driver). Goal: driver RSS at 640
partitions <= 1.25x that at 32, on the same data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402
from bench.preprocess_scale import run_once  # noqa: E402
from bench.synthetic_enwiki import write_dump  # noqa: E402


def markdown(result: dict) -> str:
    rows = ["| partitions | wall s | driver peak RSS MB (private) | driver refs at peak | inline objects | inline MB "
            "| largest worker RSS MB | x RSS of the first |", "|" + "---|" * 8]
    first = result["runs"][0]["memory"]["driver"]["peak_rss_mb"]
    for r in result["runs"]:
        d, owned = r["memory"]["driver"], r.get("driver_owned_peak", {})
        rows.append(f"| {r['partitions']} | {r['wall_s']} | {d['peak_rss_mb']} ({d['peak_private_mb']}) | "
                    f"{owned.get('refs', '-')} | {owned.get('memory_store_objects', '-')} | "
                    f"{owned.get('memory_store_mb', '-')} | {r['memory']['worker']['peak_rss_mb']} | "
                    f"{d['peak_rss_mb'] / first:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, nargs="+", default=[32, 128, 320, 640])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kilm_scale")
    parser.add_argument("--name", default="driver_partitions")
    parser.add_argument("overrides", nargs="*", help="more config overrides")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / f"syn-{args.articles}"
    dump = data / "enwiki-synthetic-pages-articles-multistream.xml.bz2"
    if not dump.exists():
        write_dump(args.articles, data)
    runs = []
    for partitions in args.partitions:
        overrides = [f"corpus.shuffle_partitions={partitions}", "corpus.link_resolution=distributed", *args.overrides]
        run = {"partitions": partitions, **run_once(str(dump), None, args.cpus, overrides, args.work)}
        print(json.dumps(run), flush=True)
        runs.append(run)
    result = {"workload": f"synthetic enwiki-shaped multistream dump of {args.articles} articles, configs/tiny.yaml, "
                          f"distributed link resolution, {args.cpus} CPUs",
              "overrides": args.overrides, "runs": runs,
              "driver_rss_largest_over_smallest_partitions": round(
                  runs[-1]["memory"]["driver"]["peak_rss_mb"] / runs[0]["memory"]["driver"]["peak_rss_mb"], 2)}
    save(args.name, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
