"""Where a shard set lives: a local folder or any fsspec URL (DESIGN section 8).

`shard_path(location)` gives a `pathlib.Path` for a local folder and a `UrlPath` for a URL
(`s3://bucket/prefix`, `gs://...`, `hf://datasets/...`, `memory://...`: whatever fsspec has a
filesystem for). A `UrlPath` has the few pathlib methods the shard code uses (`/`, `name`,
`exists`, `glob`, `read_text`, `unlink`, ...), so writers and readers handle both alike; the
functions below do what pathlib has no method for, for both kinds:

    publish(path, write)      a file visible under its name only when whole: written to a local
                              temporary file, then renamed (local, after fsync) or uploaded (URL:
                              an object store has no rename, but an upload appears only complete)
    create_exclusive(path)    create a file only if it does not exist (the per-worker lock)
    read_parquet, parquet_file, read_parquet_schema, remove_tree, local_copy

Credentials and settings come from where the filesystem package looks (for S3: the AWS
environment variables, `~/.aws`, `AWS_ENDPOINT_URL`; for every fsspec filesystem also its
`~/.config/fsspec/*.json` and `FSSPEC_<PROTOCOL>_<KEY>` variables). Failures of the store itself
(no such bucket, access denied, no credentials, endpoint unreachable, package missing) are a
`StoreError` naming the URL; a missing object stays a `FileNotFoundError`, as for a local file.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import socket
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable, Union

import pyarrow.parquet as pq

from wspo.errors import WspoError


class StoreError(WspoError):
    """A shard location that cannot be reached, read or written; the message names the URL."""


class ShardError(WspoError):
    """A shard set that cannot be used as it is; the message names the file and the problem.
    (Defined here, the bottom layer, so storage can raise it; wspo.shards.store re-exports it.)"""


def is_url(location) -> bool:
    """`scheme://...` other than `file://` (a local path in URL form)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def shard_path(location) -> Union[Path, "UrlPath"]:
    """A local folder or file as a `Path`, a URL as a `UrlPath` (already-made paths pass through)."""
    if isinstance(location, (Path, UrlPath)):
        return location
    text = os.fspath(location)
    if is_url(text):
        return UrlPath.from_url(text)
    return Path(text.removeprefix("file://"))


# -- URLs ---------------------------------------------------------------------------------------


def _install_hint(protocol: str) -> str:
    if protocol in ("s3", "s3a"):
        return 'pip install "wspo[s3]" (s3fs)'
    from fsspec.registry import known_implementations

    known = known_implementations.get(protocol, {})
    package = known.get("class", "").split(".")[0]
    return f"pip install {package}" if package else "install the fsspec filesystem package for it"


class UrlPath:
    """A file or folder under an fsspec URL, with the subset of pathlib the shard code uses.

    Listings are never cached (`use_listings_cache=False`): other workers write the same prefix,
    and a stale listing would hide their manifests.
    """

    def __init__(self, fs, path: str, url: str):
        self.fs, self.path, self.url = fs, path.rstrip("/"), url.rstrip("/")

    @classmethod
    def from_url(cls, url: str) -> "UrlPath":
        import fsspec

        protocol = url.split("://", 1)[0]
        try:
            fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False)
        except ImportError:
            raise StoreError(f"{url}: {protocol}:// URLs need a filesystem package that is not installed: "
                             f"{_install_hint(protocol)}") from None
        except ValueError as e:
            raise StoreError(f"{url}: not a URL fsspec can open ({e})") from None
        except Exception as e:  # noqa: BLE001 - a filesystem's constructor (bad config, credentials)
            raise StoreError(f"{url}: cannot open its filesystem ({type(e).__name__}: {e})") from None
        return cls(fs, path, url)

    # -- names --

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __fspath__(self):  # pyarrow, open() and shutil must not take a URL for a local path
        raise TypeError(f"{self.url} is a URL, not a local path")

    def __eq__(self, other) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __lt__(self, other: "UrlPath") -> bool:
        return self.url < other.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name) -> "UrlPath":
        name = str(name).strip("/")
        return UrlPath(self.fs, f"{self.path}/{name}", f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "UrlPath":
        return UrlPath(self.fs, self.path.rsplit("/", 1)[0], self.url.rsplit("/", 1)[0])

    def with_name(self, name: str) -> "UrlPath":
        return self.parent / name

    def relative_to(self, root: "UrlPath") -> PurePosixPath:
        if not self.path.startswith(root.path + "/"):
            raise ValueError(f"{self.url} is not under {root.url}")
        return PurePosixPath(self.path[len(root.path) + 1:])

    def expanduser(self) -> "UrlPath":
        return self

    def resolve(self) -> "UrlPath":
        return self

    @property
    def bucket(self) -> str:
        """The bucket (container) of an object store; '' for filesystems without buckets. The
        object-store filesystems (s3fs, gcsfs, adlfs) are the ones with a `split_path`."""
        split = getattr(self.fs, "split_path", None)
        return split(self.path)[0] if split is not None else ""

    # -- the store's own failures, named --

    @contextlib.contextmanager
    def _errors(self, what: str):
        """Turn the filesystem package's failures into a StoreError naming this URL. A missing
        object stays FileNotFoundError (callers treat it as locally); a missing bucket does not."""
        try:
            yield
        except FileNotFoundError as e:
            if self.bucket and "bucket" in str(e).lower():
                raise StoreError(f"{self.url}: no such bucket '{self.bucket}' (create it first, or fix the URL)") from None
            raise FileNotFoundError(f"{self.url}: no such file") from None
        except FileExistsError:
            raise
        except PermissionError as e:
            raise StoreError(f"{self.url}: access denied while trying to {what} ({e}); check the credentials "
                             "(environment, ~/.aws, fsspec config) and the bucket's permissions") from None
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore, aiohttp, gcsfs, ... each raise their own types
            kind = type(e).__name__
            hint = ""
            if "Credentials" in kind:
                hint = "; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile in ~/.aws, or the fsspec config"
            elif "Connect" in kind or "Endpoint" in kind:
                hint = "; check the endpoint (AWS_ENDPOINT_URL) and the network"
            raise StoreError(f"{self.url}: cannot {what} ({kind}: {e}){hint}") from None

    def _check_bucket(self) -> None:
        if not self.bucket:
            return
        try:
            with self._errors("look up its bucket"):
                self.fs.info(self.bucket)  # not exists(): s3fs answers False for an unreachable endpoint too
        except FileNotFoundError:
            raise StoreError(f"{self.url}: no such bucket '{self.bucket}' (create it first, or fix the URL)") from None

    # -- reading --

    def exists(self) -> bool:
        with self._errors("look it up"):
            return self.fs.exists(self.path)

    def is_file(self) -> bool:
        with self._errors("look it up"):
            return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        """A prefix with at least one object under it (object stores have no empty folders)."""
        self._check_bucket()
        with self._errors("list it"):
            return self.fs.isdir(self.path)

    def stat(self) -> os.stat_result:
        with self._errors("look it up"):
            size = self.fs.size(self.path)
        return os.stat_result((0, 0, 0, 0, 0, 0, size, 0, 0, 0))

    def open(self, mode: str = "rb"):
        with self._errors("open it"):
            return self.fs.open(self.path, mode)

    def read_bytes(self) -> bytes:
        with self._errors("read it"):
            return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def glob(self, pattern: str) -> list["UrlPath"]:
        """The files directly under this folder whose names match `pattern`, sorted."""
        with self._errors("list it"):
            try:
                names = self.fs.ls(self.path, detail=False)
            except FileNotFoundError as e:
                if self.bucket and "bucket" in str(e).lower():
                    raise
                names = []
        found = sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names})
        return [self / n for n in found if fnmatch.fnmatchcase(n, pattern)]

    # -- writing --

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: only check that the bucket exists (never create one)."""
        self._check_bucket()

    def write_bytes(self, data: bytes) -> None:
        with self._errors("write it"):
            self.fs.pipe_file(self.path, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            with self._errors("delete it"):
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def upload(self, local: Path) -> None:
        with self._errors("upload it"):
            self.fs.put_file(str(local), self.path)

    def create(self, data: bytes) -> bool:
        """Write only if absent: fsspec's `mode="create"` (S3 `If-None-Match: *`, an `xb` open for
        memory and local). Filesystems without a conditional write fall back to fsspec's check
        then write; reading the object back after writing narrows, but does not close, the window
        in which two writers both win (docs/cluster.md)."""
        try:
            with self._errors("create it"):
                self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        return self.read_bytes() == data

    def remove_tree(self) -> None:
        with self._errors("delete it"):
            names = self.fs.find(self.path)
            if names:
                self.fs.rm(names)


# -- what pathlib has no method for, for both kinds ---------------------------------------------

AnyPath = Union[Path, UrlPath]


def _tmp_path(path: Path) -> Path:
    """A temporary name of this writer's own: several workers (on several hosts) may write one
    shared file at once (the dataset card), and must not rename each other's half-written file."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def publish(path: AnyPath, write: Callable[[Path], None]) -> None:
    """Have `write(tmp)` write a local temporary file, then make it `path` whole or not at all.

    Local: the temporary file sits next to `path`; fsync then rename, so after a crash a file
    under its final name is whole. URL: the temporary file is in the local temp folder and is
    uploaded under the final key; an object appears only when its upload completes (a killed
    upload leaves no object), so the same holds without a rename. Memory holds what `write`
    holds (one part), not the file.
    """
    if isinstance(path, UrlPath):
        with tempfile.TemporaryDirectory(prefix="wspo-upload-") as folder:
            tmp = Path(folder) / path.name
            write(tmp)
            path.upload(tmp)
        return
    tmp = _tmp_path(path)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:  # a full disk: no half-written temporary left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def create_exclusive(path: AnyPath, data: bytes) -> bool:
    """Create `path` holding `data` if it does not exist; False if it does."""
    if isinstance(path, UrlPath):
        return path.create(data)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def remove_tree(path: AnyPath) -> None:
    """Delete a folder and everything under it; nothing there is fine."""
    if isinstance(path, UrlPath):
        path.remove_tree()
    else:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def _arrow(path: AnyPath) -> tuple[str | Path, object]:
    """(path, filesystem) for pyarrow: fsspec's filesystem behind pyarrow's own interface."""
    if isinstance(path, UrlPath):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return path.path, PyFileSystem(FSSpecHandler(path.fs))
    return path, None


def read_parquet(path: AnyPath, columns: list[str] | None = None):
    where, fs = _arrow(path)
    if fs is None:
        return pq.read_table(where, columns=columns)
    with path._errors("read it"):
        return pq.read_table(where, columns=columns, filesystem=fs)


def parquet_file(path: AnyPath) -> pq.ParquetFile:
    where, fs = _arrow(path)
    if fs is None:
        return pq.ParquetFile(where)
    with path._errors("read it"):
        return pq.ParquetFile(where, filesystem=fs)


def read_parquet_schema(path: AnyPath):
    where, fs = _arrow(path)
    if fs is None:
        return pq.read_schema(where)
    with path._errors("read it"):
        return pq.read_schema(where, filesystem=fs)


@contextlib.contextmanager
def local_copy(path: AnyPath, sha256: str, folder: Path):
    """A local file to read `path` from. A local path is itself (its checksum is the reader's
    affair); a URL is downloaded once, in one streaming read, into `folder`, its sha256 checked
    as it arrives, and the copy deleted afterwards."""
    if not isinstance(path, UrlPath):
        yield path
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".download-{os.getpid()}-{path.name}"
    digest = hashlib.sha256()
    try:
        with path._errors("read it"), path.open("rb") as source, open(tmp, "wb") as sink:
            for block in iter(lambda: source.read(1 << 22), b""):
                digest.update(block)
                sink.write(block)
        if digest.hexdigest() != sha256:
            raise ShardError(f"{path}: sha256 does not match the manifest (altered after writing)")
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
