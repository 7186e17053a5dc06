"""``kilm-ray import-kb --wikidata``: Wikidata's JSON dump -> knowledge-base shards that ``preprocess
--knowledge`` reads in parallel.

The dump (local or s3://; .json, .json.bz2 or .json.gz) is cut into byte ranges (``corpus.kb_read_unit_mb``
of compressed bytes; a .bz2 at its compressed blocks, so one file of Wikidata's size is read by as many
tasks as there are CPUs; a .gz is read whole). One Ray Data task per range reads its lines, keeps the
items (``kilm_ray.data.corpus.wikidata``) and writes one shard, ``part-<range>.jsonl.gz``, under a temporary
name then renamed: a task run again after a failure writes the same file. ``import.json`` is written
first as incomplete and last with the shards and the counts; ``preprocess`` refuses an incomplete one.
"""

from __future__ import annotations

import functools
import json
import logging

from kilm_ray import storage
from kilm_ray.config import KilmConfig
from kilm_ray.data.corpus.ranges import TextRange, iter_range_lines, plan_ranges, splittable
from kilm_ray.data.corpus.wikidata import convert_range, sum_counts
from kilm_ray.data.kb import IMPORT_FORMAT, IMPORT_RECORD
from kilm_ray.data.shuffle import task_resources
from kilm_ray.data.stages import write_atomic, write_bytes_atomic

log = logging.getLogger("kilm_ray.pipeline")


def shard_name(index: int) -> str:
    return f"part-{index:05d}.jsonl.gz"


def import_range(item: dict, out: str) -> dict:
    """One Ray Data row per range: convert it, write its shard; the row that comes back is its counts."""
    r = TextRange(**item["range"])
    result: dict = {}

    def write(fs, path: str) -> None:
        with fs.open_output_stream(path, compression="gzip") as f:
            result.update(convert_range(iter_range_lines(r), r.where,
                                        lambda row: f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())))

    write_atomic(storage.join(out, shard_name(r.index)), write)
    return {"counts": json.dumps(result)}


def import_wikidata(dump: str, out: str, cfg: KilmConfig) -> dict:
    import ray.data

    import ray

    from kilm_ray.data.plan import check_shared_storage
    from kilm_ray.data.shuffle import autoscaling_enabled

    storage.check_readable(dump, "Wikidata dump")
    check_shared_storage([("--out", out), ("--wikidata", dump)], sum(1 for n in ray.nodes() if n.get("Alive")),
                         autoscaling_enabled(), cfg.corpus.shared_paths)
    unit = max(1, int(cfg.corpus.kb_read_unit_mb * 2**20))
    size = storage.file_size(dump)
    ranges = plan_ranges(dump, size, unit)
    if not splittable(dump) and size > 2 * unit:
        log.warning("%s (%.0f MB) is read by one task: gzip cannot be split; the .json.bz2 dump is read in "
                    "parallel byte ranges", dump, size / 1e6)
    record_uri = storage.join(out, IMPORT_RECORD)
    write_bytes_atomic(record_uri, json.dumps({"complete": False, "dump": dump}).encode())
    log.info("importing %s (%.0f MB) in %d range(s)", dump, size / 1e6, len(ranges))
    items = [{"range": {"uri": r.uri, "offset": r.offset, "length": r.length, "index": r.index}} for r in ranges]
    done = ray.data.from_items(items, override_num_blocks=len(items)).map(
        functools.partial(import_range, out=out), num_cpus=1, **task_resources(cfg))
    counts = sum_counts([json.loads(row["counts"]) for row in done.take_all()])
    for example in counts["malformed_examples"]:
        log.warning("skipped malformed line %s", example)
    record = {"complete": True, "format": IMPORT_FORMAT, "dump": dump, "files": [shard_name(r.index) for r in ranges],
              **counts}
    write_bytes_atomic(record_uri, json.dumps(record, indent=2).encode())
    return record
