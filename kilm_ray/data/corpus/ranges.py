"""One large text file read as byte ranges in parallel: every line exactly once, whichever range it
straddles.

A knowledge base of 100 M lines, or Wikidata's JSON dump (one entity per line), is one file; read by one
task it is hours of serial work. A :class:`TextRange` is ``length`` bytes of the file from ``offset``:

- plain text: bytes, cut anywhere;
- ``.bz2``: the bzip2 *blocks* whose start lies in the range. A bzip2 stream is a sequence of blocks
  (100-900 kB of text each), each starting with a 48-bit magic number at any *bit* position; a block
  copied out at its bit offset behind a fresh stream header, with an end-of-stream marker carrying its
  own CRC, decompresses on its own. So a single-stream file (Wikidata's ``latest-all.json.bz2``) splits
  like a multistream one (the ``lbzip2`` tool does the same);
- ``.gz``: cannot be split (DEFLATE has no restart points); one range reads it all.

A line belongs to the range in which it *starts*, the byte that starts a range belonging to the range
before (the rule of Hadoop's line reader): a range skips through its first newline, unless it is the
first range, and reads past its end to finish its last line, or the line that starts exactly at its end
(:func:`owned_lines`). All pure Python over byte streams; no Ray.
"""

from __future__ import annotations

import bz2
import codecs
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from kilm_ray import storage

READ_SIZE = 4 << 20
BLOCK_MAGIC = 0x314159265359  # start of a bzip2 block (BCD of pi)
EOS_MAGIC = 0x177245385090  # end of a bzip2 stream (BCD of sqrt(pi)), then the stream CRC
_MAGIC_BITS = 48


@dataclass(frozen=True)
class TextRange:
    """``length`` bytes of ``uri`` from ``offset`` (-1: to the end); ``index`` 0 is the file's first range."""

    uri: str
    offset: int = 0
    length: int = -1
    index: int = 0

    @property
    def label(self) -> str:
        return self.uri if self.index == 0 else f"{self.uri}@{self.offset}"

    def where(self, line_no: int) -> str:
        """How an error message names line ``line_no`` (1-based) of this range."""
        return f"{self.uri}:{line_no}" if self.index == 0 else f"{self.uri}@{self.offset}:+{line_no}"


def splittable(uri: str) -> bool:
    return not str(uri).endswith(".gz")


def plan_ranges(uri: str, size: int, unit_bytes: int) -> list[TextRange]:
    """Ranges of about ``unit_bytes`` covering a file of ``size`` bytes (one for a .gz or a small file)."""
    if not splittable(uri) or size <= unit_bytes:
        return [TextRange(uri, 0, -1, 0)]
    starts = list(range(0, size, unit_bytes))
    return [TextRange(uri, s, (starts[i + 1] if i + 1 < len(starts) else size) - s, i) for i, s in enumerate(starts)]


def owned_lines(inside: Iterable[bytes], beyond: Iterable[bytes], first: bool) -> Iterator[bytes]:
    """The lines a range owns, with their newline. ``inside``: the range's bytes (for bz2: its blocks,
    decompressed); ``beyond``: what follows, read only as far as the range's last line needs. The range
    owns the lines that start after its first byte (at it too when ``first``) up to and including its
    end."""
    pending = bytearray()
    skipping = not first  # inside the line that the previous range owns
    for chunk in inside:
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                if not skipping:
                    pending += chunk[start:]
                break
            if skipping:
                skipping = False
            else:
                pending += chunk[start:newline + 1]
                yield bytes(pending)
                pending.clear()
            start = newline + 1
    if skipping:  # no line starts in this range
        return
    # The pending line started inside the range, or (nothing pending) the next one starts exactly at its
    # end: either way it is this range's.
    for chunk in beyond:
        newline = chunk.find(b"\n")
        if newline < 0:
            pending += chunk
            continue
        pending += chunk[:newline + 1]
        yield bytes(pending)
        return
    if pending:
        yield bytes(pending)


def iter_range_lines(r: TextRange) -> Iterator[str]:
    """The text lines (newline stripped) that range ``r`` owns, decoded as UTF-8."""
    if str(r.uri).endswith(".gz"):
        inside, beyond = _gunzipped(r.uri), iter(())
        first = True
    elif str(r.uri).endswith(".bz2"):
        blocks = _bz2_blocks(r.uri, r.offset, None if r.length < 0 else r.offset + r.length)
        inside, beyond = _until_beyond(blocks)
        first = r.index == 0
    else:
        inside, beyond = _plain(r.uri, r.offset, r.length)
        first = r.index == 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for line in owned_lines(inside, beyond, first):
        yield decoder.decode(line, final=True).rstrip("\r\n")


# ----------------------------------------------------------------------------------------------
# Byte sources
# ----------------------------------------------------------------------------------------------


def _plain(uri: str, offset: int, length: int) -> tuple[Iterator[bytes], Iterator[bytes]]:
    def read(at: int, n: int, size: int) -> Iterator[bytes]:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            f.seek(at)
            while n != 0:
                data = f.read(size if n < 0 else min(size, n))
                if not data:
                    return
                n -= len(data) if n > 0 else 0
                yield data

    if length < 0:
        return read(offset, -1, READ_SIZE), iter(())
    return read(offset, length, READ_SIZE), read(offset + length, -1, 1 << 16)


def _gunzipped(uri: str) -> Iterator[bytes]:
    with storage.open_input(uri) as raw:
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while data := raw.read(READ_SIZE):
            while data:
                yield decompressor.decompress(data)
                if decompressor.eof and decompressor.unused_data:  # a multi-member gzip file
                    data = decompressor.unused_data
                    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    data = b""


def _until_beyond(blocks: Iterator[tuple[bytes, bool]]) -> tuple[Iterator[bytes], Iterator[bytes]]:
    """Split a stream of ``(data, past_the_end)`` into the range's part and what follows it."""
    held: list[bytes] = []

    def inside() -> Iterator[bytes]:
        for data, past in blocks:
            if past:
                held.append(data)
                return
            yield data

    def beyond() -> Iterator[bytes]:
        yield from held
        for data, _ in blocks:
            yield data

    return inside(), beyond()


# ----------------------------------------------------------------------------------------------
# bzip2 blocks at bit offsets
# ----------------------------------------------------------------------------------------------


def _shifted_patterns(magic: int) -> list[tuple[int, bytes, int, int, int, int]]:
    """For each bit shift s, how the 48-bit ``magic`` looks in the bytes: the bytes it fills completely
    (searched with bytes.find) and the masked first/last bytes to confirm a candidate."""
    out = []
    for s in range(8):
        if s == 0:
            whole = magic.to_bytes(6, "big")
            out.append((0, whole, 0, 0, 0, 0))
            continue
        window = (magic << (8 - s)).to_bytes(7, "big")
        out.append((s, window[1:6], window[0], 0xFF >> s, window[6], (0xFF << (8 - s)) & 0xFF))
    return out


_PATTERNS = {BLOCK_MAGIC: _shifted_patterns(BLOCK_MAGIC), EOS_MAGIC: _shifted_patterns(EOS_MAGIC)}


def find_magics(data: bytes, start: int = 0, stop: Optional[int] = None) -> list[tuple[int, int]]:
    """``(bit position, magic)`` of every block and end-of-stream magic that starts in bytes
    ``[start, stop)`` of ``data`` (and fits in ``data``), sorted by position."""
    stop = len(data) if stop is None else stop
    found = []
    for magic, patterns in _PATTERNS.items():
        for s, middle, first, first_mask, last, last_mask in patterns:
            at = max(0, start - 1) if s else start
            while True:
                j = data.find(middle, at)
                if j < 0:
                    break
                at = j + 1
                if s == 0:
                    if j >= stop:
                        break
                    found.append((8 * j, magic))
                    continue
                i = j - 1  # the byte the magic starts in
                if i >= stop:
                    break
                if i < start or i + 6 >= len(data):
                    continue
                if data[i] & first_mask == first and data[i + 6] & last_mask == last:
                    found.append((8 * i + s, magic))
    return sorted(found)


def block_as_stream(data: bytes, start_bit: int, end_bit: int) -> bytes:
    """The block at bits ``[start_bit, end_bit)`` of ``data`` as a complete one-block bzip2 stream: a
    level-9 header (any block fits), the block's bits moved to a byte boundary, the end-of-stream magic
    and the stream CRC (for one block: the block's own CRC, the 32 bits after its magic)."""
    first, last = start_bit // 8, (end_bit + 7) // 8
    bits = int.from_bytes(data[first:last], "big")
    bits >>= (last - first) * 8 - (end_bit - first * 8)
    n = end_bit - start_bit
    bits &= (1 << n) - 1
    crc = (bits >> (n - _MAGIC_BITS - 32)) & 0xFFFFFFFF
    stream = (((bits << _MAGIC_BITS) | EOS_MAGIC) << 32) | crc
    total = n + _MAGIC_BITS + 32
    pad = -total % 8
    return b"BZh9" + (stream << pad).to_bytes((total + pad) // 8, "big")


def _bz2_blocks(uri: str, start: int, end: Optional[int]) -> Iterator[tuple[bytes, bool]]:
    """Decompressed blocks whose magic starts at byte ``start`` or later, each with whether it starts at
    or after byte ``end`` (None: the file's end). Reads on from ``start`` as long as it is consumed."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        f.seek(start)
        buf = b""
        buf_start = start  # file offset of buf[0]
        block: Optional[int] = None  # bit position (in the file) of the block being collected
        scanned = 0  # bytes of buf searched for magics that start there (the last 7 wait for more data)
        eof = False
        while not eof:
            data = f.read(READ_SIZE)
            eof = not data
            buf += data
            stop = len(buf) if eof else max(0, len(buf) - 7)
            for bit, magic in find_magics(buf, scanned, stop):
                position = 8 * buf_start + bit
                if block is not None and position > block:
                    yield _decompress_block(buf, block - 8 * buf_start, bit), (end is not None and block >= 8 * end)
                    block = None
                if magic == BLOCK_MAGIC:
                    block = position
            scanned = stop
            keep = (block - 8 * buf_start) // 8 if block is not None else max(0, len(buf) - 7)
            buf, buf_start, scanned = buf[keep:], buf_start + keep, scanned - keep
        if block is not None:
            raise OSError(f"{uri} ends inside a bzip2 block (a truncated file?)")


def _decompress_block(data: bytes, start_bit: int, end_bit: int) -> bytes:
    try:
        return bz2.decompress(block_as_stream(data, start_bit, end_bit))
    except (OSError, ValueError) as exc:
        raise OSError(f"bzip2 block at bit {start_bit} does not decompress on its own: {exc}") from None
