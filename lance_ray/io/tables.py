"""Input files: what a step's `input.path` names, how a table's records are read, how many there are.

Everything here is plain IO, shared by the run (the source's read task, `lance_ray.pipeline.sources`)
and by validation before any work (`lance_ray.spec.loader` samples tables here), so both read a file
the same way.

* `expand_paths`: files, directories, globs and URIs → `InputFile`s (with size and modification
  stamp, the basis of an input's fingerprint). Inputs must be regular files or object-store keys: a
  named device, FIFO or socket (`/dev/zero`) is refused, and folders and globs skip them.
* `read_records`: the records of one table, as `Record`s, in file order. A line or item that is not a
  record (invalid JSON, not an object, a line over `MAX_LINE_BYTES`) is a `Record` with `error` set,
  not an exception, so it becomes one error row instead of failing the job.
* `count_records`: how many records a table holds, cheaply: Parquet metadata, a line count for JSONL
  and CSV (exact unless a CSV quotes a line break), or an estimate from the first MiB for a large
  remote file (`RowCount.exact` says which).
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lance_ray.errors import InputError
from lance_ray.io.storage import filesystem_for, is_local, to_uri

TABLE_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".json": "json"}
TABLE_FORMATS = frozenset(TABLE_EXTENSIONS.values())
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})

MAX_LINE_BYTES = 16 * 1024 * 1024  # a longer JSONL line is an error row (a file with no newline is not a row)
MAX_JSON_BYTES = 1024 * 1024 * 1024  # a `format: json` file is parsed whole; larger inputs belong in JSONL
_COUNT_CHUNK = 8 * 1024 * 1024
_READ_CHUNK = 1024 * 1024
_SMALL_REMOTE = 8 * 1024 * 1024  # remote JSONL/CSV up to this size are counted exactly, larger ones estimated
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*(?=\n)")  # a line break followed by a blank line


class SourceError(InputError):
    """The step's input as a whole is unusable: nothing matched, an unreadable table, duplicate ids."""


@dataclass(frozen=True)
class InputFile:
    uri: str  # what readers open (a local path or `proto://…`)
    rel: str  # path relative to the input root, '/'-separated (media files' row ids come from it)
    kind: str  # "jsonl" | "csv" | "parquet" | "json" | "image" | "video"
    size: int | None = None
    stamp: str | None = None  # modification time (local) or ETag / last-modified (object stores)


@dataclass(frozen=True, slots=True)
class Record:
    """One item of a table: a row (`data`), or why the item is not one (`error`)."""

    data: dict | None
    error: str | None = None
    key: str | None = None  # the record's key in a JSON object of records: its row id
    position: int = 0  # 0-based index among the table's items (blank lines do not count)
    text: str | None = None  # what a bad item holds (its first KiB), so its row id follows its content


@dataclass(frozen=True)
class RowCount:
    rows: int
    exact: bool = True

    def __add__(self, other: RowCount) -> RowCount:
        return RowCount(self.rows + other.rows, self.exact and other.exact)


# ------------------------------------------------------------------------------------- listing files


def kind_of(name: str, fmt: str) -> str | None:
    """What a file is: its `fmt` when that is a table format, else by extension (None: not an input)."""
    ext = os.path.splitext(name)[1].lower()
    if fmt in TABLE_FORMATS:
        return fmt
    if fmt == "images":
        return "image" if ext in IMAGE_EXTENSIONS else None
    if fmt == "videos":
        return "video" if ext in VIDEO_EXTENSIONS else None
    if ext in TABLE_EXTENSIONS:
        return TABLE_EXTENSIONS[ext]
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def group_of(kind: str) -> str:
    return "table" if kind in TABLE_FORMATS else kind


def _glob_root(path: str) -> str:
    """The directory part of a glob pattern before its first wildcard."""
    first = min(i for i, c in enumerate(path) if c in "*?[")
    return path[:first].rsplit("/", 1)[0] if "/" in path[:first] else ""


def _protocol(fs: Any) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_regular(fs: Any, path: str, info: dict) -> bool:
    """Regular files and object-store keys; never a device, FIFO or socket (reading /dev/zero never ends)."""
    if _protocol(fs) in ("file", "local"):
        try:
            return stat.S_ISREG(os.stat(path).st_mode)  # follows symlinks: a link to a device is a device
        except OSError:
            return False
    return info.get("type") == "file"


def _stamp(info: dict) -> str | None:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def expand_paths(paths: Iterable[str], fmt: str = "auto", prefer: str | None = None) -> list[InputFile]:
    """Files named by `paths` (files, directories, globs, URIs) in the order given, each directory or
    glob sorted by name, with paths relative to the common root of all of them.

    Explicit files are taken whatever their extension says (unknown extensions are an error in
    `auto`); globs contribute the files that fit `fmt` (any file for a table format), folders
    (recursively, hidden entries skipped) the files whose extension fits `fmt`. In `auto`, a
    directory or glob holding several kinds contributes only `prefer` (the task's input media:
    "image" | "video") when it has any, else its tables. An explicit path that is not a regular file
    is an error; folders and globs skip such entries.
    """
    found: list[tuple[Any, str, str, str, dict]] = []  # (fs, path, root, kind, info)
    for spec in paths:
        fs, path = filesystem_for(spec)
        is_dir = False
        if any(c in path for c in "*?["):
            root, explicit = _glob_root(path), False
            matches = dict(sorted(fs.glob(path, detail=True).items()))
        elif fs.isdir(path):
            root, explicit, is_dir = path.rstrip("/"), False, True
            matches = dict(sorted(fs.find(path, detail=True).items()))
        elif fs.exists(path):
            root, explicit = posixpath.dirname(path), True
            matches = {path: fs.info(path)}
            if not _is_regular(fs, path, matches[path]):
                raise SourceError(f"input {spec}: not a regular file (a device, FIFO or socket?); inputs must "
                                  "be regular files, folders of them, or object-store keys")
        else:
            raise SourceError(f"input {spec}: no such file or directory")
        items = []
        for match, info in matches.items():
            name = posixpath.basename(match)
            if not explicit and (
                any(part.startswith(".") for part in posixpath.relpath(match, root).split("/"))
                or not _is_regular(fs, match, info)
            ):
                continue  # hidden files and folders (.git, temp files), folders, devices
            # In a folder, even an explicit table format only takes files with that format's extension.
            kind = kind_of(name, "auto" if is_dir and fmt in TABLE_FORMATS else fmt)
            if is_dir and fmt in TABLE_FORMATS and kind != fmt:
                continue
            if kind is None and explicit:
                raise SourceError(f"input {spec}: cannot tell the format from the extension; set input.format")
            if kind is not None:
                items.append((fs, match, root, kind, info))
        groups = {group_of(item[3]) for item in items}
        if not explicit and fmt == "auto" and len(groups) > 1:
            keep = prefer if prefer in groups else "table" if "table" in groups else None
            if keep is None:
                raise SourceError(f"input {spec}: holds both images and videos; set input.format")
            items = [item for item in items if group_of(item[3]) == keep]
        if not items:
            raise SourceError(f"input {spec}: no {'' if fmt == 'auto' else fmt + ' '}files found")
        found.extend(items)
    roots = [item[2] for item in found]
    common = posixpath.commonpath(roots) if len({_protocol(item[0]) for item in found}) == 1 else ""
    files = []
    for fs, path, _, kind, info in found:
        rel = posixpath.relpath(path, common) if common else path.lstrip("/")
        files.append(InputFile(uri=to_uri(fs, path), rel=rel, kind=kind, size=info.get("size"), stamp=_stamp(info)))
    return list(dict.fromkeys(files))  # a file named twice (overlapping globs) is read once


# -------------------------------------------------------------------------------------- reading tables


def read_records(file: InputFile) -> Iterator[Record]:
    """The records of a table file in order; raises `SourceError` when the file as a whole cannot be read."""
    fs, path = filesystem_for(file.uri)
    try:
        with fs.open(path, "rb") as f:
            yield from _READERS[file.kind](f)
    except (OSError, ValueError, pa.ArrowException, csv.Error) as e:
        raise SourceError(f"input {file.uri}: cannot read as {file.kind} ({e})") from e


def _read_jsonl(f: io.BufferedIOBase) -> Iterator[Record]:
    position = 0
    for line_no, line in enumerate(_lines(f), start=1):
        if line is None:
            yield Record(None, f"line {line_no}: longer than {MAX_LINE_BYTES:,} bytes", position=position,
                         text=f"over-long line {line_no}")
            position += 1
            continue
        if line_no == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield Record(None, f"line {line_no}: invalid JSON ({e})", position=position, text=_excerpt(line))
        else:
            if isinstance(value, dict):
                yield Record(value, position=position)
            else:
                yield Record(None, f"line {line_no}: not a JSON object", position=position, text=_excerpt(line))
        position += 1


def _lines(f: io.BufferedIOBase) -> Iterator[bytes | None]:
    """The lines of a binary file (any file object with `read`); None for a line longer than
    MAX_LINE_BYTES, whose bytes are dropped as they are read."""
    carry = b""
    too_long = False  # inside a line already found over-long
    while chunk := f.read(_READ_CHUNK):
        *complete, carry = (carry + chunk).split(b"\n")
        for line in complete:
            yield None if too_long or len(line) > MAX_LINE_BYTES else line + b"\n"
            too_long = False
        if len(carry) > MAX_LINE_BYTES:
            too_long, carry = True, b""
    if too_long or len(carry) > MAX_LINE_BYTES:
        yield None
    elif carry:
        yield carry


def _excerpt(data: bytes) -> str:
    return data[:1024].decode("utf-8", "replace")


def _read_csv(f: io.BufferedIOBase) -> Iterator[Record]:
    # Every value stays a string (no type guessing: an id "007" must not become 7). Cells beyond the
    # header go to one named list instead of DictReader's default `None` key.
    reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""), restkey="_extra_cells")
    position = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a field over csv's size limit: this row only
            yield Record(None, f"line {reader.line_num}: {e}", position=position)
        else:
            yield Record(row, position=position)
        position += 1


def _read_parquet(f: io.BufferedIOBase) -> Iterator[Record]:
    position = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield Record(row, position=position)
            position += 1


def _read_json(f: io.BufferedIOBase) -> Iterator[Record]:
    """A JSON array of records, or a JSON object of records keyed by id (the key becomes the row id)."""
    data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"a JSON file is read whole and this one is over {MAX_JSON_BYTES // 2**30} GiB; use JSONL")
    value = json.loads(data.removeprefix(b"\xef\xbb\xbf"))
    if isinstance(value, list):
        for position, item in enumerate(value):
            yield Record(item, position=position) if isinstance(item, dict) else Record(
                None, f"item {position}: not a JSON object", position=position, text=json.dumps(item)[:1024]
            )
    elif isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
        for position, (key, item) in enumerate(value.items()):
            yield Record(item, key=key, position=position)
    else:
        raise ValueError("expected an array of records, or an object whose values are all records (keyed by id)")


_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet, "json": _read_json}


# ------------------------------------------------------------------------------------------- counting


def count_records(file: InputFile) -> RowCount:
    """How many records `read_records(file)` yields, without parsing them where that is cheaper."""
    if file.kind in ("image", "video"):
        return RowCount(1)
    fs, path = filesystem_for(file.uri)
    try:
        if file.kind == "parquet":
            with fs.open(path, "rb") as f:
                return RowCount(pq.ParquetFile(f).metadata.num_rows)
        if file.kind == "json":
            return RowCount(sum(1 for _ in read_records(file)))
        if not is_local(file.uri) and (file.size or 0) > _SMALL_REMOTE:
            return _estimate_from_head(fs, path, file)
        with fs.open(path, "rb") as f:
            lines, quoted = _count_lines(f)
        if file.kind == "jsonl":
            return RowCount(lines)
        if not quoted:  # no quotes: one record per non-blank line after the header
            return RowCount(max(lines - 1, 0))
        if (file.size or 0) <= 64 * 2**20:  # quoted cells may hold line breaks: parse a modest file
            return RowCount(sum(1 for _ in read_records(file)))
        return RowCount(max(lines - 1, 0), exact=False)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise SourceError(f"input {file.uri}: cannot read as {file.kind} ({e})") from e


def _count_lines(f: io.BufferedIOBase) -> tuple[int, bool]:
    """Non-blank lines of a file, and whether it holds a `"` (a CSV may then quote line breaks)."""
    lines = 0
    quoted = False
    carry = b""  # the line the last chunk ended in
    while chunk := f.read(_COUNT_CHUNK):
        quoted = quoted or b'"' in chunk
        piece = carry + chunk
        cut = piece.rfind(b"\n") + 1
        complete, carry = piece[:cut], piece[cut:]
        if len(carry) > MAX_LINE_BYTES:
            carry = b"x"  # an over-long line is one (error) record; its bytes need not be kept
        # A line break in front lets the pattern see a blank first line too.
        lines += complete.count(b"\n") - len(_BLANK_LINE.findall(b"\n" + complete))
    if carry.strip():  # a last line without a line break
        lines += 1
    return lines, quoted


def _estimate_from_head(fs: Any, path: str, file: InputFile) -> RowCount:
    """Rows of a large remote JSONL/CSV estimated from the first MiB (reading it all would double the IO)."""
    with fs.open(path, "rb") as f:
        head = f.read(2**20)
    lines = head.count(b"\n") - (1 if file.kind == "csv" else 0)
    per_line = len(head) / max(head.count(b"\n"), 1)
    return RowCount(max(int((file.size or len(head)) / per_line) - (1 if file.kind == "csv" else 0), lines, 0),
                    exact=False)
