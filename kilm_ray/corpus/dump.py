"""Streaming a MediaWiki ``pages-articles`` XML dump, one ``<page>`` at a time.

The reader cuts the decompressed stream at ``<page>`` / ``</page>`` (text inside a page is
XML-escaped, so those strings cannot occur in it) and never holds more than one page and one read
buffer in memory. Each page is parsed on its own, so a malformed page is skipped and counted while
the rest of the dump goes on; a truncated ``.bz2`` ends the stream with a recorded error instead of
a crash.
"""

from __future__ import annotations

import bz2
import codecs
import re
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional

from kilm_ray import storage

READ_SIZE = 1 << 20
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


def _decompressed_chunks(stream: BinaryIO, uri: str) -> Iterator[bytes]:
    """Decompressed bytes as they come. Decompressing by hand (not BZ2File) hands over everything
    before a truncation point, then raises EOFError; multistream .bz2 and multi-member .gz work."""
    if uri.endswith(".bz2"):
        new = bz2.BZ2Decompressor
    elif uri.endswith(".gz"):
        def new():
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
    else:
        while chunk := stream.read(READ_SIZE):
            yield chunk
        return
    decompressor = new()
    while True:
        data = stream.read(READ_SIZE)
        if not data:
            if not decompressor.eof:
                raise EOFError("compressed stream ended before its end-of-stream marker")
            return
        while data:
            yield decompressor.decompress(data)
            if decompressor.eof:
                data = decompressor.unused_data
                decompressor = new() if data else decompressor
            else:
                data = b""


def iter_raw_pages(uri: str, max_pages: int = 0) -> Iterator[RawPage]:
    """Yield each ``<page>...</page>`` of the dump at ``uri`` (local or ``s3://``, .xml/.bz2/.gz)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer = ""
    index = 0
    with storage.open_input(uri) as raw:
        chunks = _decompressed_chunks(raw, uri)
        while True:
            try:
                chunk = next(chunks, b"")
            except (EOFError, OSError, zlib.error) as exc:  # truncated or corrupt compressed data
                yield RawPage(uri, index, None, f"input ended early after {index} pages: {exc}")
                return
            final = not chunk
            buffer += decoder.decode(chunk, final=final)
            while True:
                start = buffer.find("<page>")
                if start < 0:
                    # Keep a tail in case "<page>" straddles two reads.
                    buffer = buffer[-8:]
                    break
                end = buffer.find("</page>", start)
                if end < 0:
                    buffer = buffer[start:]
                    break
                end += len("</page>")
                yield RawPage(uri, index, buffer[start:end])
                index += 1
                buffer = buffer[end:]
                if max_pages and index >= max_pages:
                    return
            if final:
                if "<page>" in buffer:
                    yield RawPage(uri, index, None, f"input ended inside a page after {index} pages")
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
