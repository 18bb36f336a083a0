"""The job spec: YAML job files → typed, validated `Job` objects.

Models are pydantic v2 rather than dataclasses + jsonschema because one declaration then gives
us validation with per-field error locations (which we map back to `file:line:col`), typed
attribute access for every other module, and the generated `specs/job.schema.json`.

Validation happens in three layers, each reporting every problem it finds:
1. `yaml_positions.load_yaml`: YAML syntax, duplicate keys, `${ENV}` references.
2. pydantic: unknown keys, types, single-field rules (ranges, cron, timezone, templates).
3. `_step_problems` / `_graph_problems`: rules that relate fields (a param a task does not
   use, a preset of the wrong family, an input without the columns a task needs, `from_step`).
All of them become `SpecProblem`s with positions; `JobSpecError` carries the whole list.
"""

from __future__ import annotations

import copy
import difflib
import glob
import json
import os
import posixpath
import re
import sys
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar, get_args

import jinja2
import jinja2.meta
import jinja2.sandbox
from croniter import croniter
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lance_ray.errors import JobFileError
from lance_ray.spec.yaml_positions import PositionMap, load_yaml

# ---------------------------------------------------------------------------------------------
# Tasks, families, presets

Task = Literal["t2i", "t2v", "i2v", "image_edit", "video_edit", "x2t_image", "x2t_video"]

TASKS: tuple[str, ...] = get_args(Task)
TASK_FAMILY: dict[str, str] = {
    "t2i": "image",
    "image_edit": "image",
    "x2t_image": "image",
    "t2v": "video",
    "i2v": "video",
    "video_edit": "video",
    "x2t_video": "video",
}
EDIT_TASKS = frozenset({"image_edit", "video_edit"})

Preset = Literal["image_256res", "image_512res", "image_768res", "video_192p", "video_360p", "video_480p"]
PRESETS: dict[str, tuple[str, ...]] = {
    "image": ("image_256res", "image_512res", "image_768res"),
    "video": ("video_192p", "video_360p", "video_480p"),
}
# Output size (height, width) a t2i/t2v step gets from its preset when height/width are not
# given: the square bucket for image presets, the 16:9 landscape bucket for video presets.
PRESET_SIZE: dict[str, tuple[int, int]] = {
    "image_256res": (256, 256),
    "image_512res": (512, 512),
    "image_768res": (768, 768),
    "video_192p": (192, 336),
    "video_360p": (352, 624),
    "video_480p": (480, 848),
}

DEFAULT_MODEL_SOURCE = "bytedance-research/Lance"
TINY_MODEL_SOURCE = "lance-tiny"
MAX_FRAMES = 121
# The checkpoints' latent position table is 64×64 latents of 16 pixels each.
MAX_SIDE = 1024

# Which params each task reads.  Anything else on a step is an error (in `defaults` it is
# simply not applied to that step).
_DENOISE = frozenset({"steps", "shift", "cfg_scale", "cfg_interval", "cfg_renorm_min"})
_COMMON_PARAMS = frozenset({"seed", "seed_mode", "preset"})
_DECODE = frozenset({"max_new_tokens", "temperature", "top_p", "system_prompt"})
TASK_PARAMS: dict[str, frozenset[str]] = {
    "t2i": _DENOISE | _COMMON_PARAMS | {"height", "width"},
    "t2v": _DENOISE | _COMMON_PARAMS | {"height", "width", "frames", "fps"},
    "i2v": _DENOISE | _COMMON_PARAMS | {"frames", "fps"},
    "image_edit": _DENOISE | _COMMON_PARAMS,
    "video_edit": _DENOISE | _COMMON_PARAMS | {"fps"},
    "x2t_image": _DECODE | _COMMON_PARAMS,
    "x2t_video": _DECODE | _COMMON_PARAMS,
}

# Reference defaults (the official inference script), applied by `Step.params_for`.
_DENOISE_DEFAULTS: dict[str, Any] = {
    "steps": 30,
    "shift": 3.5,
    "cfg_scale": 4.0,
    "cfg_interval": [0.4, 1.0],
    "cfg_renorm_min": 0.0,
}
_COMMON_DEFAULTS: dict[str, Any] = {"seed": 42, "seed_mode": "per_row"}
_DECODE_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "t2i": {**_DENOISE_DEFAULTS, **_COMMON_DEFAULTS, "preset": "image_768res"},
    "t2v": {**_DENOISE_DEFAULTS, **_COMMON_DEFAULTS, "preset": "video_480p", "frames": 49, "fps": 12},
    "i2v": {**_DENOISE_DEFAULTS, **_COMMON_DEFAULTS, "preset": "video_480p", "frames": 49, "fps": 12},
    "image_edit": {**_DENOISE_DEFAULTS, **_COMMON_DEFAULTS, "preset": "image_768res"},
    "video_edit": {**_DENOISE_DEFAULTS, **_COMMON_DEFAULTS, "preset": "video_480p", "fps": 12},
    "x2t_image": {**_DECODE_DEFAULTS, **_COMMON_DEFAULTS, "preset": "image_768res"},
    "x2t_video": {**_DECODE_DEFAULTS, **_COMMON_DEFAULTS, "preset": "video_480p"},
}

# What each task needs from a row, and what a step's output rows carry for a `from_step`
# reader (generated media plus the input media copied through).
# The input media each task reads (None: prompt only), and the tasks whose prompt may be empty.
INPUT_MEDIA: dict[str, str | None] = {
    "t2i": None, "t2v": None, "i2v": "image", "image_edit": "image", "video_edit": "video",
    "x2t_image": "image", "x2t_video": "video",
}
PROMPT_OPTIONAL_TASKS = frozenset({"x2t_image", "x2t_video"})
_NEEDS_IMAGE = frozenset(t for t, m in INPUT_MEDIA.items() if m == "image")
_NEEDS_VIDEO = frozenset(t for t, m in INPUT_MEDIA.items() if m == "video")
_NEEDS_PROMPT = frozenset(INPUT_MEDIA) - PROMPT_OPTIONAL_TASKS
_ROWS_CARRY: dict[str, frozenset[str]] = {
    "t2i": frozenset({"image"}),
    "image_edit": frozenset({"image"}),
    "x2t_image": frozenset({"image"}),
    "t2v": frozenset({"video"}),
    "video_edit": frozenset({"video"}),
    "x2t_video": frozenset({"video"}),
    "i2v": frozenset({"image", "video"}),
}

RUN_PLACEHOLDERS = ("run_date", "run_id")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_NAME = r"^[a-z0-9_-]+$"
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

PROMPT_COLUMNS = ("prompt", "instruction", "question")

_PROMPT_ENV = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


def compile_prompt_template(text: str) -> jinja2.Template:
    """The Jinja template for `input.prompt`; undefined columns raise instead of rendering ''."""
    return _PROMPT_ENV.from_string(text)


def prompt_template_columns(text: str) -> set[str]:
    """Names of the row columns a prompt template reads (empty for a constant prompt)."""
    return jinja2.meta.find_undeclared_variables(_PROMPT_ENV.parse(text))


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


def _fill_placeholders(path: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], path)


class _Model(BaseModel):
    # strict: a quoted "30" is not a number and `true` is not 1.  Numbers can still come from the
    # environment: the YAML loader re-types an unquoted `${VAR}` after expanding it.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Models


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
        if _model_source_kind(source) == "local":
            return _resolve_path(source, info)
        return source

    @property
    def kind(self) -> Literal["tiny", "hub", "uri", "local"]:
        """How `source` is read: the tiny checkpoint, the HF hub, an fsspec URI, or a local dir."""
        return _model_source_kind(self.source)


def _model_source_kind(source: str) -> Literal["tiny", "hub", "uri", "local"]:
    if source == TINY_MODEL_SOURCE:
        return "tiny"
    if is_uri(source):
        return "uri"
    # `owner/name` is a hub repo id; anything path-like (./x, /x, ~/x, a/b/c) is a directory.
    if _HF_REPO_ID.match(source) and not source.startswith((".", "~")):
        return "hub"
    return "local"


def _model_ref_shorthand(value: Any) -> Any:
    """`models: {image: lance-tiny}` means `{image: {source: lance-tiny}}`."""
    return {"source": value} if isinstance(value, str) else value


ModelRefField = Annotated[
    ModelRef, BeforeValidator(_model_ref_shorthand, json_schema_input_type=ModelRef | str)
]


class ModelsSpec(_Model):
    """One checkpoint per family; every step of a family shares its (once-loaded) model."""

    image: ModelRefField = Field(
        default_factory=ModelRef, description="Checkpoint for t2i, image_edit, x2t_image."
    )
    video: ModelRefField = Field(
        default_factory=ModelRef, description="Checkpoint for t2v, i2v, video_edit, x2t_video."
    )


class Params(_Model):
    """Sampling parameters.  Every field is optional; `Step.params_for` fills task defaults."""

    steps: int | None = Field(default=None, ge=1, le=1000, description="Denoising steps (default 30).")
    shift: float | None = Field(default=None, gt=0, description="Flow-matching timestep shift (default 3.5).")
    cfg_scale: float | None = Field(
        default=None, ge=0, description="Text classifier-free guidance scale (default 4.0; ≤1 disables CFG)."
    )
    cfg_interval: list[float] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="[low, high]: CFG is applied on steps with low < sigma <= high (default [0.4, 1.0]).",
    )
    cfg_renorm_min: float | None = Field(
        default=None, ge=0, le=1, description="Lower clamp of the global CFG renormalisation (default 0.0)."
    )
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Base seed (default 42).")
    seed_mode: Literal["per_row", "official"] | None = Field(
        default=None,
        description="`per_row` (default): each row's seed is derived from `seed` and its row_id, so results do not "
        "depend on batching or order. `official`: every row uses `seed`, as the reference script does.",
    )
    preset: Preset | None = Field(
        default=None,
        description="Resolution preset: how input media are resized (and the default t2i/t2v size). Image tasks: "
        "image_256res | image_512res | image_768res (default); video tasks: video_192p | video_360p | "
        "video_480p (default).",
    )
    height: int | None = Field(
        default=None, ge=16, le=MAX_SIDE, multiple_of=16, description="t2i/t2v output height in pixels."
    )
    width: int | None = Field(
        default=None, ge=16, le=MAX_SIDE, multiple_of=16, description="t2i/t2v output width in pixels."
    )
    frames: int | None = Field(
        default=None, ge=1, le=MAX_FRAMES, description="t2v/i2v output frames (default 49)."
    )
    fps: int | None = Field(
        default=None, ge=1, le=120, description="Frame rate of written videos (default 12)."
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, le=4096, description="x2t: most tokens generated per row (default 256)."
    )
    temperature: float | None = Field(
        default=None, ge=0, description="x2t: sampling temperature; 0 (default) is greedy decoding."
    )
    top_p: float | None = Field(
        default=None, gt=0, le=1, description="x2t: nucleus sampling mass (default 1.0)."
    )
    system_prompt: str | None = Field(
        default=None, description="x2t: system prompt (default: the reference's caption/answer prompt)."
    )

    @field_validator("cfg_interval")
    @classmethod
    def _ordered_interval(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not 0.0 <= value[0] <= value[1] <= 1.0:
            raise ValueError(f"must be [low, high] with 0 <= low <= high <= 1 (got {value})")
        return value


class ColumnMap(_Model):
    """Which source column holds each canonical field (unmapped: the canonical name itself)."""

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
    row_id: str | None = Field(default=None, description="Column with a stable row id (else derived).")

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
    format: Literal["auto", "jsonl", "csv", "parquet", "images", "videos"] = Field(
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

    @field_validator("path")
    @classmethod
    def _resolve_paths(cls, paths: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if paths is None:
            return None
        for p in paths:
            if not p:
                raise ValueError("an input path must not be empty")
        return [_resolve_path(p, info) for p in paths]

    @field_validator("prompt")
    @classmethod
    def _parse_template(cls, prompt: str | None) -> str | None:
        if prompt is not None:
            try:
                _PROMPT_ENV.parse(prompt)
            except jinja2.TemplateSyntaxError as err:
                raise ValueError(f"bad prompt template (template line {err.lineno}): {err.message}") from None
        return prompt

    @property
    def kind(self) -> Literal["rows", "path", "from_step"]:
        if self.rows is not None:
            return "rows"
        return "path" if self.path is not None else "from_step"


def _output_shorthand(value: Any) -> Any:
    """`output: some/dir` means `{path: some/dir}`."""
    return {"path": value} if isinstance(value, str) else value


class OutputSpec(_Model):
    """Where and how a step writes its Parquet dataset and media files."""

    path: str | None = Field(
        default=None,
        description="Output directory or URI; default `<job output>/<step name>`. May contain {run_date} / {run_id}.",
    )
    video_codec: Literal["h264", "ffv1"] = Field(
        default="h264", description="Video codec: h264 (.mp4, default), or ffv1 (lossless, .mkv)."
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None:
            return None
        return _resolve_path(_check_placeholders(path), info)


class Resources(_Model):
    """How much hardware a step's checkpoint group gets (the planner takes the largest per group)."""

    gpus: int | None = Field(
        default=None, ge=0, description="GPUs (one Lance actor each); default: all available; 0: CPU."
    )
    batch_size: int | None = Field(default=None, ge=1, description="Rows per model call; default: per task.")


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
    task: Task = Field(description="t2i | t2v | i2v | image_edit | video_edit | x2t_image | x2t_video.")
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
    def family(self) -> str:
        return TASK_FAMILY[self.task]

    def params_for(self, job: Job) -> Params:
        """Effective params: step params over job defaults over task defaults; only fields the task reads."""
        values: dict[str, Any] = {}
        for key in TASK_PARAMS[self.task]:
            for source in (self.params, job.defaults):
                if getattr(source, key) is not None:
                    values[key] = getattr(source, key)
                    break
            else:
                if key in TASK_DEFAULTS[self.task]:
                    values[key] = TASK_DEFAULTS[self.task][key]
        if "height" in TASK_PARAMS[self.task]:
            height, width = PRESET_SIZE[values["preset"]]
            values.setdefault("height", height)
            values.setdefault("width", width)
        return Params(**values)

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
        return _resolve_path(_check_placeholders(output), info)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Job:
        # load_job_text reports these itself, with positions; plain model_validate gets them here.
        if not (info.context or {}).get("positioned_checks"):
            problems = [p for s in self.steps for p in _step_problems(s)]
            problems += _defaults_problems(self.defaults, self.steps)
            problems += _graph_problems([s.model_dump() for s in self.steps])
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
        if family not in PRESETS:
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


# ---------------------------------------------------------------------------------------------
# Cross-field checks.  Each returns Problems whose path is relative to the checked object; the
# path picks the YAML position (the key itself when `at_key`), the message reads the same in
# every context.


class Problem(NamedTuple):
    path: tuple[Any, ...]
    message: str
    at_key: bool = False

    def under(self, *prefix: Any) -> Problem:
        return self._replace(path=prefix + self.path)


_ModelT = TypeVar("_ModelT", bound=BaseModel)


def _a(family: str) -> str:
    return "an image" if family == "image" else "a video"


def _needed_media(task: str) -> str:
    return "an image" if task in _NEEDS_IMAGE else "a video"


def _defaults_problems(defaults: Params, steps: list[Step]) -> list[Problem]:
    """A preset in `defaults` must suit every step that inherits it (paths relative to the job)."""
    for step in steps:
        presets = PRESETS[step.family]
        if step.params.preset is None and defaults.preset not in (None, *presets):
            message = (
                f"preset '{defaults.preset}' is not {_a(step.family)} preset, but step '{step.name}' "
                f"({step.task}) inherits it; set that step's params.preset to one of: {', '.join(presets)}"
            )
            return [Problem(("defaults", "preset"), message)]
    return []


def _step_problems(step: Step) -> list[Problem]:
    problems: list[Problem] = []
    task = step.task
    for key in sorted(step.params.model_fields_set - TASK_PARAMS[task]):
        if getattr(step.params, key) is not None:
            users = ", ".join(t for t in TASKS if key in TASK_PARAMS[t])
            message = f"param '{key}' does not apply to task {task} (it is used by: {users})"
            problems.append(Problem(("params", key), message, at_key=True))
    presets = PRESETS[step.family]
    if step.params.preset not in (None, *presets):
        message = (
            f"preset '{step.params.preset}' is not {_a(step.family)} preset (task {task}); "
            f"use one of: {', '.join(presets)}"
        )
        problems.append(Problem(("params", "preset"), message))
    if step.turns is not None and task not in EDIT_TASKS:
        message = f"'turns' is only for image_edit and video_edit, not {task}"
        problems.append(Problem(("turns",), message, at_key=True))
    problems += [p.under("input") for p in _input_problems(step)]
    return problems


def _input_problems(step: Step) -> list[Problem]:
    inp, task = step.input, step.task
    given = [k for k in ("rows", "path", "from_step") if getattr(inp, k) is not None]
    if not given:
        return [Problem((), "input needs exactly one of: rows, path, from_step")]
    if len(given) > 1:
        message = f"input needs exactly one of rows, path, from_step (got {' and '.join(given)})"
        return [Problem((given[1],), message, at_key=True)]
    problems: list[Problem] = []
    mapped = [c for c in PROMPT_COLUMNS if getattr(inp.columns, c) is not None]
    if len(mapped) > 1:
        message = f"map only one of columns.{' / columns.'.join(PROMPT_COLUMNS)}"
        problems.append(Problem(("columns", mapped[1]), message, at_key=True))
    if inp.prompt is not None and mapped:
        message = f"give either input.prompt or columns.{mapped[0]}, not both"
        problems.append(Problem(("prompt",), message, at_key=True))
    if step.turns is not None and (inp.prompt is not None or mapped):
        where = ("prompt",) if inp.prompt is not None else ("columns", mapped[0])
        message = "'turns' gives the instructions; remove the prompt/instruction from the input"
        problems.append(Problem(where, message, at_key=True))
    if inp.kind == "from_step" and inp.format != "auto":
        problems.append(Problem(("format",), "format does not apply to from_step inputs", at_key=True))
    if inp.kind == "path" and inp.format in ("images", "videos"):
        if inp.format == "images" and task in _NEEDS_VIDEO or inp.format == "videos" and task in _NEEDS_IMAGE:
            message = f"task {task} cannot read {inp.format} (it needs {_needed_media(task)})"
            problems.append(Problem(("format",), message))
        if task in _NEEDS_PROMPT and step.turns is None and inp.prompt is None:
            message = (
                f"task {task} needs a prompt, and a folder of {inp.format} has no columns: set input.prompt"
            )
            problems.append(Problem((), message))
    if inp.kind == "rows":
        problems += _rows_problems(step)
    return problems


def _rows_problems(step: Step) -> list[Problem]:
    """Inline rows are known at load time: check each row has the columns the task will read."""
    inp, task = step.input, step.task
    needed: list[tuple[str, tuple[str, ...]]] = []  # (what, column names that provide it)
    if task in _NEEDS_IMAGE:
        needed.append(("an image", (inp.columns.image or "image",)))
    if task in _NEEDS_VIDEO:
        needed.append(("a video", (inp.columns.video or "video",)))
    if task in _NEEDS_PROMPT and step.turns is None and inp.prompt is None:
        column = inp.columns.prompt_column()
        needed.append(("a prompt", (column,) if column else PROMPT_COLUMNS))
    template_columns = sorted(prompt_template_columns(inp.prompt)) if inp.prompt else []
    problems: list[Problem] = []
    for i, row in enumerate(inp.rows or []):
        for what, columns in needed:
            if not any(c in row for c in columns):
                names = " / ".join(repr(c) for c in columns)
                problems.append(
                    Problem(("rows", i), f"row {i} has no {names} column (task {task} needs {what})")
                )
        missing = [c for c in template_columns if c not in row]
        if missing:
            message = f"row {i} lacks column(s) {', '.join(missing)} used by the prompt template"
            problems.append(Problem(("rows", i), message))
    return problems


def _graph_problems(steps: list[Any]) -> list[Problem]:
    """Step names and from_step references, on raw step mappings (so it works on partial input)."""
    problems: list[Problem] = []
    index: dict[str, int] = {}
    for i, raw in enumerate(steps):
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and name in index:
            problems.append(Problem((i, "name"), f"duplicate step name '{name}' (also step {index[name]})"))
        elif isinstance(name, str):
            index[name] = i
    for i, raw in enumerate(steps):
        ref = _from_step(raw)
        if ref is None:
            continue
        where = (i, "input", "from_step")
        if ref not in index:
            known = ", ".join(index) or "none"
            problems.append(Problem(where, f"from_step '{ref}' is not a step of this job (steps: {known})"))
        elif index[ref] == i:
            problems.append(Problem(where, f"step '{ref}' cannot read its own output"))
        elif index[ref] > i:
            cycle = _cycle_through(steps, index, i)
            hint = f" (this forms a cycle: {' -> '.join(cycle)})" if cycle else ""
            message = f"from_step '{ref}' refers to a later step; a step can only read an earlier step's output{hint}"
            problems.append(Problem(where, message))
        else:
            task, producer = raw.get("task"), steps[index[ref]].get("task")
            carried = _ROWS_CARRY.get(producer)
            lacks_image = task in _NEEDS_IMAGE and "image" not in (carried or {"image"})
            lacks_video = task in _NEEDS_VIDEO and "video" not in (carried or {"video"})
            if lacks_image or lacks_video:
                message = f"task {task} needs {_needed_media(task)}, but step '{ref}' ({producer}) has none in its rows"
                problems.append(Problem(where, message))
    return problems


def _from_step(raw: Any) -> str | None:
    inp = raw.get("input") if isinstance(raw, dict) else None
    ref = inp.get("from_step") if isinstance(inp, dict) else None
    return ref if isinstance(ref, str) else None


def _cycle_through(steps: list[Any], index: dict[str, int], start: int) -> list[str]:
    """Follow from_step links from `start`; the names along the way if they come back to it."""
    names = [steps[start]["name"]]
    current = start
    for _ in range(len(steps)):
        ref = _from_step(steps[current])
        if ref is None or ref not in index:
            return []
        names.append(ref)
        current = index[ref]
        if current == start:
            return names
    return []


# ---------------------------------------------------------------------------------------------
# Loading and error reporting


@dataclass(frozen=True)
class SpecProblem:
    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class JobSpecError(JobFileError):
    """A job file with problems; `problems` lists all of them, in file order."""

    def __init__(self, problems: Iterable[SpecProblem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.col))
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray and multiprocessing pickle exceptions; rebuild from the problems, not the message.
        return (JobSpecError, (self.problems,))


def load_job(path: str | Path, env: Mapping[str, str] | None = None, *, check_paths: bool = False) -> Job:
    """Load and validate a job file; relative paths in it are resolved against its directory.

    `check_paths` also reports local input paths that do not exist on this machine (the CLI's
    validate/plan/run turn it on; a file can be valid where its inputs are not yet present).
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise JobSpecError([SpecProblem(str(path), 1, 1, f"cannot read job file: {err}")]) from None
    job = load_job_text(text, str(path), file.resolve().parent, env, check_paths=check_paths)
    job._source_path = str(file.resolve())
    return job


def load_job_text(
    text: str,
    filename: str = "<job>",
    base_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    check_paths: bool = False,
) -> Job:
    """Like `load_job` for text; `filename` is used in messages, `base_dir` for relative paths (default: cwd)."""
    loaded = load_yaml(text, os.environ if env is None else env)
    positions = loaded.positions

    def problem(loc: tuple[Any, ...], message: str, *, at_key: bool = False) -> SpecProblem:
        mark = positions.locate(loc, at_key=at_key)
        return SpecProblem(filename, mark.line, mark.col, message)

    yaml_problems = [SpecProblem(filename, m.line, m.col, msg) for m, msg in loaded.problems]
    if loaded.data is None:
        raise JobSpecError(yaml_problems)
    context = {"base_dir": os.path.abspath(base_dir or os.getcwd()), "positioned_checks": True}
    problems: list[SpecProblem] = []
    job: Job | None = None
    try:
        job = Job.model_validate(loaded.data, context=context)
    except ValidationError as err:
        problems += [_pydantic_problem(e, positions, problem) for e in err.errors(include_url=False)]
    for p in _positioned_checks(loaded.data):
        problems.append(
            problem(p.path, f"{_dotted(positions.resolve(p.path))}: {p.message}", at_key=p.at_key)
        )
    if job is not None and check_paths:
        problems += [problem(loc, message) for loc, message in _missing_inputs(job, loaded.data)]
    # A value the loader already flagged (an unset ${VAR}) is garbage: say nothing more about it.
    flagged = {(p.line, p.col) for p in yaml_problems}
    problems = yaml_problems + [p for p in problems if (p.line, p.col) not in flagged]
    if problems or job is None:
        raise JobSpecError(dict.fromkeys(problems))
    return job


def _missing_inputs(job: Job, data: Any) -> list[tuple[tuple[Any, ...], str]]:
    """Local input paths that do not exist and globs that match nothing, before any work starts.

    URIs (s3://, ...) are checked when the run lists them; model directories are not checked here,
    as a job submitted to a cluster may name a directory that exists only there.
    """
    found = []
    for i, step in enumerate(job.steps):
        raw = data["steps"][i]["input"].get("path")
        for j, path in enumerate(step.input.path or []):
            if is_uri(path):
                continue
            loc = ("steps", i, "input", "path", j) if isinstance(raw, list) else ("steps", i, "input", "path")
            if glob.has_magic(path):
                if not glob.glob(path, recursive=True):
                    found.append((loc, f"steps[{i}].input.path: {path} matches no files"))
            elif not os.path.exists(path):
                found.append((loc, f"steps[{i}].input.path: no such file or directory: {path}"))
    return found


def _positioned_checks(data: Any) -> list[Problem]:
    """Cross-field checks on whatever parts of the document validate on their own.

    A step with, say, one bad param value is still checked: the values pydantic rejected
    (already reported) are dropped and the rest validated again.  Checks that involve a
    dropped value are then skipped, since they would only echo the first problem.
    """
    if not isinstance(data, dict):
        return []
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list):
        return []
    defaults, _ = _validate_pruned(Params, data.get("defaults") or {})
    problems: list[Problem] = []
    steps: list[Step] = []
    for i, raw in enumerate(raw_steps):
        step, dropped = _validate_pruned(Step, raw)
        if step is None:
            continue
        steps.append(step)
        problems += [p.under("steps", i) for p in _step_problems(step) if not _overlaps(p.path, dropped)]
    if defaults is not None:
        problems += _defaults_problems(defaults, steps)
    problems += [p.under("steps") for p in _graph_problems(raw_steps)]
    return problems


def _overlaps(path: tuple[Any, ...], dropped: list[tuple[Any, ...]]) -> bool:
    """Whether `path` contains, or lies inside, one of the dropped locations."""
    return any(path[: len(loc)] == loc[: len(path)] for loc in dropped)


def _validate_pruned(model: type[_ModelT], raw: Any) -> tuple[_ModelT | None, list[tuple[Any, ...]]]:
    """Validate `raw`, or else `raw` without the values that failed; also returns what was dropped."""
    try:
        return model.model_validate(raw), []
    except ValidationError as err:
        dropped = [tuple(e["loc"]) for e in err.errors()]
    pruned = copy.deepcopy(raw)
    for loc in dropped:
        _drop(pruned, loc)
    try:
        return model.model_validate(pruned), dropped
    except ValidationError:
        return None, dropped


def _drop(data: Any, loc: tuple[Any, ...]) -> None:
    """Delete the mapping entry at `loc`, if there is one (list items are kept: indices matter)."""
    for part in loc[:-1]:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(data, dict):
        data.pop(loc[-1], None)


def _pydantic_problem(error: Any, positions: PositionMap, problem: Any) -> SpecProblem:
    loc: tuple[Any, ...] = tuple(error["loc"])
    kind = error["type"]
    # An unknown or missing key is a problem of the mapping that holds it.
    where = _dotted(positions.resolve(loc[:-1] if kind in ("missing", "extra_forbidden") else loc))
    prefix = f"{where}: " if where else ""
    if kind == "extra_forbidden":
        key = loc[-1]
        hint = _did_you_mean(str(key), _allowed_keys(loc[:-1]))
        return problem(loc, f"{prefix}unknown key '{key}'{hint}", at_key=True)
    if kind == "missing":
        return problem(loc[:-1], f"{prefix}missing required key '{loc[-1]}'")
    value = error.get("input")
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        what = "task" if loc and loc[-1] == "task" else "value"
        return problem(loc, f"{prefix}unknown {what} {value!r}; expected one of {expected}")
    if kind == "value_error":  # our own validators: the message already says what was wrong
        return problem(loc, prefix + error["msg"].removeprefix("Value error, "))
    message = _TYPE_MESSAGES.get(kind, error["msg"])
    if kind == "list_type" and loc and loc[-1] == "path":
        message = "expected a path or a list of paths"
    if value is None or isinstance(value, (str, int, float, bool)):
        message += f" (got {value!r})"
    return problem(loc, prefix + message)


# pydantic's wording names our classes ("instance of InputSpec"); say it in YAML terms.
_TYPE_MESSAGES = {
    "model_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
}


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at `loc` in a Job (for 'did you mean' hints)."""
    model: Any = Job
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; allowed: {', '.join(allowed)}" if allowed else ""


def job_json_schema() -> dict[str, Any]:
    """JSON Schema of a job file (what `specs/job.schema.json` holds)."""
    schema = Job.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lance-ray job"
    return schema


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["--schema"]:
        print("usage: python -m lance_ray.spec --schema > specs/job.schema.json", file=sys.stderr)
        return 2
    print(json.dumps(job_json_schema(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
