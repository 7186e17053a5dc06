"""Local paths and ``s3://`` URIs behind one small interface (pyarrow filesystems).

S3 endpoints other than AWS (MinIO, a moto server in tests) come from the standard
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables, as boto3 and the AWS CLI read them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow.fs as pafs

from kilm_ray.errors import UserInputError


class InputError(UserInputError, FileNotFoundError):
    """An input file or URI is missing or unreadable; the message names it. ``transient``: the store
    itself failed to answer (endpoint down, throttled), so a retry may succeed."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def is_remote(uri: str | os.PathLike) -> bool:
    return "://" in str(uri)


def absolute(uri: str) -> str:
    """A local path made absolute against the current directory (``~`` expanded, symlinks kept);
    a URI unchanged."""
    return uri if is_remote(uri) else os.path.abspath(os.path.expanduser(uri))


def s3_filesystem() -> pafs.S3FileSystem:
    """One S3 client per process and settings: building one resolves credentials (on EC2 a call to the
    instance metadata service) and opens a connection pool, which ``resolve`` did per call before."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    return _s3_filesystem(endpoint, region)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://bucket/key`` URI."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if is_remote(uri):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(uri, *parts))


def ray_storage(run_dir: str | os.PathLike, name: str) -> tuple[pafs.FileSystem | None, str, str]:
    """Ray's ``(storage_filesystem, storage_path)`` for ``run_dir`` (s3:// resolved; a local directory
    created and made absolute, as Ray wants), and the URI of the run ``name`` inside it."""
    if is_remote(run_dir):
        fs, path = resolve(run_dir)
        return fs, path, join(run_dir, name)
    local = Path(run_dir).resolve()
    local.mkdir(parents=True, exist_ok=True)
    return None, str(local), str(local / name)


def check_readable(uri: str | os.PathLike, what: str = "input") -> None:
    """Raise a one-line :class:`InputError` naming ``uri`` if it is not a readable file."""
    try:
        fs, path = resolve(uri)
        info = fs.get_file_info(path)
    except Exception as exc:  # credentials, bad bucket name, endpoint down...
        raise InputError(f"cannot read {what} {uri}: {exc}", transient=True) from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{what} not found: {uri}")
    if info.type != pafs.FileType.File:
        raise InputError(f"{what} is not a file: {uri}")


def exists(uri: str | os.PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str | os.PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def open_input(uri: str | os.PathLike) -> BinaryIO:
    fs, path = resolve(uri)
    return fs.open_input_stream(path, compression=None)  # we decompress ourselves (multistream bz2)


def read_bytes(uri: str | os.PathLike) -> bytes:
    with open_input(uri) as f:
        return f.read()


def make_parent(fs: pafs.FileSystem, path: str) -> None:
    """The directory ``path`` goes in, on a file system that has directories. Object stores have none:
    there ``create_dir`` costs a request per level of every file written (Arrow's directory markers)."""
    parent = path.rsplit("/", 1)[0]
    if parent and not isinstance(fs, pafs.S3FileSystem):
        fs.create_dir(parent, recursive=True)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    fs, path = resolve(uri)
    make_parent(fs, path)
    with fs.open_output_stream(path, compression=None) as f:
        f.write(data)


def _file_infos(uri: str | os.PathLike, suffix: str, recursive: bool) -> list[pafs.FileInfo]:
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)]


def list_files(uri: str | os.PathLike, suffix: str = "", recursive: bool = True) -> list[str]:
    """Files under a directory (recursive by default), as URIs of the same scheme, sorted."""
    prefix = "s3://" if str(uri).startswith("s3://") else ""
    return sorted(prefix + i.path for i in _file_infos(uri, suffix, recursive))


def total_size(uri: str | os.PathLike, suffix: str = "") -> int:
    """Bytes of the files under a directory (recursive); 0 when it does not exist."""
    return sum(i.size or 0 for i in _file_infos(uri, suffix, recursive=True))


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local directory tree to ``uri`` (local or remote)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def copy_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a directory tree from ``src`` to ``dst`` (each local or remote)."""
    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    dfs.create_dir(dpath, recursive=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    fs, path = resolve(uri)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local_dir).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return Path(local_dir)


def local_copy(uri: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """A local directory holding ``uri``'s contents: the path itself if local, else a download."""
    if not is_remote(uri):
        return Path(uri).expanduser()
    root = Path(cache_root or tempfile.mkdtemp(prefix="kilm_ray_dl_"))
    target = root / str(uri).replace("://", "_").replace("/", "_")
    if target.exists():
        shutil.rmtree(target)
    return download_dir(uri, target)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@contextlib.contextmanager
def materialized(uri: str | os.PathLike, skip_suffixes: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local directory with ``uri``'s files for the duration of the block: the path itself if local,
    else a download (without files ending in ``skip_suffixes``) into a temporary directory that is removed
    afterwards, so a replica that loads what it needs leaves no copy of the export behind."""
    if not is_remote(uri):
        yield Path(uri).expanduser()
        return
    fs, path = resolve(uri)
    with tempfile.TemporaryDirectory(prefix="kilm_ray_dl_") as tmp:
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if info.type != pafs.FileType.File or info.path.endswith(skip_suffixes):
                continue
            target = Path(tmp) / os.path.relpath(info.path, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        yield Path(tmp)


def iter_lines(uri: str | os.PathLike) -> Iterator[str]:
    """Text lines of a local or remote file, decompressed when it ends in .gz or .bz2."""
    import bz2
    import gzip
    import io

    stream = open_input(uri)
    raw: BinaryIO = stream
    if str(uri).endswith(".gz"):
        raw = gzip.GzipFile(fileobj=stream)
    elif str(uri).endswith(".bz2"):
        raw = bz2.BZ2File(stream)
    with io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as text:
        yield from text


def _has_glob(uri: str) -> bool:
    return any(c in uri for c in "*?[")


def expand(spec: str | os.PathLike, suffixes: tuple[str, ...], what: str = "input") -> list[str]:
    """The files a command-line input names: a file; a directory or ``s3://`` prefix (its files ending
    in one of ``suffixes``, recursively); or a glob (``dumps/*.bz2``, ``s3://b/kb/part-*.jsonl.gz``).
    Sorted; an input that names no file is an :class:`InputError`."""
    import fnmatch

    spec = str(spec)
    if _has_glob(spec):
        parent, _, pattern = spec.rpartition("/")
        if _has_glob(parent):
            raise InputError(f"{what}: only the last part of a path may be a glob: {spec}")
        matches = [f for f in list_files(parent or ".", recursive=False) if fnmatch.fnmatch(f.rpartition("/")[2], pattern)]
        if not matches:
            raise InputError(f"{what} not found: no file matches {spec}")
        return matches
    try:
        fs, path = resolve(spec)
        info = fs.get_file_info(path)
    except Exception as exc:
        raise InputError(f"cannot read {what} {spec}: {exc}") from None
    if info.type == pafs.FileType.Directory or (info.type == pafs.FileType.NotFound and spec.endswith("/")):
        files = [f for f in list_files(spec) if f.endswith(suffixes)]
        if not files:
            raise InputError(f"{what} not found: no {'/'.join(suffixes)} file under {spec}")
        return files
    check_readable(spec, what)
    return [spec]


def file_size(uri: str | os.PathLike) -> int:
    fs, path = resolve(uri)
    return fs.get_file_info(path).size


def file_sizes(uris: list[str]) -> dict[str, int]:
    """The sizes of many files, one listing per directory (prefix) they are in rather than one request
    (an S3 HEAD) per file: 1,500 knowledge shards cost one paginated LIST. A file the listing misses
    (a listing that is not consistent yet) is asked for on its own."""
    by_parent: dict[str, list[str]] = {}
    for uri in dict.fromkeys(str(u) for u in uris):
        by_parent.setdefault(uri.rstrip("/").rpartition("/")[0], []).append(uri)
    sizes: dict[str, int] = {}
    for parent, members in by_parent.items():
        listed: dict[str, int] = {}  # by the path resolve() gives (bucket/key, or an absolute local path)
        if len(members) > 1:
            fs, path = resolve(parent)
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
            listed = {i.path: i.size for i in infos if i.type == pafs.FileType.File}
        for uri in members:
            path = resolve(uri)[1]
            sizes[uri] = listed[path] if path in listed else file_size(uri)
    return sizes


def open_range(uri: str | os.PathLike, offset: int, length: int) -> BinaryIO:
    """A stream of ``length`` bytes of ``uri`` from ``offset`` (ranged reads on s3://), read as consumed."""
    fs, path = resolve(uri)
    f = fs.open_input_file(path)
    f.seek(offset)
    return _Bounded(f, length)


class _Bounded:
    """A read-only view of the next ``remaining`` bytes of a seekable file."""

    def __init__(self, f, remaining: int):
        self.f, self.remaining = f, remaining

    def read(self, n: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        n = self.remaining if n < 0 else min(n, self.remaining)
        data = self.f.read(n)
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
