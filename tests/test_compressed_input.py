"""Reading compressed dumps at the boundaries production meets (DESIGN.md §7): enwiki's multistream dump
has ~233 k bz2 streams and a 1 MiB reader meets ~21 k read boundaries, so a stream ends exactly on one in
about one run in five. Hypothesis picks page sets, stream cuts, read sizes (boundary-aligned ones
included) and index-derived byte ranges; every page must come out exactly once, in order. Input that
really ends early, or is damaged, stops with the file and the byte; a failed read is retried in place."""

from __future__ import annotations

import bz2
import gzip
import io
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kilm_ray import storage
from kilm_ray.data.corpus import compressed
from kilm_ray.data.corpus.compressed import (
    CorruptInput, TruncatedInput, decompress_streams, decompressor_factory, resilient_reads,
)
from kilm_ray.data.corpus.dump import ReadUnit, byte_ranges, iter_raw_pages, parse_page_xml, read_units

from conftest import DUMP

COMPRESS = {"bz2": lambda b: bz2.compress(b, compresslevel=1), "gz": lambda b: gzip.compress(b, compresslevel=1)}


def page_xml(i: int, body: str) -> str:
    return (f"<page><title>Page {i}</title><ns>0</ns><id>{i + 1}</id><revision><text>{body}</text></revision>"
            f"</page>\n")


def write_streams(path: Path, groups: list[list[str]], codec: str) -> list[int]:
    """The pages, one compressed stream per group, behind a header stream and before a footer stream (as
    Wikimedia writes them); returns the byte offset of each page group's stream."""
    parts, offsets, at = [COMPRESS[codec](b"<mediawiki>\n")], [], 0
    at += len(parts[0])
    for group in groups:
        data = COMPRESS[codec]("".join(group).encode())
        offsets.append(at)
        parts.append(data)
        at += len(data)
    parts.append(COMPRESS[codec](b"</mediawiki>\n"))
    path.write_bytes(b"".join(parts))
    return offsets


def titles(raws) -> list[str]:
    return [parse_page_xml(r.xml).title for r in raws]


@st.composite
def dumps(draw):
    """Pages with bodies of 0-3,000 characters cut into 1-12 streams, and a read size: any size, or one
    that makes a stream end exactly on a read boundary."""
    n = draw(st.integers(1, 40))
    bodies = draw(st.lists(st.text(alphabet="abcdefghij klmnop\n", max_size=3000), min_size=n, max_size=n))
    pages = [page_xml(i, b) for i, b in enumerate(bodies)]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=min(11, n - 1)))) if n > 1 else []
    groups = [pages[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
    codec = draw(st.sampled_from(["bz2", "gz"]))
    aligned = draw(st.booleans())
    return pages, groups, codec, aligned, draw(st.integers(1, 1 << 14)), draw(st.integers(0, 12))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(dumps(), st.integers(1, 1 << 15), st.sampled_from([1, 7, 64, 1000, compressed.PIECE]))
def test_every_page_once_in_order_whatever_the_streams_reads_and_ranges(dump, unit_bytes, piece):
    """Also wherever a read is cut into the pieces its decompressor is fed (``compressed.PIECE``)."""
    pages, groups, codec, aligned, read_size, boundary_pick = dump
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(compressed, "PIECE", piece):
        path = Path(tmp) / f"dump.xml.{codec}"
        offsets = write_streams(path, groups, codec)
        size = path.stat().st_size
        if aligned:  # a stream ends exactly where a read ends: the read size divides a stream boundary
            boundaries = [*offsets[1:], size - len(COMPRESS[codec](b"</mediawiki>\n"))]
            read_size = boundaries[boundary_pick % len(boundaries)]
        expected = [f"Page {i}" for i in range(len(pages))]
        assert titles(iter_raw_pages(str(path), read_size=read_size)) == expected
        # Byte ranges on stream boundaries, as a multistream index gives them: every page once, in order.
        units = [ReadUnit(str(path), off, length) for off, length in byte_ranges(offsets, size, unit_bytes)]
        got = [t for u in units for t in titles(iter_raw_pages(u, read_size=read_size))]
        assert got == expected


def test_a_stream_that_ends_on_a_read_boundary_does_not_end_the_dump(tmp_path, shared_data):
    """The bug of issue 31: the finished decompressor was kept when a stream ended exactly at the end of a
    read, the next read raised 'End of stream already reached', and the rest of the dump was recorded as
    truncated (half of a valid 206-page dump, and the run committed)."""
    text = bz2.decompress(DUMP.read_bytes()).decode()
    head, *rest = text.split("<page>")
    pages = ["<page>" + p.split("</page>")[0] + "</page>\n" for p in rest]
    path = tmp_path / "dump.xml.bz2"
    first = bz2.compress((head + "".join(pages[:103])).encode())
    path.write_bytes(first + bz2.compress("".join(pages[103:]).encode()) + bz2.compress(b"</mediawiki>\n"))
    divisor = max(d for d in range(1, 10_000) if len(first) % d == 0)
    for read_size in (len(first), divisor):  # reads that end exactly where the first stream does
        assert len(list(iter_raw_pages(str(path), read_size=read_size))) == 206


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_a_dump_cut_inside_a_stream_stops_with_the_file_and_byte(data):
    pages = [page_xml(i, "x" * 200 * i) for i in range(12)]
    codec = data.draw(st.sampled_from(["bz2", "gz"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"dump.xml.{codec}"
        offsets = write_streams(path, [pages[:4], pages[4:8], pages[8:]], codec)
        whole = path.read_bytes()
        cut = data.draw(st.integers(1, len(whole) - 1))
        assume(cut not in offsets and cut != len(whole) - len(COMPRESS[codec](b"</mediawiki>\n")))
        path.write_bytes(whole[:cut])
        read_size = data.draw(st.integers(1, 4096))
        piece = data.draw(st.sampled_from([1, 13, 512, compressed.PIECE]))
        with pytest.raises(TruncatedInput) as err, mock.patch.object(compressed, "PIECE", piece):
            list(iter_raw_pages(str(path), read_size=read_size))
        assert err.value.offset == cut and str(path) in str(err.value)
        kept = list(iter_raw_pages(str(path), keep_truncated=True, read_size=read_size))
        assert kept[-1].xml is None and "ended early" in kept[-1].error
        assert titles(kept[:-1]) == [f"Page {i}" for i in range(len(kept) - 1)]  # a prefix, none twice


def test_an_empty_compressed_dump_is_a_truncated_one(tmp_path):
    empty = tmp_path / "dump.xml.bz2"
    empty.write_bytes(b"")
    with pytest.raises(TruncatedInput, match="holds no compressed data from byte 0"):
        list(iter_raw_pages(str(empty)))


def test_damaged_bytes_name_the_stream_they_are_in(tmp_path):
    path = tmp_path / "dump.xml.bz2"
    offsets = write_streams(path, [[page_xml(0, "a")], [page_xml(1, "b" * 500)]], "bz2")
    data = bytearray(path.read_bytes())
    data[offsets[1] + 20] ^= 0xFF  # inside the second page stream's compressed block
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptInput, match=rf"not valid compressed data in the stream that starts at byte {offsets[1]}"):
        list(iter_raw_pages(str(path)))


class FlakyFile(io.BytesIO):
    """A file whose reads fail at the given offsets, once each (an S3 connection reset)."""

    def __init__(self, data: bytes, pos: int, fail_at: set, log: list):
        super().__init__(data)
        self.seek(pos)
        self.fail_at, self.log = fail_at, log

    def read(self, n=-1):
        if self.tell() in self.fail_at:
            self.fail_at.discard(self.tell())
            self.log.append(self.tell())
            raise OSError("connection reset by peer")
        return super().read(n)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=5000), st.integers(1, 700), st.data())
def test_a_failed_read_resumes_at_its_byte(payload, read_size, data):
    fail_at = set(data.draw(st.lists(st.integers(0, len(payload) - 1), max_size=4)))
    log, opened, slept = [], [], []

    def open_at(pos):
        opened.append(pos)
        return FlakyFile(payload, pos, fail_at, log)

    out = b"".join(resilient_reads(open_at, "s3://bkt/dump.xml.bz2", read_size=read_size, sleep=slept.append))
    assert out == payload
    assert opened[1:] == log  # every failure re-opened the input at the byte it had reached


def test_a_read_that_keeps_failing_is_a_transient_input_error():
    def open_at(pos):
        raise OSError("AWS Error NETWORK_CONNECTION")

    slept = []
    with pytest.raises(storage.InputError, match=r"s3://b/k: a read kept failing at byte 0 \(4 attempts\)") as err:
        list(resilient_reads(open_at, "s3://b/k", sleep=slept.append))
    assert err.value.transient and slept == [1.0, 2.0, 4.0]

    def missing(pos):
        raise FileNotFoundError("s3://b/k")

    slept.clear()
    with pytest.raises(FileNotFoundError):  # permanent: no retry, no wait
        list(resilient_reads(missing, "s3://b/k", sleep=slept.append))
    assert slept == []


def test_multi_member_gzip_ending_on_a_read_boundary_is_read_whole():
    """The knowledge-base reader's own gzip loop had the same fault as the dump reader's (a finished
    member kept when it ended on a read boundary: zlib then hides the rest in unused_data, silently)."""
    members = [gzip.compress(f"line {i}\n".encode() * 50) for i in range(3)]
    reads = iter([members[0], members[1] + members[2]])
    out = b"".join(decompress_streams(reads, "kb.jsonl.gz", decompressor_factory("kb.jsonl.gz")))
    assert out == b"".join(f"line {i}\n".encode() * 50 for i in range(3))


def test_read_units_of_a_multistream_dump_read_every_page_once(tmp_path, shared_data):
    """The planner's own ranges (index -> ranges) over the real excerpt, with small units."""
    from kilm_ray.data.corpus.dump import write_multistream

    text = bz2.decompress(DUMP.read_bytes()).decode()
    pages = ["<page>" + p.split("</page>")[0] + "</page>" for p in text.split("<page>")[1:]]
    dump = write_multistream(pages, str(tmp_path / "x-multistream.xml.bz2"), pages_per_stream=7)
    units = read_units([dump], unit_bytes=20_000)
    assert len(units) > 3
    got = [t for u in units for t in titles(iter_raw_pages(u, read_size=4096))]
    assert got == [parse_page_xml(p).title for p in pages]


# ---------------------------------------------------------------------------------------------------
# Knowledge-base files read as byte ranges of one bz2 stream (kilm_ray.data.corpus.ranges)


def _lines(seed: int, n: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 90))) for _ in range(n)]


def false_magics(rate: int, salt: int):
    """A magic finder that also reports false candidates: a block or end-of-stream magic 'found' wherever
    one of a few salted 2-byte patterns occurs (about one in ``rate`` bytes), its bit shift and kind taken
    from the bytes after it, so every range that reads those bytes sees the same false candidates."""
    import random

    from kilm_ray.data.corpus.ranges import BLOCK_MAGIC, EOS_MAGIC, find_magics

    rng = random.Random(salt)
    patterns = {rng.randbytes(2) for _ in range(max(1, 65536 // rate))}

    def find(data: bytes, start: int = 0, stop=None):
        stop = len(data) if stop is None else stop
        found = find_magics(data, start, stop)
        for pattern in patterns:
            i = data.find(pattern, start, stop)
            while 0 <= i < len(data) - 7:
                found.append((8 * i + data[i + 2] % 8, BLOCK_MAGIC if data[i + 3] & 1 else EOS_MAGIC))
                i = data.find(pattern, i + 1, stop)
        return sorted(set(found))

    return find


def range_lines(r, find) -> list[str]:
    from kilm_ray.data.corpus import ranges

    blocks = ranges._bz2_blocks(r.uri, r.offset, None if r.length < 0 else r.offset + r.length, find=find)
    inside, beyond = ranges._until_beyond(blocks)
    return [line.decode().rstrip("\n") for line in ranges.owned_lines(inside, beyond, r.index == 0)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6), st.integers(200, 3000), st.integers(3_000, 120_000), st.integers(2_000, 40_000),
       st.integers(0, 10**6), st.sampled_from([1, 2]))
def test_false_block_magics_are_passed_over_and_every_line_read_once(seed, n, unit, rate, salt, streams):
    """Whatever false magics the compressed bytes hold (here: many, anywhere, block and end-of-stream), byte
    ranges of a bz2 file give every line once, in order; a candidate that does not decompress is not a block."""
    from unittest import mock

    from kilm_ray.data.corpus import ranges

    lines = _lines(seed, n)
    data = ("\n".join(lines) + "\n").encode()
    cut = len(data) // 2
    compressed = bz2.compress(data, 1) if streams == 1 else bz2.compress(data[:cut], 1) + bz2.compress(data[cut:], 1)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(ranges, "MAX_BLOCK_BYTES", 256 << 10):
        path = Path(tmp) / "kb.jsonl.bz2"
        path.write_bytes(compressed)
        planned = ranges.plan_ranges(str(path), len(compressed), unit)
        assert [line for r in planned for line in range_lines(r, false_magics(rate, salt))] == lines


def test_a_bz2_range_cut_short_is_a_truncated_input(tmp_path):
    from kilm_ray.data.corpus.ranges import iter_range_lines, plan_ranges

    data = ("\n".join(_lines(1, 3000)) + "\n").encode()
    compressed = bz2.compress(data, 1)
    path = tmp_path / "kb.jsonl.bz2"
    path.write_bytes(compressed[: len(compressed) - 5000])
    planned = plan_ranges(str(path), path.stat().st_size, 50_000)
    with pytest.raises(TruncatedInput, match="ends inside a bzip2 block"):
        for r in planned:
            list(iter_range_lines(r))


def test_the_one_line_a_user_sees_is_the_tasks_own_error():
    """A read task's TruncatedInput reaches the driver wrapped by Ray (an instance of both RayTaskError and
    TruncatedInput, whose message carries the remote traceback); the command line prints the task's own
    one-line message (``kilm-ray preprocess`` on a cut dump: exit 2, that line)."""
    import pickle

    from ray.exceptions import RayTaskError

    from kilm_ray.errors import input_error_of

    cause = pickle.loads(pickle.dumps(TruncatedInput("s3://b/dump.xml.bz2", 847935, "ends at byte 847935")))
    wrapped = RayTaskError("ReadStreaming", "Traceback (most recent call last): ...", cause).as_instanceof_cause()
    assert isinstance(wrapped, TruncatedInput) and str(wrapped) != str(cause)  # Ray's header, pid, ip
    assert input_error_of(wrapped) is cause
    assert str(cause) == "s3://b/dump.xml.bz2: ends at byte 847935" and cause.offset == 847935


def _read_ranges(path: Path, unit: int) -> list[str]:
    from kilm_ray.data.corpus.ranges import iter_range_lines, plan_ranges

    return [line for r in plan_ranges(str(path), path.stat().st_size, unit) for line in iter_range_lines(r)]


def test_a_damaged_bz2_block_stops_the_read_instead_of_vanishing(tmp_path):
    """A block that fails its CRC where a real block must start (after one that decompressed) is damage,
    not a false magic: the read stops naming its byte (it once went on without the block's lines)."""
    from kilm_ray.data.corpus.ranges import find_magics

    data = ("\n".join(_lines(3, 6000)) + "\n").encode()
    compressed = bytearray(bz2.compress(data, 1))
    blocks = [bit // 8 for bit, magic in find_magics(bytes(compressed)) if magic == 0x314159265359]
    assert len(blocks) >= 4
    compressed[blocks[2] + 200] ^= 0xFF
    path = tmp_path / "kb.jsonl.bz2"
    path.write_bytes(bytes(compressed))
    for unit in (len(compressed), 60_000):  # one range, and ranges whose starts fall anywhere
        with pytest.raises(CorruptInput, match=rf"the bzip2 block at byte {blocks[2]} does not decompress"):
            _read_ranges(path, unit)


def test_a_file_that_is_not_bz2_or_ends_in_zeros_stops_with_bounded_memory(tmp_path):
    not_bz2 = tmp_path / "kb.jsonl.bz2"
    not_bz2.write_bytes(b'{"name": "x"}\n' * 1000)
    with pytest.raises(CorruptInput, match="is not a bzip2 file"):
        _read_ranges(not_bz2, 4096)
    # A partial download into a preallocated file: the tail is zeros (no block ends, no magic at all).
    data = bz2.compress(("\n".join(_lines(4, 2000)) + "\n").encode(), 1)
    zeros = tmp_path / "zeros.jsonl.bz2"
    zeros.write_bytes(data[: len(data) // 2] + bytes(5 << 20))
    with pytest.raises(CorruptInput):
        _read_ranges(zeros, 1 << 20)


def test_a_range_past_the_end_of_a_shrunk_file_is_truncated(tmp_path):
    path = tmp_path / "dump.xml.bz2"
    offsets = write_streams(path, [[page_xml(0, "a")], [page_xml(1, "b")]], "bz2")
    whole = path.stat().st_size
    path.write_bytes(path.read_bytes()[: offsets[1]])  # the index still plans both streams
    with pytest.raises(TruncatedInput, match=rf"ends at byte {offsets[1]}, \d+ bytes before the end"):
        list(iter_raw_pages(ReadUnit(str(path), offsets[0], whole - offsets[0])))
