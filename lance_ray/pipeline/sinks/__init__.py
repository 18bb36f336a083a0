"""Where a step's rows go: one sink per output format, all behind one interface (`base.Sink`).

    base.py           the interface (writer role: write_part; driver role: prepare, committed_ids,
                      commit, reset, read), OutputRow / EncodedMedia, the manifest
    parts.py          what Parquet and WebDataset share: atomic parts named by their row ids, each
                      row in exactly one part after any resume or retry
    parquet.py        `format: parquet` (default): part-*.parquet + __media__/, a folder every reader opens
    webdataset.py     `format: webdataset`: shard-*.tar with <key>.json/.txt/.png|.mp4
    lance_dataset.py  `format: lance`: a versioned Lance dataset (media as blobs), or `merge_into: true`:
                      a text step's columns added to an existing Lance dataset by row id
    lock.py           one run at a time per output

Adding a format: a module with a `Sink` subclass, one line in `SINKS`, its name in `OutputSpec.format`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from lance_ray.pipeline.sinks.base import (
    BOOKKEEPING_DIR,
    MANIFEST_NAME,
    EncodedMedia,
    OutputRow,
    Sink,
    output_table,
    read_manifest,
)
from lance_ray.pipeline.sinks.lance_dataset import LanceMergeSink, LanceSink
from lance_ray.pipeline.sinks.lock import OutputLocked, locked_outputs
from lance_ray.pipeline.sinks.parquet import MEDIA_DIR, ParquetSink
from lance_ray.pipeline.sinks.parts import part_name
from lance_ray.pipeline.sinks.webdataset import WebDatasetSink

SINKS: dict[str, type[Sink]] = {
    "parquet": ParquetSink,
    "webdataset": WebDatasetSink,
    "lance": LanceSink,
}


def open_sink(uri: str, step: str, format: str = "parquet", merge_into: bool = False) -> Sink:
    """The sink of a step's output (`OutputSpec.format`, `OutputSpec.merge_into`)."""
    if merge_into:
        return LanceMergeSink(uri, step)
    return SINKS[format](uri, step)


def write_part(output_uri: str, rows: list[dict]) -> None:
    """Commit output rows given as dicts (no media) as one part of a Parquet step output."""
    ParquetSink(output_uri, "").write_part([OutputRow(row) for row in rows])


def committed_row_ids(output_uri: str, include_errors: bool = True) -> set[str]:
    """Row ids committed to a Parquet step output (see `Sink.committed_ids`)."""
    return ParquetSink(output_uri, "").committed_ids(include_errors)


def committed_parts(output_uri: str) -> list[str]:
    """The file names of a Parquet step output's committed parts, oldest first."""
    return ParquetSink(output_uri, "").part_names()


def iter_step_output(output_uri: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A Parquet step output's committed parts, newest first, one at a time (media URIs resolved): keep
    each row id's first version to see `read_step_output`'s rows (streaming `from_step` reads this way)."""
    return ParquetSink(output_uri, "").iter_parts_newest_first(columns)


def read_step_output(output_uri: str) -> pa.Table:
    """A Parquet step output's committed rows in `OUTPUT_SCHEMA`, one per row id, media URIs resolved
    (lance-ray's own reader, used by `from_step`)."""
    return ParquetSink(output_uri, "").read()


__all__ = [
    "BOOKKEEPING_DIR", "MANIFEST_NAME", "MEDIA_DIR", "SINKS", "EncodedMedia", "LanceMergeSink", "LanceSink",
    "OutputLocked", "OutputRow", "ParquetSink", "Sink", "WebDatasetSink", "committed_parts", "committed_row_ids",
    "iter_step_output", "locked_outputs", "open_sink",
    "output_table", "part_name", "read_manifest", "read_step_output", "write_part",
]
