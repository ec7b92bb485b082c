"""The storage path: where Tune keeps trials and checkpoints, a local folder or a URI.

Everything that reads or writes under ``--storage-path`` goes through this module, built on
``pyarrow.fs`` as Ray Tune is (``pyarrow.fs.FileSystem.from_uri``): a local path, ``s3://bucket/prefix``
(credentials and endpoint from the usual ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` included),
``gs://bucket/prefix``, ``hdfs://...``. A location is a string: a local path as given, or a URI;
nothing here applies ``pathlib``, ``os.path`` or ``shutil`` to a URI.

    check_storage(uri)          # before any trial: write and delete a probe object (one-line error)
    write_text(join(uri, "sweep.json"), text); read_text(...); exists(...); rmtree(...)
    with local_copy(checkpoint_uri) as folder: ...   # a remote checkpoint downloaded to a temp folder

On S3 the client has short connect/request timeouts and a bounded number of retries, so that a
wrong endpoint or key fails in seconds, and buckets are never created or deleted (a missing bucket
is an error: the operator makes it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import urllib.parse
from typing import Iterator

from pyarrow import fs as pafs
from pyarrow.fs import FileSelector, FileType

from .errors import UserError, one_line
from .files import write_atomic

S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 3   # a wrong key or a missing bucket fails at once; an unreachable endpoint in < 1 min
PROBE = ".tune-dynsdpb-probe"


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URI of a remote filesystem (``file://`` counts as local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> str:
    """The local path of a local location (``file://`` stripped); a URI is returned as it is."""
    text = str(location)
    return text[len("file://"):] if text.startswith("file://") else text


def normalize(location: str | os.PathLike) -> str:
    """A local location made absolute, or a URI without its trailing slash."""
    if is_uri(location):
        return str(location).rstrip("/")
    return os.path.abspath(os.path.expanduser(local_path(location)))


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (a URI's query string, if any, stays at its end)."""
    if not is_uri(base):
        return os.path.join(local_path(base), *parts)
    split = urllib.parse.urlsplit(base)
    path = "/".join([split.path.rstrip("/"), *[p.strip("/") for p in parts]])
    return urllib.parse.urlunsplit(split._replace(path=path))


def within(location: str, folder: str | os.PathLike) -> bool:
    """Whether ``location`` is ``folder`` or lies inside it (a URI never does)."""
    if is_uri(location):
        return False
    path, inner = os.path.realpath(normalize(location)), os.path.realpath(folder)
    return path == inner or path.startswith(inner.rstrip(os.sep) + os.sep)


def redact(location: str) -> str:
    """``location`` without a secret in its user info (``s3://key:***@bucket``)."""
    if not is_uri(location):
        return location
    parts = urllib.parse.urlsplit(location)
    if parts.password is None and not parts.username:
        return location
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***" if parts.password is not None else "***"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def _s3(parts: urllib.parse.SplitResult):
    """An S3 filesystem with short timeouts and bounded retries; endpoint and region from the
    environment (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``),
    credentials from the default AWS chain. Buckets are never created or deleted."""
    kwargs = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if region:
        kwargs["region"] = region
    elif not endpoint:  # AWS itself: the bucket's own region, as from_uri finds it
        with contextlib.suppress(Exception):
            kwargs["region"] = pafs.resolve_s3_region(parts.netloc)
    return pafs.S3FileSystem(connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
                             allow_bucket_creation=False, allow_bucket_deletion=False, **kwargs)


def filesystem(location: str):
    """``(pyarrow filesystem, path in it)`` of a location."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), normalize(location)
    parts = urllib.parse.urlsplit(location)
    if parts.scheme in ("s3", "s3a") and not parts.query and "@" not in parts.netloc:
        return _s3(parts), f"{parts.netloc}{parts.path}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(location)
    except (OSError, ValueError) as e:
        raise UserError(f"--storage-path: {redact(location)}: {one_line(e)}") from None


def to_uri(fs_path: str, like: str) -> str:
    """A path inside the filesystem of ``like`` (as Tune hands out: ``bucket/prefix/...`` for S3)
    as a location of the same kind as ``like``."""
    if not is_uri(like):
        return fs_path
    parts = urllib.parse.urlsplit(like)
    return f"{parts.scheme}://{fs_path.lstrip('/')}" + (f"?{parts.query}" if parts.query else "")


def _info(location: str):
    fs, path = filesystem(location)
    return fs, path, fs.get_file_info(path)


def exists(location: str) -> bool:
    return _info(location)[2].type != FileType.NotFound


def is_dir(location: str) -> bool:
    return _info(location)[2].type == FileType.Directory


def is_file(location: str) -> bool:
    return _info(location)[2].type == FileType.File


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str, data: bytes) -> None:
    """Writes a whole object or file; readers see the old one or the new one (a local file is
    replaced atomically, an object store's PUT is atomic)."""
    if not is_uri(location):
        path = normalize(location)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, data.decode("utf-8"))  # (what is kept here is text: JSON, the journal)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def delete_file(location: str) -> None:
    """Removes one file or object; nothing to do when it is not there."""
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def rmtree(location: str) -> None:
    """Removes a folder (a prefix) and everything under it; nothing to do when it is not there."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == FileType.Directory:
        fs.delete_dir(path)


def list_dir(location: str) -> dict[str, bool]:
    """``{name: is a folder}`` of what is directly under ``location`` (empty when it is not there)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(FileSelector(path, allow_not_found=True))
    return {i.base_name: i.type == FileType.Directory for i in infos}


def find(location: str, name: str) -> list[str]:
    """Every file called ``name`` under ``location``, as locations."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(FileSelector(path, recursive=True, allow_not_found=True))
    found = [i.path for i in infos if i.type == FileType.File and i.base_name == name]
    return [to_uri(p, location) if is_uri(location) else p for p in found]


def size(location: str) -> int:
    """Bytes of every file under ``location`` (0 when it is not there)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == FileType.File)


def download(location: str, local: str) -> None:
    """Copies a file, or a folder with everything under it, to the local path ``local``."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return
    os.makedirs(local, exist_ok=True)
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def upload(local: str, location: str) -> None:
    """Copies the local file ``local`` to ``location`` (written whole)."""
    with open(local, "rb") as f:
        write_bytes(location, f.read())


def mirror(location: str, name: str, text: str | None = None, local: str | os.PathLike | None = None) -> bool:
    """Copies ``text`` (or the local file ``local``) to ``location/name``; returns whether it did. A
    failure is one warning line on stderr, not an error: the caller keeps its own copy, and its
    next mirror tries again (the storage is down or slow)."""
    target = join(location, name)
    try:
        if local is not None:
            upload(str(local), target)
        else:
            write_text(target, text or "")
        return True
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"tune-dynsdpb: warning: cannot mirror {name} to {redact(target)}: {one_line(e)}", file=sys.stderr)
        return False


@contextlib.contextmanager
def local_copy(location: str, prefix: str = "dynsdpb-storage-") -> Iterator[str]:
    """A local folder with the content of ``location``: the folder itself when it is local, else a
    temporary download removed after the block."""
    if not is_uri(location):
        yield normalize(location)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        target = os.path.join(tmp, location.rstrip("/").rsplit("/", 1)[-1] or "data")
        download(location, target)
        yield target


def check_storage(location: str, flag: str = "--storage-path") -> None:
    """Writes and deletes a probe object under ``location``, so that a wrong key, a missing bucket
    or an unreachable endpoint fails here, in seconds, with one line naming the location (its
    credentials redacted) and the cause, before any trial or MLflow run exists. A missing bucket is
    never created; a local folder that does not exist yet is not made (its parent is checked)."""
    shown = redact(location)
    try:
        fs, path = filesystem(location)
        if is_uri(location):
            parts = urllib.parse.urlsplit(location)
            if parts.scheme in ("s3", "s3a", "gs", "gcs") and parts.netloc:
                bucket = parts.netloc.rpartition("@")[2]
                if fs.get_file_info(bucket).type == FileType.NotFound:
                    raise UserError(f"{flag}: {shown}: bucket {bucket!r} does not exist (create it first; "
                                    "tune-dynsdpb never creates buckets)")
        elif not os.path.isdir(path):  # Tune makes it: check the nearest folder that exists
            parent = path
            while not os.path.isdir(parent):
                if os.path.exists(parent):
                    raise UserError(f"{flag}: {parent} is not a folder")
                parent = os.path.dirname(parent)
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{flag}: cannot create {path}: {parent} is not writable")
            return
        probe = f"{path.rstrip('/')}/{PROBE}-{os.getpid()}"
        with fs.open_output_stream(probe) as f:
            f.write(b"probe")
        fs.delete_file(probe)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError from pyarrow, and whatever a backend raises
        text = one_line(e, 400).replace(location, shown)
        raise UserError(f"{flag}: cannot write to {shown}: {text}") from None


__all__ = ["is_uri", "normalize", "join", "redact", "filesystem", "to_uri", "exists", "is_dir", "is_file",
           "read_text", "read_bytes", "write_text", "write_bytes", "delete_file", "rmtree", "list_dir", "find",
           "size", "download", "upload", "local_copy", "check_storage"]
