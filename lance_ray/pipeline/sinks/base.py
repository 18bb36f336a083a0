"""The one interface every output format implements, and what all formats share.

A sink has two roles (as a writer in img2dataset has):
* the **writer** role, in the CPU tasks that finish rows: `write_part(rows)` commits one batch of
  output rows, whole or not at all;
* the **driver** role, around a step: `prepare()` before it (clean up after killed writers, restore
  exactly-once), `committed_ids()` to skip what is done, `commit(summary)` after it (replace
  superseded rows, write the manifest), `reset()` for `--overwrite`, `read()` for lance-ray's own
  readers.

Every sink keeps its bookkeeping in one folder of the output, `__lance_ray__/` (the manifest, the
run lock): its name starts with `__`, which every Parquet reader (pyarrow, pandas, Spark, DuckDB's
`*.parquet` glob, Hugging Face `datasets`) skips. lance-ray knows the files it wrote by name (and,
for media, by the rows that name them) and never deletes anything else.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar

import pyarrow as pa

from lance_ray import __version__
from lance_ray.io import storage
from lance_ray.spec.rows import OUTPUT_SCHEMA

BOOKKEEPING_DIR = "__lance_ray__"
MANIFEST_NAME = "manifest.json"
LEGACY_MANIFEST_NAME = "_manifest.json"  # where outputs written before `__lance_ray__/` keep theirs


@dataclass
class EncodedMedia:
    """A result encoded for storage: PNG / MP4 / MKV bytes and their extension (no dot)."""

    data: bytes
    ext: str

    def __post_init__(self) -> None:
        ext = self.ext.lstrip(".").lower()
        if not (ext.isascii() and ext.isalnum() and 0 < len(ext) <= 8):
            raise ValueError(f"bad media extension {self.ext!r}")
        self.ext = ext


@dataclass
class OutputRow:
    """One output row on its way into a sink.

    `values` holds the `OUTPUT_SCHEMA` columns; the sink fills `media_uri` / `turn_media_uris` from
    where it puts `media` (the row's result) and `turns` (a multi-turn edit's earlier results, in
    order; None for a step without turns).
    """

    values: dict[str, Any]
    media: EncodedMedia | None = None
    turns: list[EncodedMedia] | None = None

    @property
    def row_id(self) -> str:
        return self.values["row_id"]


class Sink(ABC):
    """One step's output in one format. Built from plain values, so it pickles to the workers."""

    format: ClassVar[str]

    def __init__(self, uri: str, step: str):
        self.uri = uri
        self.step = step

    # -- writer role --------------------------------------------------------------------------------------

    @abstractmethod
    def write_part(self, rows: list[OutputRow]) -> None:
        """Commit a batch of rows atomically: after a crash either all of them are committed or none.
        Writing the same batch again (a retried task) replaces it; it never adds a second copy."""

    # -- driver role --------------------------------------------------------------------------------------

    @abstractmethod
    def prepare(self) -> None:
        """Before a step runs (its lock held): remove what killed writers left half-done and make sure
        every committed row is held once."""

    @abstractmethod
    def committed_ids(self, include_errors: bool = True) -> set[str]:
        """Row ids already committed. `include_errors=False` leaves out rows whose committed version is an
        error, so a run with --retry-failed runs them again."""

    def is_empty(self) -> bool:
        """Whether nothing is committed yet (a fresh output: no committed ids to fetch)."""
        return not self.committed_ids()

    @abstractmethod
    def read(self) -> pa.Table:
        """The committed rows in `OUTPUT_SCHEMA`, one per row id, media URIs resolved."""

    @abstractmethod
    def reset(self) -> None:
        """`--overwrite`: remove what this sink wrote for the step; anything else in the folder stays."""

    def commit(self, summary: dict[str, Any]) -> dict[str, Any]:
        """After a step (also one with nothing left to do): settle the output so that every reader sees
        each row once, then write the manifest. Returns the manifest."""
        manifest = {
            **summary,
            **self._settle(),
            "format": self.format,
            "lance_ray_version": __version__,
            "written_at": datetime.now(timezone.utc).isoformat(),
        }
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        storage.write_bytes_atomic(self.manifest_uri, data)
        return manifest

    @abstractmethod
    def _settle(self) -> dict[str, Any]:
        """Replace superseded rows; return the row counts (`rows_ok`, `rows_failed`, ...) for the manifest."""

    # -- shared -------------------------------------------------------------------------------------------

    @property
    def bookkeeping_uri(self) -> str:
        return storage.join_uri(self.uri, BOOKKEEPING_DIR)

    @property
    def manifest_uri(self) -> str:
        return storage.join_uri(self.bookkeeping_uri, MANIFEST_NAME)

    def read_manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.uri)

    def _remove_manifest(self) -> None:
        storage.remove(self.manifest_uri)


def read_manifest(output_uri: str) -> dict[str, Any] | None:
    """A step output's manifest (`__lance_ray__/manifest.json`, or an older output's `_manifest.json`)."""
    for uri in (storage.join_uri(output_uri, BOOKKEEPING_DIR, MANIFEST_NAME),
                storage.join_uri(output_uri, LEGACY_MANIFEST_NAME)):
        try:
            return json.loads(storage.read_bytes(uri))
        except FileNotFoundError:
            continue
    return None


def error_counts(errors: list[str | None]) -> dict[str, int]:
    failed = sum(1 for e in errors if e is not None)
    return {"rows_ok": len(errors) - failed, "rows_failed": failed}


def output_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Output rows (dicts of `OUTPUT_SCHEMA` columns) as a table; missing columns are null, unknown keys
    an error (a typo must not vanish silently)."""
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


def conform(table: pa.Table) -> pa.Table:
    """A table read back from an output, in `OUTPUT_SCHEMA`: a column that an older output lacks (written
    before the column existed) reads as nulls, so resuming survives upgrades."""
    arrays = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in OUTPUT_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def _utc(value: datetime | str | float | None) -> datetime | None:
    """`started_at` may arrive as a datetime, an ISO string or epoch seconds."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        return _utc(datetime.fromisoformat(value))
    return datetime.fromtimestamp(float(value), tz=timezone.utc)
