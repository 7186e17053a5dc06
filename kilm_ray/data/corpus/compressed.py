"""Decompressing ``.bz2`` / ``.gz`` input as it streams, with errors that say which file and which byte.

A Wikipedia multistream dump is ~233 k bz2 streams back to back; a gzip file may hold several members.
Each end of a stream starts a new decompressor, whether or not the next stream's first byte has been
read yet: a stream that ends exactly at a read boundary (one run in five on enwiki with 1 MiB reads)
is no different from one that ends inside a read. Three outcomes are kept apart, because each needs a
different answer:

- the input ends inside a stream (a partial download): :class:`TruncatedInput`;
- bytes that do not decompress (a damaged file): :class:`CorruptInput`;
- a read that fails (an S3 connection reset): retried in place from the byte it stopped at, up to
  ``READ_ATTEMPTS`` times, then raised as :class:`storage.InputError` (transient), which fails the task;
  Ray Data then retries the task a bounded number of times (``configure_ray_data``). Retrying in place
  first costs one re-opened range instead of a task that decompresses its 64 MiB unit again.

The first two are user-input errors: no retry reads different bytes.
"""

from __future__ import annotations

import bz2
import time
import zlib
from typing import BinaryIO, Callable, Iterator, Optional

from kilm_ray import storage
from kilm_ray.errors import UserInputError

READ_SIZE = 1 << 20
PIECE = 1 << 14  # compressed bytes given to a decompressor at a time (see decompress_streams)
READ_ATTEMPTS = 4  # a failed read is retried from its byte this many times in all (1 s, 2 s, 4 s apart)
RETRY_BASE_S = 1.0
# In the message of a read that failed READ_ATTEMPTS times: Ray Data runs such a task's work again (a
# bounded number of times, kilm_ray.data.plan.configure_ray_data), replaying it from its start.
READ_KEEPS_FAILING = "a read kept failing"


class CompressedInputError(UserInputError, ValueError):
    """Compressed input that cannot be read whole; ``uri`` and ``offset`` (a byte of the file) say where."""

    def __init__(self, uri: str, offset: int, message: str):
        super().__init__(f"{uri}: {message}")
        self.uri, self.offset, self.message = uri, offset, message

    def __reduce__(self):  # rebuilt from its fields where Ray hands it from a task to the driver
        return type(self), (self.uri, self.offset, self.message)


class TruncatedInput(CompressedInputError):
    """The input ends inside a compressed stream (a partial download or copy)."""


class CorruptInput(CompressedInputError):
    """Bytes that are not valid compressed data (a damaged file)."""


def decompressor_factory(uri: str) -> Optional[Callable[[], object]]:
    """A maker of fresh decompressors for ``uri``'s suffix; None for uncompressed input."""
    if str(uri).endswith(".bz2"):
        return bz2.BZ2Decompressor
    if str(uri).endswith(".gz"):
        return lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)
    return None


def decompress_streams(reads: Iterator[bytes], uri: str, new: Callable[[], object], base: int = 0) -> Iterator[bytes]:
    """Decompressed bytes of consecutive compressed streams, as the compressed ``reads`` come in.

    ``base``: the file offset of the first byte of ``reads`` (for error messages). A new decompressor
    starts at every end of stream; the input may end only between streams."""
    decompressor = new()
    position = base  # file offset just past the bytes given to decompressors so far
    stream_start = base  # file offset of the current stream's first byte
    fed = 0  # bytes of the current stream given to its decompressor
    try:
        for read in reads:
            view = memoryview(read)
            # In pieces: at each end of stream the decompressor copies what is left of its input
            # (unused_data), so a read of many small streams (gzip members) costs streams x PIECE, not
            # streams x read size (quadratic in the streams per read).
            for start in range(0, len(view), PIECE):
                data = view[start:start + PIECE]
                position += len(data)
                while data:
                    try:
                        out = decompressor.decompress(data)
                    except (OSError, EOFError, ValueError, zlib.error) as exc:
                        raise CorruptInput(uri, stream_start, f"not valid compressed data in the stream that starts "
                                                              f"at byte {stream_start}: {exc}") from None
                    if out:
                        yield out
                    if decompressor.eof:
                        data = decompressor.unused_data
                        stream_start = position - len(data)
                        decompressor, fed = new(), 0  # also when the stream ended exactly at the end of a piece
                    else:
                        fed += len(data)
                        data = b""
    finally:
        close = getattr(reads, "close", None)
        if close is not None:
            close()  # a reader that stopped early closes the file now, not when collected
    if fed:
        raise TruncatedInput(uri, position, f"ends at byte {position}, inside the compressed stream that starts at "
                                            f"byte {stream_start} (a partial download?)")
    if position == base:  # compressed input holds at least one stream: none at all is a download that never came
        raise TruncatedInput(uri, base, f"holds no compressed data from byte {base} (an empty file?)")


def resilient_reads(open_at: Callable[[int], BinaryIO], uri: str, offset: int = 0, length: int = -1,
                    read_size: int = READ_SIZE, attempts: int = READ_ATTEMPTS,
                    sleep: Callable[[float], None] = time.sleep) -> Iterator[bytes]:
    """The bytes of ``uri`` from ``offset`` (``length`` of them; -1: to the end) in reads of ``read_size``.
    ``open_at(pos)`` opens the input at file offset ``pos``; a read that fails re-opens it at the byte it
    stopped at, waiting 1, 2, 4 ... s, and gives up after ``attempts`` failures in a row."""
    position, left, failures = offset, length, 0
    stream = None
    try:
        while left != 0:
            try:
                if stream is None:
                    stream = open_at(position)
                data = stream.read(read_size if left < 0 else min(read_size, left))
            except (FileNotFoundError, PermissionError):
                raise  # no retry reads a file that is not there or not ours
            except OSError as exc:
                if "ACCESS_DENIED" in str(exc) or "NoSuchKey" in str(exc):  # S3's permanent answers
                    raise
                failures += 1
                if stream is not None:
                    _close_quietly(stream)
                    stream = None
                if failures >= attempts:
                    raise storage.InputError(f"{uri}: {READ_KEEPS_FAILING} at byte {position} ({attempts} attempts): "
                                             f"{exc}", transient=True) from None
                sleep(RETRY_BASE_S * 2 ** (failures - 1))
                continue
            failures = 0
            if not data:
                if left > 0:  # the file is shorter than the range it was planned with
                    raise TruncatedInput(uri, position, f"ends at byte {position}, {left} bytes before the end of "
                                                        f"the range read from byte {offset}")
                return
            position += len(data)
            left -= len(data) if left > 0 else 0
            yield data
    finally:
        if stream is not None:
            _close_quietly(stream)


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


def opener(uri: str, offset: int, length: int) -> Callable[[int], BinaryIO]:
    """``open_at(pos)`` for :func:`resilient_reads`: ``uri`` from byte ``pos`` (local or ``s3://``), to the
    end of the range ``[offset, offset + length)`` (or of the file when ``length`` is -1)."""
    def open_at(pos: int) -> BinaryIO:
        if length >= 0:
            return storage.open_range(uri, pos, offset + length - pos)
        if pos == 0:
            return storage.open_input(uri)  # one streaming GET on s3://
        fs, path = storage.resolve(uri)
        f = fs.open_input_file(path)
        f.seek(pos)
        return f

    return open_at


def decompressed(uri: str, offset: int = 0, length: int = -1, read_size: int = READ_SIZE) -> Iterator[bytes]:
    """The decompressed bytes of ``uri`` (or of its byte range, which must start and end on stream
    boundaries), read resiliently; uncompressed input as it is."""
    reads = resilient_reads(opener(uri, offset, length), uri, offset, length, read_size)
    new = decompressor_factory(uri)
    return reads if new is None else decompress_streams(reads, uri, new, offset)
