"""The job file's models: a `Job` of `Step`s, each with an input, params, output and resources.

Pydantic v2 (strict, unknown keys rejected, immutable): one declaration gives validation with
per-field error locations, typed attributes for every other module, and the JSON Schema. Rules
that relate several fields live in `checks.py`; loading YAML and reporting `file:line:col` in
`loader.py`. Task facts and defaults come from the model's task registry
(`lance_ray/models/lance/tasks.py`), param types from `params.py` beside it.
"""

from __future__ import annotations

import os
import posixpath
import re
import zoneinfo
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from croniter import croniter
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lance_ray.io.storage import output_location_problem
from lance_ray.models.lance import TASK_NAMES, TASKS, Params, TaskSpec, source_kind, tasks_of
from lance_ray.spec.checks import job_problems
from lance_ray.spec.inputs import parse_column_path
from lance_ray.spec.suites import SUITE_NAMES, SUITES
from lance_ray.spec.templates import check_prompt_template

TaskName = Literal[TASK_NAMES]  # type: ignore[valid-type]

DEFAULT_MODEL_SOURCE = "bytedance-research/Lance"
RUN_PLACEHOLDERS = ("run_date", "run_id")
INPUT_FORMATS = ("auto", "jsonl", "csv", "parquet", "json", "images", "videos")
OUTPUT_FORMATS = ("parquet", "lance", "webdataset")

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_NAME = r"^[a-z0-9_-]+$"
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str) -> bool:
    return bool(_URI_SCHEME.match(path))


def _resolve_path(path: str, info: ValidationInfo) -> str:
    """Relative local paths are relative to the job file's directory (given as context)."""
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is None or is_uri(path):
        return path
    expanded = os.path.expanduser(path)
    return os.path.normpath(os.path.join(base_dir, expanded))


def _check_placeholders(path: str) -> str:
    for name in _PLACEHOLDER.findall(path):
        if name not in RUN_PLACEHOLDERS:
            raise ValueError(
                f"unknown placeholder {{{name}}} in output path; allowed: "
                + ", ".join(f"{{{p}}}" for p in RUN_PLACEHOLDERS)
            )
    return path


def _check_output_location(path: str) -> str:
    """Outputs must persist: no control characters, no memory:// (or other non-persisting) scheme."""
    problem = output_location_problem(path)
    if problem:
        raise ValueError(problem)
    return path


def _fill_placeholders(path: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], path)


class _Model(BaseModel):
    # strict: a quoted "30" is not a number and `true` is not 1.  Numbers can still come from the
    # environment: the YAML loader re-types an unquoted `${VAR}` after expanding it.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class ModelRef(_Model):
    """Which checkpoint a family uses and how it runs."""

    source: str = Field(
        default=DEFAULT_MODEL_SOURCE,
        min_length=1,
        description="Hugging Face repo id, local directory, s3:// (or other fsspec) URI, or `lance-tiny` "
        "(the tiny random checkpoint, for tests and the quickstart).",
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit); hub sources only."
    )
    precision: Literal["bfloat16", "float32"] = Field(
        default="bfloat16", description="Weights and compute dtype."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto`: the GPU when the actor has one, else CPU."
    )
    backend: Literal["lance", "debug"] = Field(
        default="lance",
        description="`lance`: the real model. `debug`: placeholder outputs without a model (pipeline tests only).",
    )

    @field_validator("source")
    @classmethod
    def _resolve_local_source(cls, source: str, info: ValidationInfo) -> str:
        if source_kind(source) == "local":
            return _resolve_path(source, info)
        return source

    @property
    def kind(self) -> Literal["tiny", "hub", "uri", "local"]:
        """How `source` is read: the tiny checkpoint, the HF hub, an fsspec URI, or a local dir."""
        return source_kind(self.source)


def _model_ref_shorthand(value: Any) -> Any:
    """`models: {image: lance-tiny}` means `{image: {source: lance-tiny}}`."""
    return {"source": value} if isinstance(value, str) else value


ModelRefField = Annotated[
    ModelRef, BeforeValidator(_model_ref_shorthand, json_schema_input_type=ModelRef | str)
]


def _task_list(family: str) -> str:
    return ", ".join(t.name for t in tasks_of(family))


class ModelsSpec(_Model):
    """One checkpoint per family; every step of a family shares its (once-loaded) model."""

    image: ModelRefField = Field(
        default_factory=ModelRef, description=f"Checkpoint for {_task_list('image')}."
    )
    video: ModelRefField = Field(
        default_factory=ModelRef, description=f"Checkpoint for {_task_list('video')}."
    )


class ColumnMap(_Model):
    """Which source column holds each canonical field (unmapped: the canonical name itself). A column may
    be a path into nested records: `additional_info.prompt`, `interleave_array[1]`."""

    prompt: str | None = Field(default=None, description="Column with the prompt.")
    instruction: str | None = Field(
        default=None, description="Column with the edit instruction (same role as prompt)."
    )
    question: str | None = Field(
        default=None, description="Column with the x2t question (same role as prompt)."
    )
    image: str | None = Field(default=None, description="Column with the input image path/URI.")
    video: str | None = Field(default=None, description="Column with the input video path/URI.")
    seed: str | None = Field(default=None, description="Column with a per-row seed.")
    row_id: str | None = Field(
        default=None, description="Column with a stable row id (else derived from the row's content)."
    )

    @field_validator("*")
    @classmethod
    def _column_path(cls, column: str | None) -> str | None:
        if column is not None:
            parse_column_path(column)
        return column

    def prompt_column(self) -> str | None:
        return self.prompt or self.instruction or self.question


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class InputSpec(_Model):
    """Where a step's rows come from: exactly one of `rows`, `path`, `from_step`."""

    rows: list[dict[str, Any]] | None = Field(default=None, min_length=1, description="Inline rows.")
    path: Annotated[list[str], BeforeValidator(_as_list, json_schema_input_type=str | list[str])] | None = (
        Field(
            default=None,
            min_length=1,
            description="File(s), directory or glob (JSONL/CSV/Parquet tables, or images/videos), any fsspec URI, "
            "or a list of them. Relative paths are relative to the job file. Always a list once loaded.",
        )
    )
    from_step: str | None = Field(default=None, description="Read the output rows of an earlier step.")
    suite: Literal[SUITE_NAMES] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="`path` holds a benchmark's prompt file: its default columns, samples per prompt and "
        "`lance-ray export` layout.",
    )
    format: Literal[INPUT_FORMATS] = Field(  # type: ignore[valid-type]
        default="auto", description="How to read `path`; `auto` goes by file extension."
    )
    columns: ColumnMap = Field(
        default_factory=ColumnMap, description="Source column → canonical field mapping."
    )
    prompt: str | None = Field(
        default=None,
        description="Prompt for every row: a constant, or a Jinja template over the row's columns "
        "(`Describe {{ subject }}.`). Quote it in YAML.",
    )
    limit: int | None = Field(default=None, ge=1, description="Read at most this many rows.")
    samples_per_prompt: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Rows made from each input row (ids `<id>-<n>`); sample n is seeded with seed + n. "
        "Default 1, or the suite's.",
    )
    media_root: str | None = Field(
        default=None,
        min_length=1,
        description="Folder (or URI) that relative media paths in a table are relative to; default: the "
        "table's own folder.",
    )

    @field_validator("path")
    @classmethod
    def _resolve_paths(cls, paths: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if paths is None:
            return None
        for p in paths:
            if not p:
                raise ValueError("an input path must not be empty")
        return [_resolve_path(p, info) for p in paths]

    @field_validator("media_root")
    @classmethod
    def _resolve_media_root(cls, root: str | None, info: ValidationInfo) -> str | None:
        return None if root is None else _resolve_path(root, info)

    @field_validator("prompt")
    @classmethod
    def _parse_template(cls, prompt: str | None) -> str | None:
        if prompt is not None:
            check_prompt_template(prompt)
        return prompt

    @property
    def kind(self) -> Literal["rows", "path", "from_step"]:
        if self.rows is not None:
            return "rows"
        return "path" if self.path is not None else "from_step"

    @property
    def samples(self) -> int:
        """Rows made from each input row: `samples_per_prompt`, else the suite's, else 1."""
        if self.samples_per_prompt is not None:
            return self.samples_per_prompt
        return SUITES[self.suite].samples_per_prompt if self.suite else 1


def _output_shorthand(value: Any) -> Any:
    """`output: some/dir` means `{path: some/dir}`."""
    return {"path": value} if isinstance(value, str) else value


class OutputSpec(_Model):
    """Where and how a step writes its rows and media files."""

    path: str | None = Field(
        default=None,
        description="Output directory or URI; default `<job output>/<step name>`. May contain {run_date} / {run_id}.",
    )
    format: Literal[OUTPUT_FORMATS] = Field(  # type: ignore[valid-type]
        default="parquet",
        description="`parquet`: part-*.parquet + __media__/ (a folder every Parquet reader opens); `lance`: a "
        "Lance dataset (media as blobs); `webdataset`: tar shards of <key>.json/.txt/.png|.mp4.",
    )
    merge_into: bool = Field(
        default=False,
        description="`format: lance` and a text step (x2t) only: add the step's text as new columns "
        "(`<step>_text`, ...) to the existing Lance dataset at `path`, matched by row_id.",
    )
    video_codec: Literal["h264", "ffv1"] = Field(
        default="h264", description="Video codec: h264 (.mp4, default), or ffv1 (lossless, .mkv)."
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None:
            return None
        return _resolve_path(_check_output_location(_check_placeholders(path)), info)

    @model_validator(mode="after")
    def _check_merge(self) -> OutputSpec:
        if self.merge_into and self.format != "lance":
            raise ValueError("merge_into adds columns to a Lance dataset: it needs format: lance")
        if self.merge_into and self.path is None:
            raise ValueError("merge_into needs path: the Lance dataset to add columns to")
        return self


class Resources(_Model):
    """How much hardware a step's checkpoint group gets (the planner takes the largest per group)."""

    gpus: int | None = Field(
        default=None, ge=0, description="GPUs (one Lance actor each); default: all available; 0: CPU."
    )
    batch_size: int | None = Field(default=None, ge=1, description="Rows per model call; default: per task.")
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Most seconds one model call (a batch of this step) may run; past it the actor is restarted "
        "and the batch's rows are written as timed out. Default: generous, from the task's cost.",
    )


class ScheduleSpec(_Model):
    """Run the job on a cron schedule (`lance-ray schedule`)."""

    cron: str = Field(description="Five-field cron expression, e.g. `0 2 * * *`.")
    timezone: str = Field(default="UTC", description="IANA time zone the cron expression is read in.")
    overlap: Literal["skip", "queue"] = Field(
        default="skip",
        description="When a run is due while the previous one is still running: skip it or queue it.",
    )
    catch_up: Literal["none", "latest", "all"] = Field(
        default="latest",
        description="Runs missed while the scheduler was down: none, only the latest, or all.",
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str) -> str:
        if len(cron.split()) != 5 or not croniter.is_valid(cron):
            raise ValueError(
                f"invalid cron expression {cron!r} (expected 5 fields: minute hour day month weekday)"
            )
        return cron

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, tz: str) -> str:
        try:
            zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {tz!r} (use an IANA name such as UTC or Europe/Paris)"
            ) from None
        return tz


class RaySpec(_Model):
    """Which Ray cluster to use."""

    address: str | None = Field(
        default=None,
        description="Ray address (`auto`, `ray://host:10001`, ...); default: start a local Ray.",
    )


class Step(_Model):
    """One task applied to one input."""

    name: str = Field(pattern=_NAME, max_length=64, description="Unique step name ([a-z0-9_-]+).")
    task: TaskName = Field(description=" | ".join(TASK_NAMES) + ".")
    input: InputSpec = Field(description="Where the rows come from.")
    params: Params = Field(default_factory=Params, description="Overrides the job defaults for this step.")
    output: Annotated[
        OutputSpec, BeforeValidator(_output_shorthand, json_schema_input_type=OutputSpec | str)
    ] = Field(default_factory=OutputSpec, description="Output location and encoding.")
    resources: Resources = Field(default_factory=Resources, description="GPUs and batch size.")
    turns: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None,
        min_length=1,
        description="image_edit/video_edit only: instructions applied one after another, each to the previous "
        "turn's result (replaces a prompt/instruction from the input).",
    )

    @property
    def spec(self) -> TaskSpec:
        """What the task is: family, inputs, output, params and defaults (tasks.py)."""
        return TASKS[self.task]

    @property
    def family(self) -> str:
        return self.spec.family

    def params_for(self, job: Job) -> Params:
        """Effective params: step params over job defaults over task defaults; only those the task reads."""
        return self.spec.resolve(self.params, job.defaults)

    def output_path(self, job: Job) -> str:
        """This step's output directory or URI (may still hold {run_date}/{run_id}; see Job.with_run_context)."""
        if self.output.path is not None:
            return self.output.path
        root = job.output
        return posixpath.join(root, self.name) if is_uri(root) else os.path.join(root, self.name)


class Job(_Model):
    """A validated job file."""

    name: str = Field(pattern=_NAME, max_length=64, description="Job name ([a-z0-9_-]+).")
    models: ModelsSpec = Field(default_factory=ModelsSpec, description="Checkpoint per family.")
    defaults: Params = Field(
        default_factory=Params, description="Params for every step (a step's params win)."
    )
    output: str = Field(
        default="outputs",
        description="Output root (directory or URI); default `outputs/<name>` beside the job file. "
        "May contain {run_date} / {run_id}.",
    )
    schedule: ScheduleSpec | None = Field(default=None, description="Optional cron schedule.")
    ray: RaySpec = Field(default_factory=RaySpec, description="Ray cluster to use.")
    steps: list[Step] = Field(min_length=1, description="The steps, in file order.")

    _source_path: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _default_output(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("output") is None and isinstance(data.get("name"), str):
            data = {**data, "output": os.path.join("outputs", data["name"])}
        return data

    @field_validator("output")
    @classmethod
    def _check_output(cls, output: str, info: ValidationInfo) -> str:
        return _resolve_path(_check_output_location(_check_placeholders(output)), info)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Job:
        # The loader runs the same checks on the raw document and reports them with positions; a Job
        # built from Python data gets them here, as one message.
        if not (info.context or {}).get("checked_by_loader"):
            problems = job_problems(self.model_dump(mode="python"))
            if problems:
                raise ValueError("; ".join(p.message for p in problems))
        return self

    @property
    def source_path(self) -> str | None:
        """Absolute path of the job file (None when loaded from text)."""
        return self._source_path

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"job {self.name!r} has no step {name!r}")

    def model_for(self, family: str) -> ModelRef:
        if family not in ("image", "video"):
            raise KeyError(f"unknown family {family!r} (expected image or video)")
        return getattr(self.models, family)

    def with_run_context(self, run_date: str, run_id: str) -> Job:
        """A copy with {run_date} / {run_id} filled into the output paths (for scheduled runs)."""
        values = {"run_date": run_date, "run_id": run_id}
        steps = [
            s
            if s.output.path is None
            else s.model_copy(
                update={
                    "output": s.output.model_copy(update={"path": _fill_placeholders(s.output.path, values)})
                }
            )
            for s in self.steps
        ]
        return self.model_copy(update={"output": _fill_placeholders(self.output, values), "steps": steps})


