"""Paths that may be local or in object storage (s3://, gs://, ...), through pyarrow.fs.

resolve() is pyarrow's FileSystem.from_uri, which is also what Ray Data (read_*/write_* paths) calls
on the same URI, so one URI means the same place to both; Ray Train is handed resolve()'s filesystem
itself (ray_storage). For S3, from_uri takes credentials and region from the standard variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION) and a custom endpoint
from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, whose scheme picks http or https (MinIO, moto:
AWS_ENDPOINT_URL=http://127.0.0.1:9000). pyarrow.fs.S3FileSystem() built directly ignores the
endpoint variables: always go through resolve(). Each process reads the variables itself, so they
must be set on every Ray node, or passed as the job's runtime_env env_vars, not only on the driver.

S3 that fails. The S3 filesystem is from_uri's, rebuilt with timeouts so that a store that stalls
fails a request instead of hanging it: connect within S3_CONNECT_TIMEOUT seconds, and no read goes
S3_REQUEST_TIMEOUT seconds without a byte (a slow transfer that keeps moving is not cut off). A
stalled upload is given up too, but some seconds after the timeout rather than at it.
Failed requests (5xx answers such as 503 SlowDown, reset connections, timeouts) are retried by the
AWS SDK's standard strategy, S3_ATTEMPTS attempts with its backoff. VAEDIST_S3_CONNECT_TIMEOUT and
VAEDIST_S3_REQUEST_TIMEOUT change the timeouts, in seconds, per process. ray_storage() hands Ray
Train this same filesystem, so checkpoint uploads get the same timeouts and retries. An error that
remains is raised as StorageError naming the operation and the path.

Fault injection for tests: with VAEDIST_FAULT_AFTER_STORAGE_CALLS=n set, the process exits (os._exit,
no cleanup, as a killed driver) right after the n-th call of this module's functions that touch
storage returns. The publish tests kill a publish after each of its calls in turn (vaedist.tables).
"""

from __future__ import annotations

import functools
import json
import os
import urllib.parse
from contextlib import contextmanager, suppress
from typing import IO, Any, Callable, Iterator, TypeVar

import pyarrow.fs as pafs


FAULT_ENV = "VAEDIST_FAULT_AFTER_STORAGE_CALLS"
FAULT_EXIT_CODE = 86
CONNECT_TIMEOUT_ENV, REQUEST_TIMEOUT_ENV = "VAEDIST_S3_CONNECT_TIMEOUT", "VAEDIST_S3_REQUEST_TIMEOUT"
S3_CONNECT_TIMEOUT = 5.0
S3_REQUEST_TIMEOUT = 10.0
# pyarrow's default, set here all the same: a pickled S3FileSystem (Ray Train ships its storage
# filesystem to the workers so) keeps its timeouts but comes back with the default retry strategy,
# so any other count would hold in this process only.
S3_ATTEMPTS = 3
calls = 0
"""How many storage calls this process has made (what FAULT_ENV counts)."""
_F = TypeVar("_F", bound=Callable[..., Any])


class StorageError(OSError):
    """A storage operation that failed, after the S3 client's retries; the message names the
    operation and the path(s), then the cause (e.g. No space left on device, AWS Error SLOW_DOWN)."""


def _storage_call(verb: str) -> Callable[[_F], _F]:
    """A function of this module that touches storage: counted (FAULT_ENV), and its failures raised
    as StorageError "<verb> <path> failed: ..." (FileNotFoundError as itself: callers test for it)."""
    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            global calls
            try:
                result = fn(*args, **kwargs)
            except (FileNotFoundError, StorageError):
                raise
            except OSError as e:
                paths = " to ".join(str(a) for a in args if isinstance(a, str))
                error = StorageError(f"{verb} {paths} failed: {e}")
                error.errno = e.errno
                raise error from None
            calls += 1
            if calls == int(os.environ.get(FAULT_ENV) or 0):
                os._exit(FAULT_EXIT_CODE)
            return result
        return wrapper  # type: ignore[return-value]
    return decorate


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    parts = urllib.parse.urlsplit(path)
    if parts.scheme != "s3":
        return pafs.FileSystem.from_uri(path)
    # from_uri builds a new AWS client each time (about 9 ms of CPU): one per bucket, options, AWS
    # variables and process (a client does not survive a fork), for every call on the same store.
    key = (parts.netloc, parts.query, os.getpid(), os.environ.get(CONNECT_TIMEOUT_ENV),
           os.environ.get(REQUEST_TIMEOUT_ENV), *sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    fs = _s3_by_uri.get(key)
    if fs is None:
        fs = _s3_by_uri[key] = _s3_with_timeouts(pafs.FileSystem.from_uri(path)[0])
    # The path inside, as from_uri gives it: bucket and key, percent-decoded, no trailing slash.
    return fs, (parts.netloc.rpartition("@")[2] + urllib.parse.unquote(parts.path)).rstrip("/")


def _timeout(env: str, default: float) -> float:
    text = os.environ.get(env) or ""
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1
    if not value > 0:
        raise ValueError(f"{env}={text!r}: expected a number of seconds > 0")
    return value


def _s3_with_timeouts(fs: pafs.S3FileSystem) -> pafs.S3FileSystem:
    # from_uri's options (credentials, region, endpoint: what its URI and the AWS variables say) are
    # those pickling carries, the one way pyarrow gives them back.
    options = {**fs.__reduce__()[1][0], "connect_timeout": _timeout(CONNECT_TIMEOUT_ENV, S3_CONNECT_TIMEOUT),
               "request_timeout": _timeout(REQUEST_TIMEOUT_ENV, S3_REQUEST_TIMEOUT)}
    return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))


_s3_by_uri: dict[tuple, pafs.S3FileSystem] = {}


def ray_storage(path: str) -> dict[str, Any]:
    """RunConfig's storage_path (and storage_filesystem, for a URI) for `path`: Ray Train writes the
    checkpoints through the filesystem vaedist uses, with its timeouts and retries."""
    if not is_uri(path):
        return {"storage_path": os.path.abspath(path)}
    fs, inside = resolve(path)
    return {"storage_path": inside, "storage_filesystem": fs}


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers may run elsewhere); URIs unchanged."""
    return str(path) if is_uri(path) else os.path.abspath(path)


@_storage_call("checking")
def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


@_storage_call("checking")
def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def _file_info(path: str) -> pafs.FileInfo:
    """The file's info; FileNotFoundError naming `path` where there is none."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return info


@_storage_call("reading the size of")
def size(path: str) -> int:
    return _file_info(path).size


@_storage_call("listing")
def listdir(path: str) -> list[str]:
    """Names (not paths) directly under a directory, sorted; [] if it does not exist."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(info.base_name for info in infos)


@_storage_call("creating")
def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


@_storage_call("deleting")
def rmtree(path: str) -> None:
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


@_storage_call("moving")
def move(src: str, dst: str) -> None:
    """Rename; atomic for a local directory on one filesystem, a copy-then-delete on S3."""
    fs, s = resolve(src)
    _, d = resolve(dst)
    fs.move(s, d)


@_storage_call("copying")
def copy_file(src: str, dst: str) -> None:
    """Copy one file within a filesystem; on S3 a server-side copy (the bytes do not pass through here)."""
    fs, s = resolve(src)
    _, d = resolve(dst)
    parent = d.rsplit("/", 1)[0] if "/" in d else ""
    if parent and not is_uri(dst):
        fs.create_dir(parent, recursive=True)
    fs.copy_file(s, d)


@_storage_call("deleting")
def delete_file(path: str) -> None:
    """Delete one file; nothing if it is not there."""
    fs, p = resolve(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass


@_storage_call("reading the time of")
def mtime_ns(path: str) -> int:
    """A file's modification time in nanoseconds (0 where the storage gives none)."""
    return _file_info(path).mtime_ns or 0


@contextmanager
def open_input(path: str) -> Iterator[IO[bytes]]:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        yield f


@contextmanager
def open_output(path: str) -> Iterator[IO[bytes]]:
    fs, p = resolve(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(p) as f:
        yield f


@_storage_call("reading")
def read_bytes(path: str) -> bytes:
    with open_input(path) as f:
        return f.read()


def read_json_object(path: str, error: type[Exception], hint: str = "") -> dict:
    """The JSON object in `path`; anything else raises `error` naming the file (and `hint`, what to do)."""
    try:
        value = json.loads(read_bytes(path))
    except ValueError as e:
        raise error(f"{path} is not valid JSON ({e}){hint}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


@_storage_call("writing")
def write_bytes(path: str, data: bytes) -> None:
    try:
        with open_output(path) as f:
            f.write(data)
    except OSError:
        if not is_uri(path):  # a half-written local file (a full disk): free its space (an upload leaves none)
            with suppress(OSError):
                os.remove(path)
        raise
