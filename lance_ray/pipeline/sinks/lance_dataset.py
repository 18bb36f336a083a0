"""Lance sinks (`pip install pylance`): a step's rows as a versioned Lance dataset, or its text as new
columns of an existing one.

`output: {format: lance, path: ds.lance}` — `LanceSink`: the rows in `OUTPUT_SCHEMA` plus `media`
(the encoded PNG/MP4 bytes, a Lance blob column) and `turn_media` (a multi-turn edit's earlier turns);
`media_uri` is null. Each batch is committed with `merge_insert` keyed by `row_id` (an upsert): one
atomic Lance commit that can only insert a new row or replace that row's earlier version, so a
retried batch or a `--retry-failed` run never holds a row twice. Every commit is a new version.
The dataset carries `lance_ray` in its schema metadata; lance-ray writes into no other dataset.

`output: {format: lance, path: ds.lance, merge_into: true}` — `LanceMergeSink`, for steps that write
text (x2t): adds the columns `<step>_text`, `<step>_prompt`, `<step>_error`, `<step>_params`,
`<step>_model_id`, `<step>_started_at` to an existing dataset with a `row_id` column, by row id; no
other column is rewritten (Lance writes the new columns as their own files). The step's rows are
committed first as Parquet parts under `__lance_ray__/steps/<step>/` in the dataset folder (the
record resume reads), and merged into the dataset as one new version when the step ends (also by a
re-run with nothing left to do, so a run killed before that merge loses nothing).
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from lance_ray.errors import RunError
from lance_ray.io import storage
from lance_ray.pipeline.sinks.base import (
    BOOKKEEPING_DIR,
    OutputRow,
    Sink,
    conform,
    error_counts,
    output_table,
)
from lance_ray.pipeline.sinks.parquet import ParquetSink
from lance_ray.spec.rows import OUTPUT_SCHEMA

OWNER_KEY = b"lance_ray"  # schema metadata of datasets lance-ray created
LANCE_SCHEMA = pa.schema(
    [
        *OUTPUT_SCHEMA,
        pa.field("media", pa.large_binary(), metadata={"lance-encoding:blob": "true"}),
        pa.field("turn_media", pa.list_(pa.large_binary())),
    ],
    metadata={OWNER_KEY: b"output"},
)
MERGE_COLUMNS = ("text", "prompt", "error", "params", "model_id", "started_at")


def _lance():
    try:
        import lance
    except ImportError as exc:
        raise RunError("output.format: lance needs the pylance package: pip install pylance") from exc
    return lance


def storage_options(uri: str) -> dict[str, str] | None:
    """Lance reaches object stores itself; hand it the S3 endpoint that `storage.filesystem_for` uses."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not uri.startswith(("s3://", "s3a://")) or not endpoint:
        return None
    return {"aws_endpoint": endpoint, "allow_http": str(endpoint.startswith("http://")).lower()}


def open_dataset(uri: str):
    """The latest version of the Lance dataset at `uri`, or None when there is none."""
    lance = _lance()
    try:
        return lance.dataset(uri, storage_options=storage_options(uri))
    except (FileNotFoundError, ValueError):
        return None
    except OSError as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            return None
        raise


class LanceSink(Sink):
    format = "lance"

    def write_part(self, rows: list[OutputRow]) -> None:
        if not rows:
            raise ValueError("write_part needs at least one row")
        table = output_table([row.values for row in rows])
        table = table.append_column(LANCE_SCHEMA.field("media"), pa.array(
            [None if row.media is None else row.media.data for row in rows], pa.large_binary()))
        table = table.append_column(LANCE_SCHEMA.field("turn_media"), pa.array(
            [None if row.turns is None or row.media is None else [t.data for t in row.turns] + [row.media.data]
             for row in rows],
            LANCE_SCHEMA.field("turn_media").type))
        dataset = open_dataset(self.uri)
        if dataset is None:
            raise RunError(f"{self.uri}: the Lance dataset is gone (it is created when the step starts)")
        storage.retrying(
            lambda: dataset.merge_insert("row_id").when_matched_update_all().when_not_matched_insert_all()
            .execute(table.cast(LANCE_SCHEMA)),
            f"committing {len(rows)} rows to {self.uri}",
        )

    def prepare(self) -> None:
        dataset = open_dataset(self.uri)
        if dataset is None:
            if any(e["name"].rstrip("/").rsplit("/", 1)[-1] != BOOKKEEPING_DIR for e in storage.list_entries(self.uri)):
                raise RunError(f"{self.uri} holds files but no Lance dataset; lance-ray creates a Lance dataset only "
                               "in a new or empty folder")
            _lance().write_dataset(LANCE_SCHEMA.empty_table(), self.uri, schema=LANCE_SCHEMA, mode="create",
                                   storage_options=storage_options(self.uri))
        elif not _owned(dataset):
            raise RunError(f"{self.uri} is a Lance dataset that lance-ray did not create; it writes only into its "
                           "own (to add a step's text as columns to this one, set output.merge_into: true)")

    def committed_ids(self, include_errors: bool = True) -> set[str]:
        table = self._table(["row_id", "error"])
        if table.num_rows == 0:
            return set()
        return {r for r, e in zip(table.column("row_id").to_pylist(), table.column("error").to_pylist(),
                                  strict=True) if include_errors or e is None}

    def read(self) -> pa.Table:
        return conform(self._table(OUTPUT_SCHEMA.names))

    def reset(self) -> None:
        dataset = open_dataset(self.uri)
        if dataset is not None and _owned(dataset):  # a new, empty version: earlier versions stay readable
            _lance().write_dataset(LANCE_SCHEMA.empty_table(), self.uri, schema=LANCE_SCHEMA, mode="overwrite",
                                   storage_options=storage_options(self.uri))
        self._remove_manifest()

    def _settle(self) -> dict[str, Any]:
        """Nothing to settle (an upsert never holds a row twice): the counts, and the version they are of."""
        dataset = open_dataset(self.uri)
        errors = dataset.to_table(columns=["error"]).column("error").to_pylist() if dataset else []
        return {**error_counts(errors), "version": dataset.version if dataset else None}

    def _table(self, columns: list[str]) -> pa.Table:
        dataset = open_dataset(self.uri)
        if dataset is None:
            return OUTPUT_SCHEMA.empty_table().select(columns)
        return dataset.to_table(columns=columns)


class LanceMergeSink(Sink):
    """Adds a text step's columns to an existing Lance dataset, keyed by `row_id`."""

    format = "lance"

    def __init__(self, uri: str, step: str):
        super().__init__(uri, step)
        self.staging = ParquetSink(storage.join_uri(uri, BOOKKEEPING_DIR, "steps", step), step)

    @property
    def columns(self) -> dict[str, str]:
        """Output column -> the dataset column it becomes."""
        return {name: f"{self.step}_{name}" for name in MERGE_COLUMNS}

    @property
    def manifest_uri(self) -> str:
        return self.staging.manifest_uri

    def read_manifest(self) -> dict[str, Any] | None:
        return self.staging.read_manifest()

    def write_part(self, rows: list[OutputRow]) -> None:
        self.staging.write_part(rows)

    def prepare(self) -> None:
        dataset = open_dataset(self.uri)
        if dataset is None:
            raise RunError(f"merge_into: there is no Lance dataset at {self.uri} to add columns to")
        if "row_id" not in dataset.schema.names:
            raise RunError(f"merge_into: the Lance dataset at {self.uri} has no row_id column to match rows by")
        self.staging.prepare()
        present = [c for c in self.columns.values() if c in dataset.schema.names]
        if present and not self.staging.committed_ids():
            raise RunError(f"merge_into: {self.uri} already has column(s) {', '.join(present)} that lance-ray did "
                           f"not add; rename step '{self.step}' so that its columns do not clash")

    def committed_ids(self, include_errors: bool = True) -> set[str]:
        return self.staging.committed_ids(include_errors)

    def read(self) -> pa.Table:
        return self.staging.read()

    def reset(self) -> None:
        ours = bool(self.staging.committed_ids()) or self.staging.read_manifest() is not None
        self.staging.reset()
        if ours:  # columns of the same names that lance-ray did not add stay
            self._drop_own_columns()

    def _settle(self) -> dict[str, Any]:
        """Settle the staged parts, then merge them into the dataset as one new version."""
        counts = self.staging._settle()
        rows = self.staging.read()
        dataset = self._drop_own_columns()
        if rows.num_rows == 0 or dataset is None:
            return {**counts, "version": dataset.version if dataset else None, "rows_merged": 0}
        columns = pa.table({"row_id": rows.column("row_id"),
                            **{target: rows.column(name) for name, target in self.columns.items()}})
        targets = set(dataset.to_table(columns=["row_id"]).column("row_id").to_pylist())
        storage.retrying(lambda: dataset.merge(columns, left_on="row_id", right_on="row_id"),
                         f"adding columns to {self.uri}")
        merged = sum(1 for row_id in rows.column("row_id").to_pylist() if row_id in targets)
        return {**counts, "version": open_dataset(self.uri).version, "rows_merged": merged,
                "rows_not_in_dataset": rows.num_rows - merged, "columns": sorted(self.columns.values())}

    def _drop_own_columns(self):
        """Remove this step's columns (a metadata-only new version) before they are merged again."""
        dataset = open_dataset(self.uri)
        if dataset is None:
            return None
        present = [c for c in self.columns.values() if c in dataset.schema.names]
        if present:
            dataset.drop_columns(present)
            dataset = open_dataset(self.uri)
        return dataset


def _owned(dataset) -> bool:
    return OWNER_KEY in (dataset.schema.metadata or {})
