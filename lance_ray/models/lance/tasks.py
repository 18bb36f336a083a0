"""The seven Lance tasks, one `TaskSpec` each: the one home of every fact about a task.

This is the model's own vocabulary (torch-free, like presets.py and settings.py beside it): what
Lance can do, with the official script's defaults. It lives in the model package so that
`LancePipeline` takes its defaults from it without importing anything above the model.

A TaskSpec says which checkpoint family serves the task, what a row must bring (input media, a
prompt) and what the task writes, which params it reads and their defaults (the ONLY copy of every
default in the project), the planner's batch size and cost, and how validated params become the
settings object the model takes. Every other layer reads it: the job spec validates against it, the
JSON Schema and specs/README.md tables are generated from it, the planner, the sources, the worker
and `LancePipeline`'s friendly methods all go through it.

Adding a task = one TaskSpec here + its `LancePipeline` method (named like the task) + its token
layout in `sequence.py` (ARCHITECTURE.md walks through an example).

Importable without torch or ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from .params import Params
from .presets import PRESETS, SIZE_MULTIPLE, Family
from .settings import DecodeSettings, GenerationSettings, SamplerSettings, SpeedSettings

MediaKind = Literal["image", "video"]
OutputKind = Literal["text", "image", "video"]
# What users call a row's text, by task; an input table may hold it under any of these names.
PROMPT_COLUMNS = ("prompt", "instruction", "question")

# Defaults of the official inference script (`inference_lance.sh` and its config dataclasses).
_SEEDING = {"seed": 42, "seed_mode": "per_row"}
_DENOISING = {"steps": 30, "shift": 3.5, "cfg_scale": 4.0, "cfg_interval": [0.4, 1.0], "cfg_renorm_min": 0.0,
              # lance-ray's opt-in speed modes: off, i.e. the exact path, unless asked for
              "fp8": False, "step_cache": 0.0, "cfg_parallel": False}
_DECODING = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "system_prompt": None}
# The official NUM_FRAMES is 50: 13 latent frames, which decode to 49 frames. We name the 49 the
# output has (50 and 49 give the same video).
_VIDEO_OUT = {"frames": 49, "fps": 12}
# `height`/`width` default to the preset's output size (`Preset.output_size`), hence None here.
_SIZE = {"height": None, "width": None}
# Longest prompt / instruction / question a row may bring, in characters (counted before tokenizing, in
# the CPU stage that reads rows, where the tokenizer is not loaded). Qwen2's tokenizer makes about one
# token per 4 characters of English text and about one per character of CJK text, so this is at most
# a few thousand tokens: far below the context, and a bound on what one row can cost (attention is
# quadratic in the prompt).
MAX_PROMPT_CHARS = 8192


def floor_to_multiple(pixels: int) -> int:
    """An output side as the model makes it: floored to a multiple of 16 (one latent = 16 pixels)."""
    return pixels // SIZE_MULTIPLE * SIZE_MULTIPLE


# A video's latent frames: the VAE keeps the first frame and compresses each 4 after it into one.
TEMPORAL_COMPRESSION = 4
# Frames of an input video (video_edit) when planning: the official clip length (NUM_FRAMES).
PLANNED_INPUT_FRAMES = 49
# Seconds on each GPU type per second on an H100 (benchmarks/fit_costs.py: t2i 768² at batch 8 on both).
GPU_SPEED: Mapping[str, float] = MappingProxyType({"h100": 1.0, "h200": 0.9605})


def work_units(task: TaskSpec, params: Params, input_frames: int | None = None) -> float:
    """What one row asks of the model, in the unit its CostModel counts: new tokens for understanding;
    denoising steps x latent tokens of the output for generation (height/16 x width/16 x latent frames;
    an edit or i2v is its preset's size, a video edit as long as its input, PLANNED_INPUT_FRAMES unless
    told)."""
    if task.output == "text":
        return float(params.max_new_tokens)
    height, width = (params.height, params.width) if params.height else PRESETS[params.preset].output_size
    frames = 1 if task.output == "image" else params.frames or input_frames or PLANNED_INPUT_FRAMES
    latent_frames = (frames - 1) // TEMPORAL_COMPRESSION + 1
    return float(params.steps * (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE) * latent_frames)


@dataclass(frozen=True)
class CostModel:
    """GPU seconds per row on an H100 at the task's default batch: `fixed + per_unit * work_units(...)`.

    `fixed` is what does not grow with the work (VAE, ViT, text encoding). Both are fitted to
    benchmarks/results/ by benchmarks/fit_costs.py (affine where two shapes were measured, proportional
    where one was; tests/test_cost.py checks these numbers against it). Other GPU types scale by GPU_SPEED.
    A guide for `lance-ray plan`, not a promise."""

    fixed: float
    per_unit: float

    def seconds(self, work: float, gpu_type: str = "h100") -> float:
        return (self.fixed + self.per_unit * work) * GPU_SPEED[gpu_type]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: Family  # which checkpoint serves it (image: Lance_3B, video: Lance_3B_Video)
    input_media: MediaKind | None  # what a row must bring besides text (None: prompt only)
    output: OutputKind  # what it writes: a caption/answer, a PNG, or a video
    prompt_required: bool  # captions and answers may go without a question
    prompt_name: str  # what users call the row's text: prompt | instruction | question
    defaults: Mapping[str, Any]  # params it reads -> default (None: derived, or absent by default)
    batch_size: int  # rows per model call when the step does not say
    cost: CostModel
    multi_turn: bool = False  # `turns:` chains instructions, each on the previous turn's result
    summary: str = ""  # one line for docs
    max_prompt_chars: int = MAX_PROMPT_CHARS  # a longer prompt is a row error

    def gpu_seconds_per_row(self, params: Params, gpu_type: str = "h100") -> float:
        """Estimated GPU seconds of one row with these (resolved) params: the planner's cost."""
        return self.cost.seconds(work_units(self, params), gpu_type)

    @property
    def params(self) -> frozenset[str]:
        """Names of the params this task reads."""
        return frozenset(self.defaults)

    @property
    def conditioning(self) -> Literal["none", "source", "first_frame"]:
        """What a generation task conditions on besides text: nothing (t2i, t2v); the whole source, through
        the ViT and the VAE (edits: media in and out of one kind); or one image that becomes the first
        latent frame of a video (i2v)."""
        if self.input_media is None:
            return "none"
        return "source" if self.input_media == self.output else "first_frame"

    @property
    def carries(self) -> frozenset[MediaKind]:
        """Media a row of this task's output offers a `from_step` reader: what it generated, plus the
        input media it copies through (a caption row still points at its image)."""
        kinds = {self.input_media, None if self.output == "text" else self.output}
        return frozenset(k for k in kinds if k is not None)

    def resolve(self, *layers: Params) -> Params:
        """Effective params: the first layer that sets a param wins (step, then job defaults), else the
        task default; only the params this task reads. The output size comes from the preset when unset
        and is floored to multiples of 16 (the official rule), so the params record the size used."""
        values: dict[str, Any] = {}
        for name, default in self.defaults.items():
            values[name] = next((v for layer in layers if (v := getattr(layer, name)) is not None), default)
        if "height" in values:
            height, width = PRESETS[values["preset"]].output_size
            values["height"] = floor_to_multiple(values["height"] or height)
            values["width"] = floor_to_multiple(values["width"] or width)
        return Params(**values)

    def resolve_kwargs(self, kwargs: Mapping[str, Any]) -> Params:
        """Params given as Python keyword arguments (the `LancePipeline` methods): validated by `Params`
        (lax: a tuple for `cfg_interval` or an int for a float is fine), then `resolve`d."""
        unknown = sorted(set(kwargs) - self.params)
        if unknown:
            raise TypeError(f"{self.name} does not read {', '.join(unknown)} "
                            f"(it reads: {', '.join(sorted(self.params))})")
        return self.resolve(Params.model_validate(kwargs, strict=False))

    def settings_for(self, **kwargs: Any) -> DecodeSettings | GenerationSettings:
        """Settings from keyword params, task defaults for the rest: `TASKS["t2i"].settings_for(steps=8)`."""
        return self.settings(self.resolve_kwargs(kwargs))

    def settings(self, params: Params) -> DecodeSettings | GenerationSettings:
        """The settings object the model takes, from params already resolved by `resolve`."""
        if self.output == "text":
            return DecodeSettings(
                preset=params.preset,
                seed_mode=params.seed_mode,
                max_new_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                system_prompt=params.system_prompt,
            )
        sampler = SamplerSettings(
            steps=params.steps,
            shift=params.shift,
            cfg_scale=params.cfg_scale,
            cfg_interval=(params.cfg_interval[0], params.cfg_interval[1]),
            cfg_renorm_min=params.cfg_renorm_min,
        )
        speed = SpeedSettings(fp8=params.fp8, step_cache=params.step_cache, cfg_parallel=params.cfg_parallel)
        return GenerationSettings(sampler, speed, params.preset, params.seed_mode, params.height, params.width,
                                  params.frames)


def _task(name: str, family: Family, input_media: MediaKind | None, output: OutputKind, *,
          defaults: dict[str, Any], batch_size: int, cost: CostModel, prompt_name: str = "prompt",
          prompt_required: bool = True, multi_turn: bool = False, summary: str = "") -> TaskSpec:
    preset = "image_768res" if family == "image" else "video_480p"
    return TaskSpec(name, family, input_media, output, prompt_required, prompt_name,
                    MappingProxyType({**_SEEDING, "preset": preset, **defaults}), batch_size, cost,
                    multi_turn, summary)


# Costs: fitted by benchmarks/fit_costs.py to benchmarks/results/ (H100, bf16, each task's default batch).
_T2V_COST = CostModel(7.163, 3.385e-05)
TASKS: Mapping[str, TaskSpec] = MappingProxyType({t.name: t for t in (
    _task("t2i", "image", None, "image", defaults={**_DENOISING, **_SIZE}, batch_size=4,
          cost=CostModel(0, 2.973e-05), summary="text to image"),
    _task("image_edit", "image", "image", "image", defaults=_DENOISING, batch_size=4,
          cost=CostModel(0, 3.633e-05), prompt_name="instruction", multi_turn=True,
          summary="edit an image by an instruction"),
    _task("x2t_image", "image", "image", "text", defaults=_DECODING, batch_size=64,
          cost=CostModel(0, 0.0005146), prompt_name="question", prompt_required=False,
          summary="caption an image or answer a question about it"),
    _task("t2v", "video", None, "video", defaults={**_DENOISING, **_SIZE, **_VIDEO_OUT}, batch_size=1,
          cost=_T2V_COST, summary="text to video"),
    _task("i2v", "video", "image", "video", defaults={**_DENOISING, **_VIDEO_OUT}, batch_size=1,
          cost=_T2V_COST, summary="animate an image (its first frame)"),
    _task("video_edit", "video", "video", "video", defaults={**_DENOISING, "fps": _VIDEO_OUT["fps"]},
          batch_size=1, cost=CostModel(25.37, 4.182e-05), prompt_name="instruction", multi_turn=True,
          summary="edit a video by an instruction"),
    _task("x2t_video", "video", "video", "text", defaults=_DECODING, batch_size=8,
          cost=CostModel(0, 0.03086), prompt_name="question", prompt_required=False,
          summary="caption a video or answer a question about it"),
)})
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
FAMILIES: tuple[Family, ...] = ("image", "video")


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}") from None


def tasks_of(family: str) -> tuple[TaskSpec, ...]:
    return tuple(t for t in TASKS.values() if t.family == family)
