"""Streaming a MediaWiki ``pages-articles`` XML dump, one ``<page>`` at a time.

The reader cuts the decompressed stream at ``<page>`` / ``</page>`` (text inside a page is
XML-escaped, so those strings cannot occur in it) and never holds more than one page and one read
buffer in memory. Each page is parsed on its own, so a malformed page is skipped and counted while
the rest of the dump goes on. A dump that ends early or is damaged (``compressed``) stops the read with
an error that names the file and the byte, unless the caller keeps what was read before it (then one
error record ends the pages, counted as ``truncated_input``).
"""

from __future__ import annotations

import bz2
import codecs
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Iterator, Optional

from kilm_ray import storage
from kilm_ray.data.corpus.compressed import READ_SIZE, CompressedInputError, TruncatedInput, decompressed

_TITLE_RE = re.compile(r"<title>(.*?)</title>", re.S)


@dataclass
class RawPage:
    """One ``<page>`` element as text, or (``xml`` None) an error that ended the stream."""

    source: str
    index: int
    xml: Optional[str]
    error: Optional[str] = None


@dataclass
class Page:
    title: str
    ns: int
    page_id: int
    redirect: Optional[str]
    text: str


class MalformedPage(ValueError):
    """A ``<page>`` that is not well-formed XML or lacks a required field."""


DUMP_SUFFIXES = (".xml", ".xml.bz2", ".xml.gz", ".bz2", ".gz")


@dataclass(frozen=True)
class ReadUnit:
    """What one read task decompresses: a whole dump file, or (a multistream dump read through its
    index) a byte range that starts and ends on bz2 stream boundaries."""

    uri: str
    offset: int = 0
    length: int = -1  # -1: to the end of the file

    @property
    def label(self) -> str:
        return self.uri if self.length < 0 else f"{self.uri}@{self.offset}"


def multistream_index_of(uri: str) -> Optional[str]:
    """``...-multistream-index.txt.bz2`` beside a ``...-multistream.xml.bz2`` dump, if it is there."""
    if not uri.endswith("multistream.xml.bz2"):
        return None
    index = uri[: -len(".xml.bz2")] + "-index.txt.bz2"
    return index if storage.exists(index) else None


def stream_offsets(index_lines: Iterator[str]) -> list[int]:
    """Distinct byte offsets of the page streams, from index lines ``offset:page_id:title``."""
    offsets: list[int] = []
    for line in index_lines:
        head = line.split(":", 1)[0].strip()
        if head and (not offsets or int(head) != offsets[-1]):
            offsets.append(int(head))
    return sorted(set(offsets))


def byte_ranges(offsets: list[int], file_size: int, unit_bytes: int) -> list[tuple[int, int]]:
    """Consecutive streams grouped into ranges of at least ``unit_bytes`` (the last one runs to the end
    of the file, which holds the closing ``</mediawiki>`` stream): ``(offset, length)`` pairs."""
    ranges, start = [], None
    for off in offsets:
        if start is None:
            start = off
        elif off - start >= unit_bytes:
            ranges.append((start, off - start))
            start = off
    if start is not None:
        ranges.append((start, file_size - start))
    return ranges


def read_units(specs: list[str], unit_bytes: int = 64 << 20) -> list[ReadUnit]:
    """Dump inputs (files, directories, globs, ``s3://`` prefixes) as read tasks: a multistream dump
    with its index becomes byte ranges read in parallel; any other file is read whole by one task."""
    files = [f for spec in specs for f in storage.expand(spec, DUMP_SUFFIXES, "dump")]
    units: list[ReadUnit] = []
    for uri in dict.fromkeys(files):  # a file named twice is read once
        if "-index.txt" in uri.rpartition("/")[2]:
            continue
        index = multistream_index_of(uri)
        if index is None:
            units.append(ReadUnit(uri))
            continue
        offsets = cached_stream_offsets(index)
        units.extend(ReadUnit(uri, off, length)
                     for off, length in byte_ranges(offsets, storage.file_size(uri), unit_bytes))
    return units


def cached_stream_offsets(index: str) -> list[int]:
    """``stream_offsets`` of a multistream index, kept on this machine's disk (the node cache, through
    ``node_cache.cached_array``) under the index's name, size and modification time: enwiki's index is
    ~250 MB of bz2 (~24 M lines), tens of seconds to fetch and parse on every plan, a resumed one included.
    A cache that cannot be read or written is only logged."""
    import hashlib
    import logging

    import numpy as np

    from kilm_ray.store import node_cache

    fs, path = storage.resolve(index)
    info = fs.get_file_info(path)
    key = hashlib.sha256(f"{index}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:24]
    directory = node_cache.default_root() / "multistream_index"
    def make() -> np.ndarray:
        return np.asarray(stream_offsets(_index_lines(index)), dtype=np.int64)

    try:
        return np.load(node_cache.cached_array(directory / f"{key}.npy", directory / f"{key}.lock", make)).tolist()
    except (OSError, ValueError) as exc:
        logging.getLogger("kilm_ray.pipeline").warning("stream offsets of %s not cached: %s", index, exc)
        return make().tolist()


def _index_lines(uri: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    rest = ""
    for chunk in decompressed(uri):
        lines = (rest + decoder.decode(chunk)).split("\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def write_multistream(pages_xml: list[str], out: str, header: str = "<mediawiki>\n",
                      footer: str = "</mediawiki>\n", pages_per_stream: int = 100) -> str:
    """Write ``<page>`` elements as a multistream ``.xml.bz2`` (one bz2 stream per ``pages_per_stream``
    pages, as Wikimedia does) and its ``-index.txt.bz2``; returns the dump's path."""
    body, index, offset = [], [], 0
    head = bz2.compress(header.encode())
    body.append(head)
    offset += len(head)
    for start in range(0, len(pages_xml), pages_per_stream):
        group = pages_xml[start:start + pages_per_stream]
        for xml in group:
            page = parse_page_xml(xml)
            index.append(f"{offset}:{page.page_id}:{page.title}")
        data = bz2.compress("".join(group).encode())
        body.append(data)
        offset += len(data)
    body.append(bz2.compress(footer.encode()))
    storage.write_bytes(out, b"".join(body))
    storage.write_bytes(out[: -len(".xml.bz2")] + "-index.txt.bz2", bz2.compress(("\n".join(index) + "\n").encode()))
    return out


def iter_raw_pages(uri: str | ReadUnit, max_pages: int = 0, keep_truncated: bool = False,
                   read_size: int = READ_SIZE) -> Iterator[RawPage]:
    """Yield each ``<page>...</page>`` of a dump file (local or ``s3://``, .xml/.bz2/.gz) or of one
    byte range of a multistream dump.

    Input that ends early or does not decompress raises :class:`CompressedInputError` (file and byte);
    with ``keep_truncated`` the pages before it are kept and one error record ends them instead."""
    unit = uri if isinstance(uri, ReadUnit) else ReadUnit(uri)
    uri = unit.label
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer = ""
    index = 0
    chunks = decompressed(unit.uri, unit.offset, unit.length, read_size)
    while True:
        try:
            chunk = next(chunks, b"")
        except CompressedInputError as exc:
            if not keep_truncated:
                raise
            yield RawPage(uri, index, None, f"input ended early after {index} pages: {exc}")
            return
        final = not chunk
        buffer += decoder.decode(chunk, final=final)
        at = 0  # pages are cut by position and the buffer once per read (cutting it per page copied the
        while True:  # rest of a 5 MB read for every page)
            start = buffer.find("<page>", at)
            if start < 0:
                buffer = buffer[max(at, len(buffer) - 8):]  # a tail, in case "<page>" straddles two reads
                break
            end = buffer.find("</page>", start)
            if end < 0:
                buffer = buffer[start:]
                break
            end += len("</page>")
            yield RawPage(uri, index, buffer[start:end])
            index += 1
            at = end
            if max_pages and index >= max_pages:
                chunks.close()
                return
        if final:
            if "<page>" in buffer:
                ends = unit.offset + unit.length if unit.length >= 0 else storage.file_size(unit.uri)
                error = TruncatedInput(unit.uri, ends, f"ends at byte {ends} inside a page, after {index} pages of "
                                                       f"{uri} (a partial download?)")
                if not keep_truncated:
                    raise error
                yield RawPage(uri, index, None, f"input ended inside a page after {index} pages: {error}")
            return


def parse_page_xml(xml: str) -> Page:
    """Parse one ``<page>`` element. Raises :class:`MalformedPage` with the reason."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise MalformedPage(f"not well-formed XML ({exc})") from None
    title = root.findtext("title")
    if not title or not title.strip():
        raise MalformedPage("no <title>")
    ns_text = root.findtext("ns")
    try:
        ns = int(ns_text) if ns_text is not None else 0
    except ValueError:
        raise MalformedPage(f"bad <ns> {ns_text!r}") from None
    id_text = root.findtext("id")
    try:
        page_id = int(id_text) if id_text else -1
    except ValueError:
        raise MalformedPage(f"bad <id> {id_text!r}") from None
    redirect_el = root.find("redirect")
    redirect = redirect_el.get("title") if redirect_el is not None else None
    revision = root.find("revision")
    if revision is None:
        raise MalformedPage("no <revision>")
    text = revision.findtext("text")
    if text is None:
        raise MalformedPage("no <text>")
    return Page(title=title.strip(), ns=ns, page_id=page_id, redirect=redirect, text=text)


def title_of_raw(xml: str) -> str:
    """Best-effort title of a page that failed to parse, for error messages."""
    match = _TITLE_RE.search(xml)
    return match.group(1).strip()[:200] if match else "<untitled>"


def read_siteinfo(uri: str, limit: int = 4 << 20) -> Optional[str]:
    """The ``<siteinfo>...</siteinfo>`` element at the head of a dump (its namespaces), or None. Reads
    only the head of the file."""
    text = ""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chunks = decompressed(uri)
    try:
        for chunk in chunks:
            text += decoder.decode(chunk)
            end = text.find("</siteinfo>")
            if end >= 0:
                start = text.find("<siteinfo")
                return text[start:end + len("</siteinfo>")] if 0 <= start < end else None
            if "<page>" in text or len(text) > limit:
                return None
    except CompressedInputError:  # the pages' reads name the damage; here it only means no namespaces
        return None
    finally:
        chunks.close()
    return None
