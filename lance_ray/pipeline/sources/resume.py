"""What a step already did: whether every row of its input is committed (without reading the input),
and the tally its read task leaves for the summary.

A step is complete when its output's manifest records the fingerprint of the input as it is now
(`StepSource.fingerprint`: the input files' names, sizes and modification stamps, inline rows or the
upstream's committed parts, and the settings ids depend on) and — unless failed rows count as done —
no failed rows. The runner writes a manifest only after a step's whole input went through the
pipeline, so such a manifest means every id of that input is committed. This is what lets a re-run
with nothing to do finish without starting Ray or reading a row.
"""

from __future__ import annotations

import json

from lance_ray.io import storage
from lance_ray.io.tables import SourceError
from lance_ray.pipeline import sinks
from lance_ray.pipeline.sources.step import StepSource, open_source
from lance_ray.spec import Job

FINGERPRINT_KEY = "input_fingerprint"  # where the runner records a step's input fingerprint in its manifest


def complete_manifest(source: StepSource, output_uri: str, *, retry_failed: bool,
                      fingerprint: str | None = None) -> dict | None:
    """The step's manifest when every row of its current input is committed (see the module doc), else None."""
    manifest = sinks.read_manifest(output_uri)
    if not manifest or manifest.get(FINGERPRINT_KEY) is None:
        return None
    if retry_failed and manifest.get("rows_failed"):
        return None
    current = fingerprint or source.fingerprint()
    return manifest if manifest[FINGERPRINT_KEY] == current else None


def completed_steps(job: Job, *, retry_failed: bool) -> dict[str, dict] | None:
    """Every step's manifest when the whole job has nothing left to do, else None (checked in file order,
    stopping at the first step with work)."""
    manifests = {}
    for step in job.steps:
        try:
            manifest = complete_manifest(open_source(step, job), step.output_path(job), retry_failed=retry_failed)
        except (OSError, ValueError, SourceError):  # an input that cannot be read now: let the run say why
            return None
        if manifest is None:
            return None
        manifests[step.name] = manifest
    return manifests


def _tally_uri(events_uri: str, step: str) -> str:
    return storage.join_uri(events_uri, f"source-{storage.safe_token(step)}.json")


def write_tally(events_uri: str, step: str, *, rows: int, skipped: int) -> None:
    data = json.dumps({"step": step, "rows": rows, "skipped": skipped}).encode()
    storage.write_bytes_atomic(_tally_uri(events_uri, step), data)


def read_tally(events_uri: str, step: str) -> tuple[int, int] | None:
    """(rows read, rows skipped as already committed) of the step's read task in this run, if it finished."""
    fs, path = storage.filesystem_for(_tally_uri(events_uri, step))
    fs.invalidate_cache()
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        tally = json.load(f)
    return int(tally["rows"]), int(tally["skipped"])
