"""``kilm-ray import-kb --wikidata`` throughput: rows (entities) per second per CPU on a synthetic dump in
Wikidata's exact layout, against the same conversion in one plain process (no Ray) in the same run.

    python bench/wikidata_import.py --entities 1000000 --cpus 2

The dump (``latest-all.json.bz2``: ``[``, one entity per line with a trailing comma, ``]``; one bzip2
stream, as Wikimedia publishes it) is written once under ``--work`` with a streaming generator: items with
English and other labels, descriptions (90% English), aliases, 4-8 statements (``P31`` and others, with
references) and sitelinks (60% with an English Wikipedia article), about 2 KB of JSON each (real entities
average more: claims dominate; the figures are per MB too); a property every 5,000 entities. The import
runs on a fresh local Ray of ``--cpus`` CPUs; every process is watched for CPU time (bench/preprocess_scale).
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, save  # noqa: E402
from bench.preprocess_scale import run_watched  # noqa: E402

WORDS = ("river city county village school war party church battle house district railway station football "
         "club album song film series novel island mountain lake bridge road company king queen bishop army "
         "navy election museum university college hospital airport species genus family language").split()
LANGS = ["en", "fr", "de", "es", "it", "nl", "ru", "ja", "zh", "pt"]


def _claim(rng: random.Random, qid: str, prop: str, value: str, k: int) -> dict:
    claim = {"mainsnak": {"snaktype": "value", "property": prop, "hash": f"{rng.getrandbits(160):040x}",
                          "datavalue": {"value": {"entity-type": "item", "numeric-id": int(value[1:]), "id": value},
                                        "type": "wikibase-entityid"}, "datatype": "wikibase-item"},
             "type": "statement", "id": f"{qid}${rng.getrandbits(128):032x}-{k}", "rank": "normal"}
    if rng.random() < 0.5:
        claim["references"] = [{"hash": f"{rng.getrandbits(160):040x}", "snaks": {"P143": [
            {"snaktype": "value", "property": "P143", "hash": f"{rng.getrandbits(160):040x}",
             "datavalue": {"value": {"entity-type": "item", "numeric-id": 328, "id": "Q328"},
                           "type": "wikibase-entityid"}, "datatype": "wikibase-item"}]}, "snaks-order": ["P143"]}]
    return claim


def entity(i: int) -> dict:
    rng = random.Random(i)
    qid = f"Q{i + 1}"
    if i % 5000 == 4999:
        return {"type": "property", "datatype": "wikibase-item", "id": f"P{i + 1}",
                "labels": {"en": {"language": "en", "value": f"property {i}"}},
                "descriptions": {"en": {"language": "en", "value": "a synthetic property"}}, "aliases": {},
                "claims": {}, "pageid": i + 1, "ns": 120, "title": f"Property:P{i + 1}", "lastrevid": i,
                "modified": "2024-01-01T00:00:00Z"}
    name = " ".join(rng.choice(WORDS).capitalize() for _ in range(rng.randint(1, 3))) + f" {i}"
    langs = rng.sample(LANGS[1:], rng.randint(1, 5))
    labels = {lang: {"language": lang, "value": name} for lang in ["en", *langs]}
    descriptions = {lang: {"language": lang, "value": f"{rng.choice(WORDS)} in {rng.choice(WORDS)} ({lang})"}
                    for lang in langs}
    if rng.random() < 0.9:
        descriptions["en"] = {"language": "en", "value": f"{rng.choice(WORDS)} of {rng.choice(WORDS)} {i % 997}"}
    aliases = {"en": [{"language": "en", "value": f"{name} {rng.choice(WORDS)}"} for _ in range(rng.randint(0, 3))]}
    claims = {"P31": [_claim(rng, qid, "P31", f"Q{rng.randint(1, 10**6)}", 0)]}
    for k in range(rng.randint(3, 7)):
        prop = f"P{rng.randint(17, 2000)}"
        claims.setdefault(prop, []).append(_claim(rng, qid, prop, f"Q{rng.randint(1, 10**7)}", k + 1))
    sitelinks = {f"{lang}wiki": {"site": f"{lang}wiki", "title": name, "badges": []} for lang in langs[:2]}
    if rng.random() < 0.6:
        sitelinks["enwiki"] = {"site": "enwiki", "title": name, "badges": []}
    return {"type": "item", "id": qid, "labels": labels, "descriptions": descriptions, "aliases": aliases,
            "claims": claims, "sitelinks": sitelinks, "pageid": i + 1, "ns": 0, "title": qid, "lastrevid": 10**9 + i,
            "modified": "2024-05-01T12:00:00Z"}


def write_dump(n: int, path: Path) -> dict:
    """One bzip2 stream (level 9, as published), written as generated."""
    compressor = bz2.BZ2Compressor(9)
    raw = 0
    with open(path, "wb") as f:
        f.write(compressor.compress(b"[\n"))
        for i in range(n):
            line = (json.dumps(entity(i), ensure_ascii=False, separators=(",", ":")) +
                    (",\n" if i < n - 1 else "\n")).encode()
            raw += len(line)
            f.write(compressor.compress(line))
        f.write(compressor.compress(b"]\n"))
        f.write(compressor.flush())
    return {"entities": n, "json_mb": round(raw / 1e6, 1), "bz2_mb": round(path.stat().st_size / 1e6, 1)}


CHILD = """
import json, logging, os, sys
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from kilm_ray.cluster import init_ray
from kilm_ray.config import load_config
from kilm_ray.data.import_kb import import_wikidata
args = json.loads(sys.argv[1])
init_ray(num_cpus=args["cpus"])
record = import_wikidata(args["dump"], args["out"], load_config(None, args["overrides"]))
print("RESULT " + json.dumps({k: v for k, v in record.items() if k not in ("files", "malformed_examples")}))
"""


def plain_process(dump: Path) -> dict:
    """The same conversion in one process, no Ray: the baseline of rows per CPU-second."""
    from kilm_ray.data.corpus.ranges import TextRange, iter_range_lines
    from kilm_ray.data.corpus.wikidata import convert_range

    started, cpu = time.perf_counter(), time.process_time()
    rows = []
    counts = convert_range(iter_range_lines(TextRange(str(dump))), str, lambda row: rows.append(1))
    return {"wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu, 1),
            "entities": counts["entities"], "rows": counts["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kilm_wikidata")
    parser.add_argument("--name", default="wikidata_import")
    parser.add_argument("--skip-plain", action="store_true", help="skip the one-process baseline")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. corpus.kb_read_unit_mb=32")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dump = args.work / f"latest-all-{args.entities}.json.bz2"
    meta_path = dump.with_suffix(".meta.json")
    if not meta_path.exists():
        started = time.time()
        meta = write_dump(args.entities, dump)
        meta["written_s"] = round(time.time() - started, 1)
        meta_path.write_text(json.dumps(meta))
    meta = json.loads(meta_path.read_text())
    print(json.dumps(meta), flush=True)

    out = tempfile.mkdtemp(dir=args.work, prefix="kb-")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    child = json.dumps({"cpus": args.cpus, "dump": str(dump), "out": out, "overrides": args.overrides})
    proc, lines, wall, watcher = run_watched([sys.executable, "-c", CHILD, child], env)
    record = next((json.loads(l.split("RESULT ", 1)[1]) for l in lines if l.startswith("RESULT ")), None)
    if proc.returncode or record is None:
        raise RuntimeError("import failed:\n" + "".join(lines[-40:]))
    memory = watcher.summary()
    ranges = next((l.split(" in ", 1)[1].split()[0] for l in lines if "range(s)" in l), "?")
    ray_run = {"cpus": args.cpus, "ranges": ranges, "wall_s": round(wall, 1), "cpu_s": memory["cpu_s_all_processes"],
               "entities_per_s": round(record["entities"] / wall),
               "entities_per_cpu_s": round(record["entities"] / memory["cpu_s_all_processes"]),
               "entities_per_s_per_cpu": round(record["entities"] / wall / args.cpus),
               "json_mb_per_s_per_cpu": round(meta["json_mb"] / wall / args.cpus, 1),
               "largest_worker_rss_mb": memory.get("worker", {}).get("peak_rss_mb"),
               "driver_rss_mb": memory.get("driver", {}).get("peak_rss_mb"), "record": record}
    subprocess.run(["rm", "-rf", out])
    result = {"workload": "synthetic Wikidata JSON dump (bench/wikidata_import.py), one bzip2 stream",
              "dump": meta, "ray": ray_run}
    if not args.skip_plain:
        plain = plain_process(dump)
        plain["entities_per_cpu_s"] = round(plain["entities"] / plain["cpu_s"])
        result["plain_process"] = plain
        result["ray_over_plain_per_cpu_s"] = round(ray_run["entities_per_cpu_s"] / plain["entities_per_cpu_s"], 2)
    save(args.name, result)


if __name__ == "__main__":
    main()
