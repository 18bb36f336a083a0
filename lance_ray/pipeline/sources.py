"""A step's input → canonical rows with stable ids.

A step reads exactly one of
* `rows`: inline rows in the job file;
* `path`: a file, directory, glob, fsspec URI (`s3://…`) or a list of those, holding tables
  (JSONL, CSV, Parquet) or media files (images / videos, picked by extension);
* `from_step`: the committed, error-free output rows of an earlier step. Their columns (`text`,
  `prompt`, `media_uri`, …) are the row's columns for templates and mapping; the upstream result
  becomes `image` / `video` (text-producing steps pass their own input media on). The upstream
  prompt and seed are not reused unless mapped (`columns: {prompt: text}`).

Every row becomes a source row (`lance_ray.spec.rows.SOURCE_SCHEMA`):
`row_id, step, prompt, image, video, seed_override, input_row, error`. A row that cannot be used (a
missing column, an empty prompt, a template naming a column the row lacks) gets `error` set instead
of stopping the job; the worker writes it as an error row without running the model.

Row ids are stable across runs:
* the mapped id column when there is one (made file-name safe by `storage.safe_token`);
* a media file: its path relative to the input root, sanitised, plus a short hash of that path;
* a table row: `<table path relative to the input root, sanitised, no extension>-<row index>`;
* an inline row: `row-<index>`; a `from_step` row keeps its upstream id.
Ids must be unique within a step; a duplicate is an error that names it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from jinja2 import TemplateError

from lance_ray.errors import InputError
from lance_ray.io.storage import filesystem_for, is_local, join_uri, safe_token, sanitize, short_hash, to_uri
from lance_ray.models.lance import MAX_NEW_TOKENS
from lance_ray.pipeline.sinks import read_step_output
from lance_ray.spec import PROMPT_COLUMNS, ColumnMap, Job, Step, compile_prompt_template
from lance_ray.spec.rows import source_table

TABLE_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_TABLE_FORMATS = frozenset(TABLE_EXTENSIONS.values())
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}

_BLOCK_ROWS = 256  # rows per Ray Data block: small enough that media decoding spreads over many tasks


class SourceError(InputError):
    """The step's input as a whole is unusable: nothing matched, an unreadable table, duplicate ids."""


@dataclass(frozen=True)
class InputFile:
    uri: str  # what readers open (a local path or `proto://…`)
    rel: str  # path relative to the input root, '/'-separated; the basis of derived row ids
    kind: str  # "jsonl" | "csv" | "parquet" | "image" | "video"


def _kind_of(name: str, fmt: str) -> str | None:
    ext = os.path.splitext(name)[1].lower()
    if fmt in _TABLE_FORMATS:
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


def _glob_root(path: str) -> str:
    """The directory part of a glob pattern before its first wildcard."""
    first = min(i for i, c in enumerate(path) if c in "*?[")
    return path[:first].rsplit("/", 1)[0] if "/" in path[:first] else ""


def expand_paths(paths: Iterable[str], fmt: str = "auto", prefer: str | None = None) -> list[InputFile]:
    """Files named by `paths` (files, directories, globs, URIs) in the order given, each directory or
    glob sorted by name, with paths relative to the common root of all of them.

    Explicit files are taken whatever their extension says (unknown extensions are an error in
    `auto`); globs contribute the files that fit `fmt` (any file for a table format), folders
    (recursively, hidden entries skipped) the files whose extension fits `fmt`. In `auto`, a
    directory or glob holding several kinds contributes only `prefer` (the task's input media:
    "image" | "video") when it has any, else its tables.
    """
    found: list[tuple[Any, str, str, str]] = []  # (fs, path, root, kind)
    for spec in paths:
        fs, path = filesystem_for(spec)
        is_dir = False
        if any(c in path for c in "*?["):
            root, matches, explicit = _glob_root(path), sorted(fs.glob(path)), False
            matches = [m for m in matches if fs.isfile(m)]
        elif fs.isdir(path):
            root, explicit, is_dir = path.rstrip("/"), False, True
            matches = sorted(fs.find(path))
        elif fs.exists(path):
            root, matches, explicit = posixpath.dirname(path), [path], True
        else:
            raise SourceError(f"input {spec}: no such file or directory")
        items = []
        for match in matches:
            name = posixpath.basename(match)
            if not explicit and any(
                part.startswith(".") for part in posixpath.relpath(match, root).split("/")
            ):
                continue  # hidden files and folders (.git, .ipynb_checkpoints, temp files)
            # In a folder, even an explicit table format only takes files with that format's extension.
            kind = _kind_of(name, "auto" if is_dir and fmt in _TABLE_FORMATS else fmt)
            if is_dir and fmt in _TABLE_FORMATS and kind != fmt:
                continue
            if kind is None and explicit:
                raise SourceError(
                    f"input {spec}: cannot tell the format from the extension; set input.format"
                )
            if kind is not None:
                items.append((fs, match, root, kind))
        groups = {_group(kind) for *_, kind in items}
        if not explicit and fmt == "auto" and len(groups) > 1:
            keep = prefer if prefer in groups else "table" if "table" in groups else None
            if keep is None:
                raise SourceError(f"input {spec}: holds both images and videos; set input.format")
            items = [item for item in items if _group(item[3]) == keep]
        if not items:
            raise SourceError(f"input {spec}: no {'' if fmt == 'auto' else fmt + ' '}files found")
        found.extend(items)
    roots = [root for _, _, root, _ in found]
    common = posixpath.commonpath(roots) if len({_proto(fs) for fs, *_ in found}) == 1 else ""
    files = []
    for fs, path, _, kind in found:
        rel = posixpath.relpath(path, common) if common else path.lstrip("/")
        files.append(InputFile(uri=to_uri(fs, path), rel=rel, kind=kind))
    return list(dict.fromkeys(files))  # a file named twice (overlapping globs) is read once


def _group(kind: str) -> str:
    return "table" if kind in _TABLE_FORMATS else kind


def _proto(fs: Any) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _stem(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def media_row_id(rel: str) -> str:
    """Row id of a media file: its sanitised relative path without extension plus a hash of the
    whole relative path (so `a.jpg` and `a.png` in one folder stay distinct)."""
    return f"{sanitize(_stem(rel))[:80] or 'media'}-{short_hash(rel)}"


def table_row_id(rel: str, index: int) -> str:
    """Row id of a table row: `<table path without extension>-<row index>`."""
    return f"{safe_token(_stem(rel), 80)}-{index}"


# ------------------------------------------------------------------------------------- table readers


def _read_jsonl(f: io.BufferedIOBase) -> Iterator[dict | str]:
    """Objects of a JSON-lines file; a line that is not a JSON object yields an error message."""
    for line_no, line in enumerate(io.TextIOWrapper(f, encoding="utf-8-sig"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {line_no}: invalid JSON ({e})"
        else:
            yield value if isinstance(value, dict) else f"line {line_no}: not a JSON object"


def _read_csv(f: io.BufferedIOBase) -> Iterator[dict]:
    # Every value stays a string (no type guessing: an id "007" must not become 7). Cells beyond
    # the header go to one named list instead of DictReader's default `None` key.
    yield from csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""), restkey="_extra_cells")


def _read_parquet(f: io.BufferedIOBase) -> Iterator[dict]:
    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


_TABLE_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}


def _resolve_media(value: Any, table_uri: str) -> Any:
    """Media paths inside a table are relative to the table's own folder unless absolute or URIs."""
    if not isinstance(value, str) or not value or "://" in value or value.startswith("/"):
        return value
    base = os.path.dirname(table_uri) if is_local(table_uri) else table_uri.rsplit("/", 1)[0]
    return os.path.normpath(os.path.join(base, value)) if is_local(table_uri) else join_uri(base, value)


# ------------------------------------------------------------------------------------------ the source


def _column_candidates(columns: ColumnMap, from_step: bool) -> dict[str, tuple[tuple[str, ...], bool]]:
    """For each canonical field: the source columns to try in order, and whether the user mapped it
    (a mapped column that is missing is a row error; an absent default column is simply empty).

    Rows from another step carry that step's own prompt and seed; they only become this step's
    when mapped explicitly (`columns: {prompt: text}`), never by default.
    """
    defaults = {
        "prompt": () if from_step else PROMPT_COLUMNS,
        "seed": () if from_step else ("seed",),
        "max_new_tokens": () if from_step else ("max_new_tokens",),
        "image": ("image",),
        "video": ("video",),
        "row_id": ("row_id",),
    }
    mapped = {
        "prompt": columns.prompt_column(),
        **{n: getattr(columns, n) for n in ("image", "video", "seed", "row_id")},
        "max_new_tokens": None,  # read from a column of that name (understanding tasks)
    }
    return {name: ((mapped[name],), True) if mapped[name] else (defaults[name], False) for name in defaults}


def _to_json(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, default=str)


class StepSource:
    """The rows of one step. Each iteration re-reads the inputs (nothing is cached but the count)."""

    def __init__(self, step: Step, job: Job, upstream: Mapping[str, str] | None = None):
        self.step = step
        self.task = step.spec
        self.input = step.input
        self.columns = _column_candidates(step.input.columns, from_step=step.input.from_step is not None)
        self.prompt_template = (
            None if step.input.prompt is None else compile_prompt_template(step.input.prompt)
        )
        self.prompt_required = self.task.prompt_required and not step.turns
        self.upstream_uri: str | None = None
        self.upstream_output: str | None = None  # what the upstream task writes: text | image | video
        if step.input.from_step:
            upstream_step = job.step(step.input.from_step)
            self.upstream_uri = (upstream or {}).get(upstream_step.name) or upstream_step.output_path(job)
            self.upstream_output = upstream_step.spec.output
        self._count: int | None = None

    # -- raw rows: (row id derived from position, original row or an error message, table uri)

    def _raw_rows(self) -> Iterator[tuple[str, dict | str, str | None]]:
        if self.input.rows is not None:
            for index, row in enumerate(self.input.rows):
                yield f"row-{index}", dict(row), None
        elif self.input.from_step:
            yield from self._upstream_rows()
        else:
            for file in expand_paths(self.input.path or [], self.input.format, self.task.input_media):
                if file.kind in ("image", "video"):
                    yield media_row_id(file.rel), {file.kind: file.uri, "path": file.rel}, None
                    continue
                fs, path = filesystem_for(file.uri)
                try:
                    with fs.open(path, "rb") as f:
                        for index, row in enumerate(_TABLE_READERS[file.kind](f)):
                            yield table_row_id(file.rel, index), row, file.uri
                except (OSError, ValueError, pa.ArrowException) as e:
                    raise SourceError(f"input {file.uri}: cannot read as {file.kind} ({e})") from e

    def _upstream_rows(self) -> Iterator[tuple[str, dict, None]]:
        """Committed, error-free rows of the upstream step. Its result becomes this step's `image` /
        `video`; the upstream's input media, copied into its output rows, stay in the other column."""
        kind = self.upstream_output
        table = read_step_output(self.upstream_uri).drop_columns(["input_row"])
        for row in table.to_pylist():
            if row.pop("error") is not None:
                continue
            if kind in ("image", "video"):
                row[kind] = row["media_uri"]
            yield row["row_id"], row, None

    # -- canonical rows

    def _canonical(self, derived_id: str, raw: dict | str, table_uri: str | None) -> dict:
        if isinstance(raw, str):  # a table line that is not a row at all
            return {"row_id": derived_id, "step": self.step.name, "input_row": _to_json({}), "error": raw}
        out: dict[str, Any] = {"row_id": derived_id, "step": self.step.name, "input_row": _to_json(raw)}
        errors: list[str] = []
        for name, (candidates, mapped) in self.columns.items():
            if name == "prompt" and self.prompt_template is not None:
                continue  # the template is the prompt
            value = next((raw[c] for c in candidates if raw.get(c) not in (None, "")), None)
            if value is None:
                if mapped:
                    errors.append(f"column {candidates[0]!r} (mapped to {name}) is missing or empty")
                continue
            if name == "row_id":
                out["row_id"] = safe_token(str(value))
            elif name == "seed":
                try:
                    out["seed_override"] = int(value)
                except (TypeError, ValueError):
                    errors.append(f"seed {value!r} is not an integer")
            elif name == "max_new_tokens":
                if self.task.output == "text":
                    cap = value if isinstance(value, int) else int(value) if str(value).isdigit() else None
                    if cap is None or not 1 <= cap <= MAX_NEW_TOKENS:
                        errors.append(f"max_new_tokens {value!r} is not an integer in 1..{MAX_NEW_TOKENS}")
                    else:
                        out["max_new_tokens_override"] = cap
            elif name in ("image", "video") and table_uri is not None:
                out[name] = _resolve_media(str(value), table_uri)
            else:
                out[name] = str(value)
        if self.prompt_template is not None:
            try:
                out["prompt"] = self.prompt_template.render(raw)
            except TemplateError as e:
                errors.append(f"prompt template: {e}")
        media = self.task.input_media
        if media and not out.get(media) and not self.columns[media][1]:
            errors.append(f"task {self.task.name} needs an input {media}; the row has no {media!r} column")
        if self.prompt_required and not errors and not (out.get("prompt") or "").strip():
            errors.append(f"task {self.task.name} needs a non-empty {self.task.prompt_name}")
        if errors:
            out["error"] = "; ".join(errors)
        return out

    def iter_rows(self) -> Iterator[dict]:
        """Source rows (dicts of SOURCE_SCHEMA fields) in input order, at most `limit`; raises `SourceError`
        on a duplicate id."""
        seen: set[str] = set()
        for derived_id, raw, table_uri in self._raw_rows():
            if self.input.limit is not None and len(seen) >= self.input.limit:
                break
            row = self._canonical(derived_id, raw, table_uri)
            if row["row_id"] in seen:
                raise SourceError(
                    f"step {self.step.name}: duplicate row_id {row['row_id']!r} (input row {len(seen)}); "
                    "ids must be unique within a step: fix the id column or map another one"
                )
            seen.add(row["row_id"])
            yield row
        self._count = len(seen)

    def count(self) -> int:
        """Number of rows (error rows included), after `limit`."""
        if self._count is None:
            for _ in self.iter_rows():
                pass
        return self._count or 0

    def to_dataset(self, exclude_row_ids: Iterable[str] = frozenset()) -> ray.data.Dataset:
        """The rows as a Ray Dataset in `SOURCE_SCHEMA`, without `exclude_row_ids` (already committed).

        Rows become Arrow blocks as they are read, so the driver never holds them all as dicts.
        """
        exclude = set(exclude_row_ids)
        blocks, pending = [], []
        for row in self.iter_rows():
            if row["row_id"] in exclude:
                continue
            pending.append(row)
            if len(pending) == _BLOCK_ROWS:
                blocks.append(source_table(pending))
                pending = []
        if pending or not blocks:
            blocks.append(source_table(pending))
        return ray.data.from_arrow(blocks)


def open_source(step: Step, job: Job, upstream: Mapping[str, str] | None = None) -> StepSource:
    """The source of `step`'s rows. `upstream` maps a `from_step` name to its output URI (by default
    that step's configured output path)."""
    return StepSource(step, job, upstream)
