"""The committing Parquet sink: one dataset per step, written as atomic parts, then a manifest.

Layout of a step's output (a local directory or an `s3://` prefix):

    part-<hash>.parquet     one per written batch; <hash> is derived from the batch's row ids, so a
                            retried batch replaces its earlier copy instead of adding a duplicate
    media/<row_id>.<ext>    generated images / videos, named only from the sanitised row id
    _manifest.json          written last: counts, part list, model, timings, lance-ray version

Every file is written whole-or-nothing (`storage.write_bytes_atomic`), so a crash never leaves a
half-written part visible; readers only look at `part-*.parquet`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lance_ray import __version__
from lance_ray.io.storage import filesystem_for, join_uri, safe_token, write_bytes_atomic
from lance_ray.spec.rows import OUTPUT_SCHEMA

MANIFEST_NAME = "_manifest.json"
MEDIA_DIR = "media"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"

def _utc(value: datetime | str | float | None) -> datetime | None:
    """`started_at` may arrive as a datetime, an ISO string or epoch seconds."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        return _utc(datetime.fromisoformat(value))
    return datetime.fromtimestamp(float(value), tz=timezone.utc)


def part_name(row_ids: Iterable[str]) -> str:
    """A part's file name, a function of the set of row ids it holds (order does not matter)."""
    digest = hashlib.sha256("\n".join(sorted(row_ids)).encode("utf-8", "surrogatepass")).hexdigest()
    return f"{PART_PREFIX}{digest[:20]}{PART_SUFFIX}"


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Output rows (dicts) as a table in `OUTPUT_SCHEMA`; missing columns are null, unknown keys an error."""
    names = set(OUTPUT_SCHEMA.names)
    for row in rows:
        unknown = set(row) - names
        if unknown:
            raise ValueError(f"row {row.get('row_id')!r}: unknown output columns {sorted(unknown)}")
    columns = {name: [row.get(name) for row in rows] for name in OUTPUT_SCHEMA.names}
    columns["started_at"] = [_utc(v) for v in columns["started_at"]]
    for name in ("params", "input_row"):
        columns[name] = [v if v is None or isinstance(v, str) else json.dumps(v) for v in columns[name]]
    return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)


def write_part(output_uri: str, rows: list[dict]) -> str:
    """Write one batch of output rows as an atomic Parquet part; returns the part's URI."""
    if not rows:
        raise ValueError("write_part needs at least one row")
    table = rows_to_table(rows)
    ids = table.column("row_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError("write_part: duplicate row ids in one batch")
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    uri = join_uri(output_uri, part_name(ids))
    write_bytes_atomic(uri, buf.getvalue())
    return uri


def media_uri(output_uri: str, row_id: str, ext: str) -> str:
    """Where a row's media file goes. The name comes only from the sanitised row id, so no id can
    point outside `<output>/media/` (no `/`, no `..`, no leading dot, no NUL survive `safe_token`)."""
    extension = ext.lstrip(".").lower()
    if not (extension.isascii() and extension.isalnum() and 0 < len(extension) <= 8):
        raise ValueError(f"bad media extension {ext!r}")
    return join_uri(output_uri, MEDIA_DIR, f"{safe_token(row_id)}.{extension}")


def write_media(output_uri: str, row_id: str, data: bytes, ext: str) -> str:
    """Write a row's encoded media atomically; returns its URI."""
    uri = media_uri(output_uri, row_id, ext)
    write_bytes_atomic(uri, data)
    return uri


def _list_parts(output_uri: str) -> list[str]:
    """Part paths on the output's filesystem, oldest first (so "last wins" means "newest wins")."""
    fs, root = filesystem_for(output_uri)
    fs.invalidate_cache(root)  # parts are written by other processes; never trust a cached listing
    if not fs.exists(root):
        return []
    entries = [
        e
        for e in fs.ls(root, detail=True)
        if e["type"] == "file"
        and e["name"].rsplit("/", 1)[-1].startswith(PART_PREFIX)
        and e["name"].endswith(PART_SUFFIX)
    ]

    def modified(entry: dict) -> float:
        stamp = entry.get("LastModified", entry.get("mtime", 0.0))
        return stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)

    entries.sort(key=lambda e: (modified(e), e["name"]))
    return [e["name"] for e in entries]


def _read_parts(output_uri: str, columns: list[str] | None = None) -> pa.Table:
    """All parts, oldest first, in `OUTPUT_SCHEMA` (or its `columns`). A column that an older part
    lacks (written before the column existed) reads as nulls, so resuming survives upgrades."""
    schema = OUTPUT_SCHEMA if columns is None else pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
    tables = [read_part(output_uri, path, columns) for path in _list_parts(output_uri)]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def committed_parts(output_uri: str) -> list[str]:
    """A step's committed parts (paths on the output's filesystem), oldest first: a reader that streams
    them newest first and keeps each row_id's first version sees what `read_step_output` returns."""
    return _list_parts(output_uri)


def read_part(output_uri: str, path: str, columns: list[str] | None = None) -> pa.Table:
    """One committed part in `OUTPUT_SCHEMA` (or its `columns`); columns it lacks read as nulls."""
    fs, _ = filesystem_for(output_uri)
    schema = OUTPUT_SCHEMA if columns is None else pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
    part = pq.ParquetFile(path, filesystem=fs)
    present = [name for name in schema.names if name in part.schema_arrow.names]
    table = part.read(columns=present)
    arrays = [
        table.column(f.name).cast(f.type) if f.name in present else pa.nulls(table.num_rows, f.type) for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _dedupe_last(table: pa.Table) -> pa.Table:
    """Keep the last occurrence of each row_id."""
    if table.num_rows == 0:
        return table
    last: dict[str, int] = {}
    for i, row_id in enumerate(table.column("row_id").to_pylist()):
        last[row_id] = i
    if len(last) == table.num_rows:
        return table
    return table.take(sorted(last.values()))


def committed_row_ids(output_uri: str, include_errors: bool = True) -> set[str]:
    """Row ids already committed to a step's output (reads only the `row_id` and `error` columns).

    With `include_errors=False`, rows whose latest committed version is an error are left out, so
    a re-run retries them.
    """
    if include_errors:
        return set(_read_parts(output_uri, ["row_id"]).column("row_id").to_pylist())
    table = _dedupe_last(_read_parts(output_uri, ["row_id", "error"]))
    return set(table.filter(pc.is_null(table.column("error"))).column("row_id").to_pylist())


def read_step_output(output_uri: str) -> pa.Table:
    """A step's committed rows in `OUTPUT_SCHEMA`, one per row_id (the newest part wins)."""
    return _dedupe_last(_read_parts(output_uri))


def write_manifest(output_uri: str, summary: dict) -> str:
    """Write `_manifest.json` last, after every part: the caller's summary (step, task, model
    id/revision, timings …) plus the row counts and part list as found on storage."""
    parts = _list_parts(output_uri)
    table = _dedupe_last(_read_parts(output_uri, ["row_id", "error"]))
    failed = table.num_rows - pc.sum(pc.is_null(table.column("error"))).as_py() if table.num_rows else 0
    manifest = {
        **summary,
        "rows_ok": table.num_rows - failed,
        "rows_failed": failed,
        "parts": sorted(p.rsplit("/", 1)[-1] for p in parts),
        "lance_ray_version": __version__,
        "written_at": datetime.now(timezone.utc).isoformat(),
    }
    uri = join_uri(output_uri, MANIFEST_NAME)
    write_bytes_atomic(uri, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return uri


def read_manifest(output_uri: str) -> dict | None:
    fs, path = filesystem_for(join_uri(output_uri, MANIFEST_NAME))
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.load(f)


def reset(output_uri: str) -> None:
    """Remove what this sink wrote (parts, media, manifest) for `--overwrite`; other files stay."""
    fs, root = filesystem_for(output_uri)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return
    manifest = join_uri(output_uri, MANIFEST_NAME)
    targets = [*_list_parts(output_uri), filesystem_for(manifest)[1]]
    for path in targets:
        if fs.exists(path):
            fs.rm(path)
    media = filesystem_for(join_uri(output_uri, MEDIA_DIR))[1]
    if fs.exists(media):
        fs.rm(media, recursive=True)
    fs.invalidate_cache(root)
