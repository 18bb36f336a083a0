"""A step's rows as a Ray Dataset that streams: one read task reads the input in order and yields
Arrow blocks as it goes, leaving out rows already committed.

Why one task per step: derived ids number identical rows in input order, `limit` takes the first
rows, and a repeated id must be caught wherever it is; a single reader keeps all three exact
(`StepSource.iter_rows`) with a few bytes per row of state. It runs in a CPU task (templates are
rendered there, not in the driver) and does ~20-50 µs of work a row, far more rows/s than any
pipeline stage after it; Ray Data's streaming backpressure pauses it when the stages behind fall back.

The driver never holds the rows, nor the committed ids: the read task asks the sink for them
itself (`Sink.committed_ids`) when it starts, so a retried read task also skips what was
committed before it died. When it finishes it writes a tally (`resume.write_tally`: rows read,
rows skipped) that the runner reads for the summary.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from lance_ray.pipeline.sinks import Sink
from lance_ray.pipeline.sources import resume
from lance_ray.pipeline.sources.step import StepSource
from lance_ray.spec.rows import SOURCE_SCHEMA, source_table

if TYPE_CHECKING:
    import ray.data

READ_BLOCK_ROWS = 256  # rows per yielded block (Ray Data coalesces them up to its block size)
READ_TASK_CPUS = 0.25  # the reader is light; a distinct request also keeps Ray Data from fusing it


def read_step_rows(source: StepSource, sink: Sink, *, retry_failed: bool,
                   events_uri: str | None) -> Iterator[pa.Table]:
    """The source's rows not yet committed to its output, as `SOURCE_SCHEMA` blocks (the read task's body).

    Failed rows count as committed unless `retry_failed`. A row is also committed when its id under
    lance-ray 0.1 (positional) is, so outputs written before content ids are not redone.
    """
    committed = sink.committed_ids(include_errors=not retry_failed)
    read = skipped = 0
    pending: list[dict] = []
    for row in source.iter_rows():
        read += 1
        if row["row_id"] in committed or (row.get("legacy_id") is not None and row["legacy_id"] in committed):
            skipped += 1
            continue
        pending.append(row)
        if len(pending) == READ_BLOCK_ROWS:
            yield source_table(pending)
            pending = []
    if pending:
        yield source_table(pending)
    if events_uri is not None:
        resume.write_tally(events_uri, source.step.name, rows=read, skipped=skipped)


def to_dataset(source: StepSource, sink: Sink, *, retry_failed: bool = False,
               events_uri: str | None = None) -> ray.data.Dataset:
    """The rows still to do as a lazy Ray Dataset in `SOURCE_SCHEMA` (one streaming read task)."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class StepRows(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_name(self) -> str:
            return f"ReadStep[{source.step.name}]"

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: object = None) -> list[ReadTask]:
            def read() -> Iterator[pa.Table]:
                return read_step_rows(source, sink, retry_failed=retry_failed, events_uri=events_uri)

            metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(read, metadata, schema=SOURCE_SCHEMA)]

    return ray.data.read_datasource(StepRows(), override_num_blocks=1, num_cpus=READ_TASK_CPUS)


def committed_count(sink: Sink, *, retry_failed: bool) -> int:
    """How many rows a step's output already holds (failed ones too unless `retry_failed`), counted in a
    Ray task so that the ids never reach the driver."""
    import ray

    count = ray.remote(num_cpus=READ_TASK_CPUS)(_committed_count)
    return ray.get(count.remote(sink, not retry_failed))


def _committed_count(sink: Sink, include_errors: bool) -> int:
    return len(sink.committed_ids(include_errors=include_errors))
