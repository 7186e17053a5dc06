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
import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from kilm_ray.data.corpus.compressed import CorruptInput, TruncatedInput, decompressed, opener, resilient_reads

READ_SIZE = 4 << 20
MAX_BLOCK_BYTES = 2 << 20  # a bzip2 block holds at most 900 kB of input; compressed it is shorter than this
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
        inside, beyond = decompressed(r.uri, read_size=READ_SIZE), iter(())  # every member, whole
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
        return resilient_reads(opener(uri, at, n), uri, at, n, read_size=size)

    if length < 0:
        return read(offset, -1, READ_SIZE), iter(())
    return read(offset, length, READ_SIZE), read(offset + length, -1, 1 << 16)


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


def _bz2_blocks(uri: str, start: int, end: Optional[int], find=None) -> Iterator[tuple[bytes, bool]]:
    """Decompressed blocks whose magic starts at byte ``start`` or later, each with whether it starts at
    or after byte ``end`` (None: the file's end). Reads on from ``start`` as long as it is consumed.

    A 48-bit magic can also occur by chance inside compressed data (about once in 35 TB per magic and
    bit shift; Wikidata's dump is 100 GB). A candidate is a block boundary only if the block it closes
    decompresses on its own (the block's CRC checks it): one that does not is passed over as data inside
    the block. A block that starts where a real one ended (or the file's first, or the first of a stream)
    is real: if it does not decompress within ``MAX_BLOCK_BYTES`` (every real block is shorter) the file is
    damaged (:class:`CorruptInput`) or cut short (:class:`TruncatedInput`). Only a range's first start can
    be a false magic (inside a block that began before the range, which the range before decodes whole,
    the first block after its end included): it is passed over. ``find``: the magic finder (tests add
    false candidates through it)."""
    find = find or find_magics
    buf = b""
    buf_start = start  # file offset of buf[0]
    scanned = 0  # bytes of buf searched for magics that start there (the last 7 wait for more data)
    candidates: list[tuple[int, int]] = []  # unsettled (file bit position, magic); [0] starts the open block
    open_block = confirmed = False  # candidates[0] starts the block being collected; known to be real
    next_confirmed = start == 0  # the file's first block follows its header
    trial = 1  # the candidate to try next as the open block's end
    settled = start  # where the last block ended (a real boundary lies within MAX_BLOCK_BYTES of any byte)
    last_eos = -1  # bit position of the last end-of-stream magic seen
    for data in itertools.chain(resilient_reads(opener(uri, start, -1), uri, start, read_size=READ_SIZE), (b"",)):
        eof = not data
        if start == 0 and buf_start == 0 and not buf and data and not data.startswith(b"BZh"):
            raise CorruptInput(uri, 0, "is not a bzip2 file (no BZh header)")
        buf += data
        stop = len(buf) if eof else max(0, len(buf) - 7)
        found = [(8 * buf_start + bit, magic) for bit, magic in find(buf, scanned, stop)]
        candidates += found
        last_eos = max([last_eos] + [pos for pos, magic in found if magic == EOS_MAGIC])
        scanned = stop
        held_end = buf_start + len(buf)
        while True:
            if not open_block:
                while candidates and candidates[0][1] != BLOCK_MAGIC:
                    candidates.pop(0)  # an end of stream with no block open here (its block began before start)
                if not candidates:
                    break
                open_block, confirmed, next_confirmed, trial = True, next_confirmed, False, 1
            block = candidates[0][0]
            if trial >= len(candidates):  # no candidate left to close the open block with
                if not eof and held_end - block // 8 <= MAX_BLOCK_BYTES:
                    break  # read on
                if confirmed:
                    raise _unfinished_block(uri, block, held_end, last_eos, eof)
                candidates.pop(0)  # a false magic at the range's start
                open_block = False
                continue
            position, magic = candidates[trial]
            data_block = _try_block(buf, block - 8 * buf_start, position - 8 * buf_start)
            if data_block is not None:
                yield data_block, (end is not None and block >= 8 * end)
                settled = position // 8
                candidates = candidates[trial:]
                open_block, trial = magic == BLOCK_MAGIC, 1
                confirmed = open_block  # a block that starts where a real one ended is real
                if not open_block:
                    candidates.pop(0)
                    next_confirmed = True  # and so is the first block of the next stream
            elif position - block > 8 * MAX_BLOCK_BYTES:
                if confirmed:
                    raise _unfinished_block(uri, block, held_end, last_eos, False)
                candidates.pop(0)  # no real block is this long: the range's first start was a false magic
                open_block = False
            else:
                trial += 1  # not a boundary: a false magic inside the block
        if not candidates and held_end - settled > MAX_BLOCK_BYTES:
            raise CorruptInput(uri, settled, f"no bzip2 block between byte {settled} and byte {held_end} "
                                             "(a damaged or zero-filled file?)")
        keep = candidates[0][0] // 8 - buf_start if candidates else scanned
        buf, buf_start, scanned = buf[keep:], buf_start + keep, scanned - keep


def _unfinished_block(uri: str, block_bit: int, held_end: int, last_eos: int, eof: bool) -> Exception:
    """The error for a real block that never decompressed: the file was cut inside it (it does not end with
    an end-of-stream magic and its CRC), or the block is damaged."""
    if eof and (last_eos + _MAGIC_BITS + 32 + 7) // 8 != held_end:
        return TruncatedInput(uri, held_end, "ends inside a bzip2 block (a partial download?)")
    return CorruptInput(uri, block_bit // 8, f"the bzip2 block at byte {block_bit // 8} does not decompress "
                                             "(a damaged file?)")


def _try_block(data: bytes, start_bit: int, end_bit: int) -> Optional[bytes]:
    """The block at bits ``[start_bit, end_bit)`` decompressed, or None when those bits are not one whole
    block (a false magic at either end)."""
    try:
        return bz2.decompress(block_as_stream(data, start_bit, end_bit))
    except (OSError, ValueError, EOFError):
        return None
