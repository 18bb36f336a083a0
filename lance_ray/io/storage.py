"""One place that turns a path or URI into an fsspec filesystem, plus safe names and atomic writes.

Sources and sinks both go through `filesystem_for`, so an S3-compatible endpoint set in the
environment (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, e.g. moto or MinIO) applies to reading
inputs and writing outputs alike.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid

import fsspec
from fsspec import AbstractFileSystem

# Temp files of atomic local writes are `.<name><TEMP_MARKER><uuid>`; a killed writer can leave one behind.
TEMP_MARKER = ".tmp-"
# Longest row-id-derived token we put into a file name; long ids keep a readable head plus a hash.
MAX_TOKEN_LEN = 96

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DOT_RUNS = re.compile(r"\.{2,}")


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


def short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def sanitize(text: str) -> str:
    """`text` reduced to `[A-Za-z0-9._-]` with no `..` and no leading/trailing `.`/`_`/`-` (may be empty)."""
    return _DOT_RUNS.sub(".", _UNSAFE_CHARS.sub("_", text)).strip("._-")


def safe_token(text: str, max_len: int = MAX_TOKEN_LEN) -> str:
    """A file-name-safe token for `text` (see `sanitize`), never empty, at most `max_len` characters.

    Unchanged when already safe; otherwise a hash of the original is appended so that two ids that
    sanitise to the same string stay distinct.
    """
    token = sanitize(text)
    if token and token == text and len(token) <= max_len:
        return token
    head = token[: max_len - 9].strip("._-") or "id"
    return f"{head}-{short_hash(text)}"


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole object so that readers see either nothing or the complete file.

    Local: a hidden temp file in the same directory, then `os.replace` (atomic on POSIX).
    Object stores: one `pipe` call, i.e. a single PUT (or one multipart upload, which S3 also
    commits atomically).
    """
    fs, path = filesystem_for(uri)
    if not is_local(uri):
        fs.pipe(path, data)
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


def remove_stale_temp_files(directory: str) -> int:
    """Deletes temp files that killed writers left in a local `directory` (and below); returns how many.

    Only call this when no other writer uses the directory (a run does, before it starts writing).
    """
    if not is_local(directory):
        return 0  # object stores get whole objects in one PUT: nothing partial to clean up
    _, root = filesystem_for(directory)
    removed = 0
    for folder, _, names in os.walk(root):
        for name in names:
            if name.startswith(".") and TEMP_MARKER in name:
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed
