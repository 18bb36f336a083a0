"""`StepSource`: a step's input → source rows (`SOURCE_SCHEMA` dicts) with stable ids, in input order.

What it reads (exactly one per step):
* `rows`: inline rows in the job file;
* `path`: files, directories, globs, fsspec URIs or a list of those, holding tables (JSONL, CSV,
  Parquet, JSON) or media files (images / videos, picked by extension), read by `lance_ray.io.tables`;
* `from_step`: the committed, error-free output rows of an earlier step, part by part (newest part
  first; a row's newest version decides). Their columns (`text`, `prompt`, `media_uri`, …) are the
  row's columns for templates and mapping; the upstream result becomes `image` / `video`.

How a record becomes a row is `lance_ray.spec.inputs.RowMapping` (shared with validation). A row that
cannot be used gets `error` set instead of stopping the job.

Row ids, in order of precedence:
* the row's id column (`columns.row_id`, or a `row_id` column) — made file-name safe;
* the key of a record in a JSON object of records; a suite case's index (else its position);
* a media file: its path relative to the input root, sanitised, plus a short hash of that path;
* a `from_step` row: its upstream id;
* anything else (table and inline rows): a digest of the row's content (`ids.py`).
With `samples_per_prompt` (or a suite) each input row becomes N rows `<id>-<n>`. Ids are unique
within a step; a repeated id column value stops the step with `SourceError`.

Outputs written before ids were content-based (lance-ray 0.1: `<table>-<row index>`, `row-<index>`)
are still recognised on resume: `legacy_id` is that positional id, and a row committed under it is
not done again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lance_ray.io.storage import safe_token, sanitize, short_hash
from lance_ray.io.tables import (
    InputFile,
    Record,
    RowCount,
    SourceError,
    count_records,
    expand_paths,
    read_records,
)
from lance_ray.pipeline import sinks
from lance_ray.pipeline.sources.ids import DigestSet, digest
from lance_ray.spec import Job, Step
from lance_ray.spec.inputs import RowMapping, parse_seed
from lance_ray.spec.rows import OUTPUT_SCHEMA, SOURCE_SCHEMA

_CHUNK = 2048  # rows whose ids are checked together
_UPSTREAM_COLUMNS = [name for name in OUTPUT_SCHEMA.names if name != "input_row"]  # the upstream's own input: not read
ID_SCHEME = 2  # bump when the rule for derived ids changes: it is part of every input fingerprint


@dataclass(frozen=True, slots=True)
class RawRow:
    """One item of a step's input, before mapping."""

    record: dict | None  # None: the item is not a record (`error` says why)
    error: str | None = None
    given_id: str | None = None  # an id the input itself gives: a JSON key, a media path, an upstream id
    legacy_id: str | None = None  # its positional id under lance-ray 0.1
    table_uri: str | None = None  # media paths in the record are relative to this table
    text: str | None = None  # what a bad item holds, for its content id


def media_row_id(rel: str) -> str:
    """Row id of a media file: its sanitised relative path without extension plus a hash of the
    whole relative path (so `a.jpg` and `a.png` in one folder stay distinct)."""
    return f"{sanitize(posixpath.splitext(rel)[0])[:80] or 'media'}-{short_hash(rel)}"


def _canonical_json(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True, default=str)


class StepSource:
    """The rows of one step. Each iteration re-reads the inputs; nothing is held but the settings."""

    def __init__(self, step: Step, job: Job, upstream: Mapping[str, str] | None = None):
        self.step = step
        self.task = step.spec
        self.input = step.input
        self.mapping = RowMapping.for_step(step)
        self.samples = step.input.samples
        # With samples (or a suite) sample n is seeded with seed + n, as the benchmarks' own scripts do.
        self.sample_seeds = bool(step.input.samples_per_prompt or step.input.suite)
        self.base_seed = step.params_for(job).seed
        self.output_uri = step.output_path(job)
        self.upstream_uri: str | None = None
        self.upstream_output: str | None = None  # what the upstream task writes: text | image | video
        if step.input.from_step:
            upstream_step = job.step(step.input.from_step)
            self.upstream_uri = (upstream or {}).get(upstream_step.name) or upstream_step.output_path(job)
            self.upstream_output = upstream_step.spec.output

    # ------------------------------------------------------------------------------------ raw items

    def files(self) -> list[InputFile]:
        return expand_paths(self.input.path or [], self.input.format, self.task.input_media)

    def _raw_rows(self) -> Iterator[RawRow]:
        if self.input.rows is not None:
            for index, row in enumerate(self.input.rows):
                yield RawRow(dict(row), legacy_id=f"row-{index}")
        elif self.input.from_step:
            yield from self._upstream_rows()
        else:
            for file in self.files():
                if file.kind in ("image", "video"):
                    yield RawRow({file.kind: file.uri, "path": file.rel}, given_id=media_row_id(file.rel))
                    continue
                stem = safe_token(posixpath.splitext(file.rel)[0], 80)
                for record in read_records(file):
                    yield _raw_of(record, file.uri, f"{stem}-{record.position}")

    def _upstream_rows(self) -> Iterator[RawRow]:
        """Committed rows of the upstream step, newest part first; the newest version of a row decides
        (an error there means the row is skipped). Its result becomes this step's `image` / `video`;
        its input media, copied into its output rows, stay in the other column."""
        assert self.upstream_uri is not None
        kind = self.upstream_output
        seen = DigestSet()
        for part in sinks.iter_step_output(self.upstream_uri, _UPSTREAM_COLUMNS):
            rows = part.to_pylist()
            repeated = seen.add([digest(row["row_id"]) for row in rows])
            for row, older in zip(rows, repeated, strict=True):
                if older or row.pop("error") is not None:
                    continue
                if kind in ("image", "video"):
                    row[kind] = row["media_uri"]
                yield RawRow(row, given_id=row["row_id"])

    # -------------------------------------------------------------------------------------- rows

    def iter_rows(self) -> Iterator[dict]:
        """Source rows (dicts of SOURCE_SCHEMA fields) in input order, at most `limit` input rows (each
        making `samples` rows); raises `SourceError` on a repeated id."""
        content_ids = DigestSet()  # digests of content-derived ids, for occurrence numbers
        final_ids = DigestSet()  # every id handed out, for uniqueness
        copies: dict[bytes, int] = {}  # digest -> copies seen so far, for repeated content only
        raw_rows = itertools.islice(self._raw_rows(), self.input.limit)
        position = 0
        while chunk := list(itertools.islice(raw_rows, _CHUNK)):
            rows = [self._row(raw, position + i) for i, raw in enumerate(chunk)]
            derived = [i for i, row in enumerate(rows) if row["row_id"] is None]
            keys = [rows[i].pop("_digest") for i in derived]
            for i, key, again in zip(derived, keys, content_ids.add(keys), strict=True):
                suffix = ""
                if again:
                    copies[key] = copies.get(key, 0) + 1
                    suffix = f"-{copies[key]}"
                rows[i]["row_id"] = key.hex() + suffix
            for row, repeated in zip(rows, final_ids.add([digest(row["row_id"]) for row in rows]), strict=True):
                if repeated:
                    raise SourceError(
                        f"step {self.step.name}: duplicate row_id {row['row_id']!r} (input row {position}); ids "
                        "must be unique within a step: fix the id column or map another one"
                    )
                position += 1
                yield from self._samples(row)

    def _row(self, raw: RawRow, position: int) -> dict:
        """A raw item as a source row; `row_id` None (and `_digest` set) when it is to be derived."""
        row: dict[str, Any] = {**dict.fromkeys(SOURCE_SCHEMA.names), "step": self.step.name, "legacy_id": raw.legacy_id}
        if raw.record is None:
            row.update(input_row="{}", error=raw.error, row_id=None, _digest=digest(raw.text or raw.error or ""))
            return row
        text = _canonical_json(raw.record)
        mapped = self.mapping.map(raw.record, raw.table_uri)
        row.update(input_row=text, prompt=mapped.prompt, image=mapped.image, video=mapped.video,
                   seed_override=mapped.seed_override, max_new_tokens_override=mapped.max_new_tokens_override,
                   error=mapped.error)
        given = mapped.row_id if mapped.row_id is not None else raw.given_id
        if given is None and self.mapping.suite is not None:
            given = str(position)  # a suite case without an index is numbered by its position
        row["row_id"] = None if given is None else safe_token(given)
        if given is None:
            row["_digest"] = digest(text)
        return row

    def _samples(self, row: dict) -> Iterator[dict]:
        if not self.sample_seeds:  # no samples_per_prompt, no suite: the row as it is
            yield row
            return
        base_seed = row.get("seed_override")
        if base_seed is None:
            base_seed = self.base_seed
        for n in range(self.samples):
            sample = {**row, "row_id": f"{row['row_id']}-{n}", "legacy_id": None}
            try:
                sample["seed_override"] = parse_seed(base_seed + n)
            except ValueError as e:
                sample["error"] = sample.get("error") or str(e)
            yield sample

    def count(self) -> int:
        """Number of rows (error rows included), reading everything; `estimate_rows` is the cheap one."""
        return sum(1 for _ in self.iter_rows())

    def estimate_rows(self) -> RowCount:
        """Rows, counted without reading every record where that is cheaper (see `tables.count_records`)."""
        if self.input.rows is not None:
            count = RowCount(len(self.input.rows))
        elif self.input.from_step:
            manifest = sinks.read_manifest(self.upstream_uri) if self.upstream_uri else None
            count = RowCount(int((manifest or {}).get("rows_ok") or 0), exact=False)
        else:
            count = RowCount(0)
            for file in self.files():
                count += count_records(file)
                if self.input.limit is not None and count.rows >= self.input.limit:
                    break
        if self.input.limit is not None and count.rows >= self.input.limit:
            count = RowCount(self.input.limit, count.exact)
        return RowCount(count.rows * self.samples, count.exact)

    def fingerprint(self) -> str:
        """A digest of everything the step's row ids depend on: the input files (name, size, modification
        stamp), inline rows or the upstream's committed parts, and the settings that shape ids. Two runs
        with one fingerprint read the same ids (the resume check `resume.complete_manifest` relies on it).
        Params are not in it: as ever, a committed row is not redone because params changed."""
        inp = self.input
        what: dict[str, Any] = {
            "scheme": ID_SCHEME, "step": self.step.name, "task_media": self.task.input_media, "format": inp.format,
            "row_id": inp.columns.row_id, "suite": inp.suite, "limit": inp.limit, "samples": self.samples,
            "sample_seeds": self.sample_seeds,
        }
        if inp.rows is not None:
            what["rows"] = [_canonical_json(row) for row in inp.rows]
        elif inp.from_step:
            what["upstream"] = sinks.committed_parts(self.upstream_uri or "")
        else:
            what["files"] = [(f.uri, f.kind, f.size, f.stamp) for f in self.files()]
        return hashlib.sha256(_canonical_json(what).encode()).hexdigest()


def _raw_of(record: Record, table_uri: str, legacy_id: str) -> RawRow:
    if record.data is None:
        return RawRow(None, error=record.error, legacy_id=legacy_id, text=record.text)
    return RawRow(record.data, given_id=record.key, legacy_id=legacy_id if record.key is None else None,
                  table_uri=table_uri)


def open_source(step: Step, job: Job, upstream: Mapping[str, str] | None = None) -> StepSource:
    """The source of `step`'s rows. `upstream` maps a `from_step` name to its output URI (by default
    that step's configured output path)."""
    return StepSource(step, job, upstream)
