"""The one filesystem layer: every input, checkpoint and run folder is a local path or a URI.

A local path (``runs/demo``, ``/data/x.parquet``, ``file:///data``) stays a ``pathlib.Path``, so
local runs behave exactly as before. A URI with a scheme (``s3://bucket/run``, ``gs://...``,
``hdfs://...``, or any protocol fsspec knows) becomes a ``RemotePath``: the subset of ``Path``'s
API that capfilt uses (``/``, ``name``, ``stem``, ``parent``, ``exists``, ``is_file``, ``is_dir``,
``glob``, ``iterdir``, ``open``, ``read_bytes``, ``unlink`` ...) on a pyarrow filesystem. pyarrow
is what Parquet IO, Ray Data and Ray Train use, so one credential story covers all three:
the standard environment variables of each store (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible
server), or the node's instance role.

Atomic commit. Local files are written to a temp file and renamed. On object storage there is no
rename, but an object appears whole or not at all: ``write_atomic`` buffers the bytes and uploads
them in one put (a multipart upload that is never completed leaves nothing), so a crash mid-write
never leaves a half file. The stats file is written last in both cases and stays the done marker.

Call ``location(x)`` on anything a user gives. ``read_parquet``, ``read_schema`` and
``parquet_file`` read Parquet from either kind; ``arrow(p)`` gives the (path, filesystem) pair for
any other pyarrow call (``path, filesystem = arrow(p)``).
"""

from __future__ import annotations

import fnmatch
import functools
import io
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

__all__ = [
    "Location",
    "PathOrURI",
    "RemotePath",
    "arrow",
    "files_exist",
    "is_remote",
    "is_uri",
    "local_copy",
    "location",
    "parquet_file",
    "put",
    "read_json",
    "read_parquet",
    "read_schema",
    "rmtree",
    "write_atomic",
    "write_json_atomic",
]

# Schemes pyarrow reads natively; any other scheme goes through fsspec.
_NATIVE = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def is_uri(value: str | os.PathLike[str]) -> bool:
    """Whether ``value`` is ``scheme://...`` (a Windows drive letter is not a scheme)."""
    text = str(value)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").isalnum()


def is_remote(value: Any) -> bool:
    """Whether ``value`` names something that is not on a local disk."""
    return isinstance(value, RemotePath) or (
        isinstance(value, str) and is_uri(value) and not value.startswith("file://")
    )


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str) -> pafs.FileSystem:
    """One filesystem object per (scheme, bucket) in a process; it holds the connection pool."""
    if scheme in _NATIVE:
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
        return fs
    import fsspec

    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))


class RemotePath:
    """A file or folder on a non-local filesystem, with the parts of ``pathlib.Path`` capfilt uses.

    ``str()`` gives the URI back; it pickles as its URI, so a Ray worker rebuilds its own
    filesystem (and credentials) from its own environment."""

    def __init__(self, uri: str) -> None:
        parts = urlsplit(uri)
        if not parts.netloc:
            raise ValueError(f"{uri!r} names no bucket or host")
        self.scheme = parts.scheme.lower()
        self.netloc = parts.netloc
        key = posixpath.normpath(parts.path) if parts.path not in ("", "/") else ""
        self.key = key.strip("/") if key != "." else ""

    # -- naming -------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.netloc}/{self.key}" if self.key else f"{self.scheme}://{self.netloc}"

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemotePath({self.uri!r})"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (RemotePath, (self.uri,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: RemotePath) -> bool:
        return self.uri < other.uri

    def __truediv__(self, part: str | os.PathLike[str]) -> RemotePath:
        part = str(part)
        if is_uri(part) or part.startswith("/"):
            raise ValueError(f"cannot join {part!r} onto {self.uri}")
        return RemotePath(f"{self.scheme}://{self.netloc}/{posixpath.join(self.key, part)}")

    def joinpath(self, *parts: str) -> RemotePath:
        out = self
        for p in parts:
            out = out / p
        return out

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def suffixes(self) -> list[str]:
        name = self.name
        return ["." + s for s in name.split(".")[1:]] if "." in name.lstrip(".") else []

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(f"{self.scheme}://{self.netloc}/{posixpath.dirname(self.key)}")

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> RemotePath:
        return self.parent / (self.stem + suffix)

    def relative_to(self, other: str | os.PathLike[str] | RemotePath) -> PurePosixPath:
        """The key below ``other`` (a folder of the same bucket), as ``Path.relative_to`` gives it."""
        base = location(other)
        inside = (
            isinstance(base, RemotePath)
            and (self.scheme, self.netloc) == (base.scheme, base.netloc)
            and (not base.key or self.key == base.key or self.key.startswith(base.key + "/"))
        )
        if not inside or not isinstance(base, RemotePath):
            raise ValueError(f"{self.uri} is not inside {base}")
        return PurePosixPath(self.key[len(base.key) :].lstrip("/") or ".")

    def resolve(self) -> RemotePath:
        return self

    def absolute(self) -> RemotePath:
        return self

    def is_absolute(self) -> bool:
        return True

    def expanduser(self) -> RemotePath:
        return self

    # -- the filesystem -----------------------------------------------------------------------
    @property
    def filesystem(self) -> pafs.FileSystem:
        return _filesystem(self.scheme, self.netloc)

    @property
    def fs_path(self) -> str:
        """The path as the filesystem object names it (bucket/key for object stores)."""
        return posixpath.join(self.netloc, self.key) if self.key else self.netloc

    def _info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.fs_path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> os.stat_result:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.uri)
        mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
        return os.stat_result((0o644, 0, 0, 1, 0, 0, info.size or 0, mtime, mtime, mtime))

    def mkdir(self, parents: bool = False, exist_ok: bool = False, mode: int = 0o777) -> None:
        # Object stores have no folders: a prefix exists once a key under it does. pyarrow makes
        # a marker object where the store wants one; either way a later write needs nothing here.
        if not exist_ok and self.is_file():
            raise FileExistsError(self.uri)
        self.filesystem.create_dir(self.fs_path, recursive=True)

    def iterdir(self) -> Iterator[RemotePath]:
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            yield self / posixpath.basename(info.path.rstrip("/"))

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """One-level glob (``*.json``, ``[0-9]*.parquet``), or ``**/pattern`` for every level."""
        recursive = pattern.startswith("**/")
        pat = pattern[3:] if recursive else pattern
        if "/" in pat:
            raise ValueError(f"glob pattern {pattern!r}: only one level, or **/ for all levels")
        sel = pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=recursive)
        root = self.fs_path.rstrip("/") + "/"
        for info in sorted(self.filesystem.get_file_info(sel), key=lambda i: i.path):
            rel = info.path[len(root) :] if info.path.startswith(root) else posixpath.basename(info.path)
            if rel and fnmatch.fnmatchcase(posixpath.basename(rel), pat):
                yield self / rel

    def open(self, mode: str = "r", encoding: str | None = "utf-8", **_: Any) -> IO[Any]:
        if mode in ("r", "rt", "rb"):
            raw = self.filesystem.open_input_file(self.fs_path)
            return raw if mode == "rb" else io.TextIOWrapper(raw, encoding=encoding or "utf-8")  # type: ignore[arg-type]
        if mode in ("w", "wt", "wb"):
            upload = _Upload(self)
            return upload if mode == "wb" else _TextUpload(upload, encoding=encoding or "utf-8")
        raise ValueError(f"mode {mode!r} is not supported on {self.uri}")

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.fs_path, compression=None) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        with self.filesystem.open_output_stream(self.fs_path, compression=None) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.filesystem.delete_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            if not missing_ok or self.exists():
                raise

    def rmdir(self) -> None:
        if any(True for _ in self.iterdir()):
            raise OSError(f"folder {self.uri} is not empty")
        self.filesystem.delete_dir(self.fs_path)


class _Upload(io.BytesIO):
    """A write handle that uploads in one put when closed without an error, and never otherwise."""

    def __init__(self, target: RemotePath) -> None:
        super().__init__()
        self._target = target
        self._failed = False

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self._failed = exc_type is not None
        self.close()

    def close(self) -> None:
        if not self.closed:
            if not self._failed:
                self._target.write_bytes(self.getvalue())
            super().close()


class _TextUpload(io.TextIOWrapper):
    """Text mode over an ``_Upload``: an error inside the ``with`` block uploads nothing either
    (``TextIOWrapper.__exit__`` would close, and so upload, the half-written buffer)."""

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            self.buffer._failed = True  # type: ignore[attr-defined]
        self.close()


Location = Path | RemotePath


def location(value: str | os.PathLike[str] | RemotePath) -> Location:
    """A local ``Path`` or a ``RemotePath`` for anything a user or a manifest names."""
    if isinstance(value, (Path, RemotePath)):
        return value
    text = os.fspath(value)
    if text.startswith("file://"):
        return Path(urlsplit(text).path)
    return RemotePath(text) if is_uri(text) else Path(text)


def _validate_location(value: Any) -> Location:
    if not isinstance(value, (str, os.PathLike, RemotePath)):
        raise ValueError(f"expected a path or a URI (s3://bucket/key), got {type(value).__name__}")
    return location(value)


#: A config field that names a file or folder: a local path or a URI, parsed by ``location``
#: (``Path`` or ``RemotePath``); it dumps to JSON as the string it was given, so a local path's
#: stage key is what it was when the field was a ``Path``.
PathOrURI = Annotated[
    Location,
    PlainValidator(_validate_location),
    PlainSerializer(str, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "description": "a local path or a URI (s3://bucket/key)"}),
]


def arrow(value: str | os.PathLike[str] | RemotePath) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) for pyarrow's readers and writers; filesystem is None for a local path."""
    loc = location(value)
    if isinstance(loc, RemotePath):
        return loc.fs_path, loc.filesystem
    return str(loc), None


def read_parquet(value: str | os.PathLike[str] | RemotePath, **kwargs: Any) -> Any:
    """``pq.read_table`` of a local or remote file or folder."""
    import pyarrow.parquet as pq

    path, filesystem = arrow(value)
    return pq.read_table(path, filesystem=filesystem, **kwargs)


def read_schema(value: str | os.PathLike[str] | RemotePath) -> Any:
    import pyarrow.parquet as pq

    path, filesystem = arrow(value)
    return pq.read_schema(path, filesystem=filesystem)


def parquet_file(value: str | os.PathLike[str] | RemotePath) -> Any:
    """A ``pq.ParquetFile`` (metadata, row groups, ``iter_batches``) of a local or remote file."""
    import pyarrow.parquet as pq

    loc = location(value)
    if isinstance(loc, RemotePath):
        return pq.ParquetFile(loc.filesystem.open_input_file(loc.fs_path))
    return pq.ParquetFile(loc)


def files_exist(paths: Iterable[str | os.PathLike[str] | RemotePath]) -> list[bool]:
    """Whether each path is a file: a stat each on a local disk; on object storage one listing per
    folder the paths are in, not a request per path (a Karpathy JSON names thousands of images)."""
    listed: dict[RemotePath, set[str]] = {}
    out = []
    for p in paths:
        loc = location(p)
        if isinstance(loc, Path):
            out.append(loc.is_file())
            continue
        folder = loc.parent
        if folder not in listed:
            infos = folder.filesystem.get_file_info(pafs.FileSelector(folder.fs_path, allow_not_found=True))
            listed[folder] = {posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File}
        out.append(loc.name in listed[folder])
    return out


def write_atomic(path: Location, data: bytes) -> None:
    """Write ``data`` so that a reader sees the whole file or no file: temp file and rename on a
    local disk, one put on an object store."""
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Location, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(path: Location | str) -> Any:
    return json.loads(location(path).read_bytes())


def rmtree(path: Location) -> None:
    """Delete a folder and everything under it; nothing if it is not there."""
    if isinstance(path, RemotePath):
        if not path.key:  # a bucket's root: empty it, never delete the bucket itself
            path.filesystem.delete_dir_contents(path.fs_path, missing_dir_ok=True)
        elif path.exists():
            path.filesystem.delete_dir(path.fs_path)
        return
    shutil.rmtree(path, ignore_errors=True)


def put(local: Path, dest: Location) -> Location:
    """Copy a local file or folder (a model export, a report) to ``dest``, local or remote, and
    return ``dest``. Each object is uploaded whole; a folder's files appear one by one, so write
    a done marker after ``put`` where a reader must see the folder complete."""
    if isinstance(dest, Path):
        if local.resolve() != dest.resolve():
            if local.is_dir():
                shutil.copytree(local, dest, dirs_exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, dest)
        return dest
    pafs.copy_files(
        str(local),
        dest.fs_path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=dest.filesystem,
    )
    return dest


def local_copy(value: str | os.PathLike[str] | RemotePath, cache: Path | None = None) -> Path:
    """A local path for a file or folder (a checkpoint, a tokenizer) that must be opened by code
    that only reads local disk (transformers' ``from_pretrained``, ``torch.load``). Local paths
    are returned as they are; remote ones are copied into ``cache`` (default ``$CAPFILT_CACHE``
    or ``~/.cache/capfilt``), keyed by their URI and by the size and time of every object under
    it (one listing), so a checkpoint uploaded again under the same name is fetched again, and
    an unchanged one is copied once per machine. Processes that race for the same copy each make
    their own and the first rename wins."""
    import hashlib

    loc = location(value)
    if isinstance(loc, Path):
        return loc
    info = loc._info()
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{loc.uri} does not exist")
    is_dir = info.type == pafs.FileType.Directory
    if is_dir:
        listing = loc.filesystem.get_file_info(pafs.FileSelector(loc.fs_path, recursive=True))
    else:
        listing = [info]
    stamp = sorted((i.path, i.size, i.mtime_ns) for i in listing if i.type == pafs.FileType.File)
    digest = hashlib.sha256(json.dumps([loc.uri, stamp], default=str).encode()).hexdigest()[:16]
    root = cache or Path(os.environ.get("CAPFILT_CACHE", Path.home() / ".cache" / "capfilt"))
    dest = root / "remote" / digest / (loc.name or loc.netloc)
    done = dest.parent / ".complete"
    if done.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
    try:
        target = tmp / "copy"
        if is_dir:
            target.mkdir()
        pafs.copy_files(
            loc.fs_path,
            str(target),
            source_filesystem=loc.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        try:
            os.replace(target, dest)
        except OSError:
            if not dest.exists():  # not another process's finished copy: a real error
                raise
        done.touch()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
