"""A step's input → canonical source rows with stable ids, streamed into the pipeline.

    step.py      StepSource: raw items (inline rows, table records, media files, upstream rows) → rows
                 with ids, samples, errors; cheap row counts; the input's fingerprint
    ids.py       content-derived ids and the compact digest set that keeps ids unique at any scale
    dataset.py   the rows as a Ray Dataset: one streaming read task that skips committed rows
    resume.py    whether a step has anything left to do, and the read task's tally

Reading files and mapping records are shared with validation: `lance_ray.io.tables` (formats,
listing, counting) and `lance_ray.spec.inputs` (columns, prompts, row errors).
"""

from lance_ray.io.tables import InputFile, RowCount, SourceError, expand_paths
from lance_ray.pipeline.sources.dataset import committed_count, read_step_rows, to_dataset
from lance_ray.pipeline.sources.resume import (
    FINGERPRINT_KEY,
    complete_manifest,
    completed_steps,
    read_tally,
)
from lance_ray.pipeline.sources.step import StepSource, media_row_id, open_source

__all__ = [
    "FINGERPRINT_KEY", "InputFile", "RowCount", "SourceError", "StepSource", "committed_count", "complete_manifest",
    "completed_steps", "expand_paths", "media_row_id", "open_source", "read_step_rows", "read_tally", "to_dataset",
]
