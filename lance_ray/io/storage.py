"""One place that turns a path or URI into an fsspec filesystem, plus safe names, atomic writes and retries.

Sources and sinks both go through `filesystem_for`, so an S3-compatible endpoint set in the
environment (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, e.g. moto or MinIO) applies to reading
inputs and writing outputs alike. Calls to object stores go through `retrying`: a dropped
connection, a timeout or a 5xx answer is retried a bounded number of times with backoff.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import fsspec
from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

# Temp files of atomic local writes are `.<name><TEMP_MARKER><32 hex>`; a killed writer can leave one behind.
TEMP_MARKER = ".tmp-"
_TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_MARKER) + r"[0-9a-f]{32}$")
# Longest row-id-derived token we put into a file name; long ids keep a readable head plus a hash.
MAX_TOKEN_LEN = 96
# Output schemes whose writes persist. Anything else (memory://, http://, zip:// ...) is refused for outputs.
PERSISTENT_SCHEMES = ("file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hdfs")
# Object-store calls: attempts and backoff (seconds) of `retrying`, on top of the client's own retries.
RETRY_ATTEMPTS = 6
RETRY_BASE_DELAY_S = 0.25
RETRY_MAX_DELAY_S = 8.0

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DOT_RUNS = re.compile(r"\.{2,}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Marks a hashed name in `file_stem`; `sanitize` never lets it through, so no literal name contains it.
_HASH_MARK = "~"


def is_local(uri: str) -> bool:
    """True for plain paths and `file://` URIs."""
    return "://" not in uri or uri.startswith("file://")


def filesystem_for(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it (protocol stripped; absolute for local paths).

    For `s3://` the endpoint comes from `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, when set.
    Passing it explicitly (rather than trusting every botocore version to read the variable) also
    makes fsspec's instance cache tell two endpoints apart.
    """
    if is_local(uri):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    options: dict = {}
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a local path or a URI, keeping the URI's protocol."""
    if is_local(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def to_uri(fs: AbstractFileSystem, path: str) -> str:
    """The user-facing form of a path on `fs`: a plain path locally, `proto://path` elsewhere."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def resolve_media_uri(output_uri: str, media_uri: str | None) -> str | None:
    """Where a `media_uri` of a step's output points: a full URI or absolute path as it is, a relative
    one (local outputs store `__media__/<name>.png`) joined onto the step's output folder.

    `output_uri` is the folder you read the step's rows from (the one holding `part-*.parquet`).
    """
    if media_uri is None or _SCHEME.match(media_uri) or os.path.isabs(media_uri):
        return media_uri
    return join_uri(output_uri, media_uri)


def output_location_problem(uri: str) -> str | None:
    """Why `uri` cannot be an output location (None when it can): control characters, or a scheme
    whose writes do not persist (memory://) or that cannot be written (http://)."""
    bad = next((ch for ch in uri if ord(ch) < 32 or ord(ch) == 127), None)
    if bad is not None:
        return f"output path contains a control character ({bad!r} at position {uri.index(bad)})"
    match = _SCHEME.match(uri)
    if match and match.group(1).lower() not in PERSISTENT_SCHEMES:
        allowed = ", ".join(f"{s}://" for s in PERSISTENT_SCHEMES)
        return (f"output scheme '{match.group(1)}://' does not persist what lance-ray writes; use a local path "
                f"or one of {allowed}")
    return None


def short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def sanitize(text: str) -> str:
    """`text` reduced to `[A-Za-z0-9._-]` with no `..` and no leading/trailing `.`/`_`/`-` (may be empty)."""
    return _DOT_RUNS.sub(".", _UNSAFE_CHARS.sub("_", text)).strip("._-")


def safe_token(text: str, max_len: int = MAX_TOKEN_LEN) -> str:
    """A file-name-safe token for `text` (see `sanitize`), never empty, at most `max_len` characters.

    Unchanged when already safe; otherwise a hash of the original is appended so that two ids that
    sanitise to the same string stay distinct. (Row ids are made with it; file names use `file_stem`.)
    """
    token = sanitize(text)
    if token and token == text and len(token) <= max_len:
        return token
    head = token[: max_len - 9].strip("._-") or "id"
    return f"{head}-{short_hash(text)}"


def file_stem(row_id: str, *, dots: bool = True) -> str:
    """The file-name stem lance-ray gives a row's files: one-to-one with row ids.

    A row id that is already a safe name (`sanitize` leaves it alone, short enough, and without dots
    when `dots` is False, as WebDataset keys need) is used as it is. Any other id becomes
    `<sanitised head>~<64-bit hash of the id>`: `~` never survives `sanitize`, so no literal id can
    produce a hashed name, and suffixes added after another `~` (`~turn2`) can never be produced by
    an id either. Never empty, never starts with a dot, never contains `/`.
    """
    literal = sanitize(row_id) == row_id and 0 < len(row_id) <= MAX_TOKEN_LEN and (dots or "." not in row_id)
    if literal:
        return row_id
    head = sanitize(row_id if dots else row_id.replace(".", "_"))[: MAX_TOKEN_LEN - 17].strip("._-") or "id"
    return f"{head}{_HASH_MARK}{short_hash(row_id, 16)}"


def turn_stem(row_id: str, turn: int, *, dots: bool = True) -> str:
    """The stem of a multi-turn edit's intermediate result: `<file_stem>~turn<N>` (see `file_stem`)."""
    return f"{file_stem(row_id, dots=dots)}{_HASH_MARK}turn{turn}"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of `write_bytes_atomic`'s temp files."""
    return bool(_TEMP_NAME.match(name))


# -- retries ---------------------------------------------------------------------------------------------

_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_NAMES = {  # botocore / aiohttp exception classes, by name (no hard import of either)
    "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "ClientConnectorError", "ServerDisconnectedError",
    "ClientPayloadError", "ClientOSError", "ServerTimeoutError", "FSTimeoutError", "ProxyConnectionError",
}
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                    "RequestTimeTooSkewed", "503", "500", "502", "504"}


def is_transient(exc: BaseException) -> bool:
    """Whether an object-store error is worth retrying: connection trouble, timeouts, 5xx, throttling."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
        return True
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    if isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.ECONNRESET, errno.ETIMEDOUT, errno.EAGAIN):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def retrying(call: Callable[[], T], what: str) -> T:
    """`call()`, retried on transient object-store errors: at most `RETRY_ATTEMPTS` tries, exponential
    backoff with jitter between them. Only for idempotent calls (whole-object PUT, GET, LIST, DELETE)."""
    delay = RETRY_BASE_DELAY_S
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == RETRY_ATTEMPTS or not is_transient(exc):
                raise
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc, attempt,
                        RETRY_ATTEMPTS - 1, delay)
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RETRY_MAX_DELAY_S)
    raise AssertionError("unreachable")


def _invalidate(fs: AbstractFileSystem, path: str) -> None:
    """Forget fsspec's cached listings: other processes write here, a cached listing would be stale."""
    fs.invalidate_cache(path)
    fs.invalidate_cache(path.rsplit("/", 1)[0])


# -- whole-object IO -------------------------------------------------------------------------------------


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole object so that readers see either nothing or the complete file.

    Local: a hidden temp file in the same directory, then `os.replace` (atomic on POSIX).
    Object stores: one `pipe` call, i.e. a single PUT (or one multipart upload, which S3 also
    commits atomically), retried on transient errors (a PUT of the whole object is idempotent).
    """
    fs, path = filesystem_for(uri)
    if not is_local(uri):
        retrying(lambda: fs.pipe(path, data), f"writing {uri}")
        _invalidate(fs, path)
        return
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}{TEMP_MARKER}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_bytes(uri: str) -> bytes:
    """A whole object's bytes (retried on transient errors)."""
    fs, path = filesystem_for(uri)
    return retrying(lambda: fs.cat_file(path), f"reading {uri}")


def exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    _invalidate(fs, path)
    return retrying(lambda: fs.exists(path), f"checking {uri}")


def list_entries(uri: str) -> list[dict]:
    """What is directly in a folder/prefix (fsspec `ls` entries with `name`, `type`, `size`, a modification
    time), never a cached listing; [] when it does not exist."""
    fs, path = filesystem_for(uri)
    _invalidate(fs, path)

    def listing() -> list[dict]:
        try:
            return fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []

    return retrying(listing, f"listing {uri}")


def list_files(uri: str) -> list[dict]:
    """The files directly in a folder/prefix (see `list_entries`)."""
    return [e for e in list_entries(uri) if e["type"] == "file"]


def modified_at(entry: dict) -> float:
    """Epoch seconds of an `ls` entry's modification time (local `mtime`, S3 `LastModified`)."""
    stamp = entry.get("LastModified", entry.get("mtime", entry.get("last_modified", 0.0)))
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or 0.0)


def remove(uri: str) -> bool:
    """Delete one file; False when it was not there (a retried delete may find it gone)."""
    fs, path = filesystem_for(uri)

    def delete() -> bool:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    removed = retrying(delete, f"removing {uri}")
    _invalidate(fs, path)
    return removed


def remove_empty_dir(uri: str) -> None:
    """Remove a local folder if it is empty (object stores have no empty folders)."""
    if is_local(uri):
        _, path = filesystem_for(uri)
        with contextlib.suppress(OSError):  # not there, or not empty: someone else's files stay
            os.rmdir(path)


def remove_stale_temp_files(directory: str) -> int:
    """Deletes the temp files killed writers left directly in a local `directory`; returns how many.

    Only names `write_bytes_atomic` makes are touched. Only call this when no other writer uses the
    directory (a run does, holding the output's lock, before it starts writing).
    """
    if not is_local(directory):
        return 0  # object stores get whole objects in one PUT: nothing partial to clean up
    _, root = filesystem_for(directory)
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = 0
    for name in names:
        if is_temp_name(name) and os.path.isfile(os.path.join(root, name)):
            os.remove(os.path.join(root, name))
            removed += 1
    return removed
