"""Decompressing many small streams (issue 31): ``decompress_streams`` feeds each decompressor pieces of
``PIECE`` bytes; before, it fed whole 1 MiB reads, and every end of stream copied the rest of the read
(``unused_data``), quadratic in the streams per read. Both ways in one run, alternating, on: gzip files of
many small members and bz2 files of many small streams (synthetic, 1 k - 64 k streams), the real dump
excerpt (../shared/data), and one large bz2 stream (no ends of stream: the pieces' own cost).

    python bench/decompress_streams.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_DATA, save  # noqa: E402
from kilm_ray.data.corpus import compressed  # noqa: E402


def small_streams(n: int, compress) -> bytes:
    return b"".join(compress(b"page %07d " % i * 40) for i in range(n))


def seconds(blob: bytes, suffix: str, piece: int) -> float:
    compressed.PIECE = piece
    reads = [blob[i:i + compressed.READ_SIZE] for i in range(0, len(blob), compressed.READ_SIZE)]
    started = time.perf_counter()
    for _ in compressed.decompress_streams(iter(reads), f"x.{suffix}", compressed.decompressor_factory(f"x.{suffix}")):
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    now = compressed.PIECE
    inputs = {f"gzip, {n:,} members": (small_streams(n, gzip.compress), "gz") for n in (1000, 16000, 64000)}
    inputs.update({f"bz2, {n:,} streams": (small_streams(n, bz2.compress), "bz2") for n in (1000, 16000, 64000)})
    excerpt = SHARED_DATA / "enwiki-sample-pages-articles.xml.bz2"
    inputs["the dump excerpt (bz2)"] = (excerpt.read_bytes(), "bz2")
    inputs["one 20 MB bz2 stream"] = (bz2.compress(b"".join(b"line %09d of one stream\n" % i for i in range(800_000))), "bz2")
    rows = []
    for name, (blob, suffix) in inputs.items():
        before, after = [], []
        for _ in range(args.repeat):  # alternating A/B
            before.append(seconds(blob, suffix, compressed.READ_SIZE))
            after.append(seconds(blob, suffix, now))
        b, a = statistics.median(before), statistics.median(after)
        rows.append({"input": name, "compressed_bytes": len(blob), "before_s": b, "after_s": a, "speedup": b / a})
        print(f"{name:28s} {len(blob) / 2**20:7.2f} MiB  whole reads {b:.3f} s  pieces {a:.3f} s  {b / a:.2f}x", flush=True)
    compressed.PIECE = now
    save("decompress_streams", {"piece_bytes": now, "read_bytes": compressed.READ_SIZE, "repeat": args.repeat, "rows": rows})


if __name__ == "__main__":
    main()
