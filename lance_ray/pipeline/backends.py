"""What a worker actor runs rows through: the real Lance model, or the explicit `debug` backend.

A backend serves every task of one checkpoint family. The worker hands it one sub-batch at a time:
rows of the same task, the same parameters and the same input shape, so the backend can run them as
one batched call.

The `debug` backend exists for exercising the pipeline without a model (it produces labelled, obviously
synthetic outputs). It is only ever used when a job file says `backend: debug`, and the CLI says so
loudly; it is never a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lance_ray.spec import ModelRef, Params

TEXT_TASKS = frozenset({"x2t_image", "x2t_video"})
IMAGE_OUTPUT_TASKS = frozenset({"t2i", "image_edit"})


@dataclass
class TaskInput:
    """One row's model inputs. `image` is uint8 [H, W, 3]; `video` is frame-sampled uint8 [T, H, W, 3]."""

    prompt: str | None
    seed: int
    image: np.ndarray | None = None
    video: np.ndarray | None = None


@dataclass
class TaskOutput:
    """One row's result: `text` for understanding, `pixels` (uint8 [H, W, 3] or [T, H, W, 3]) otherwise."""

    text: str | None = None
    pixels: np.ndarray | None = None


class Backend(Protocol):
    name: str
    model_id: str
    model_revision: str
    load_info: dict[str, Any]  # load time, peak memory ... (reported once per actor)

    def run(self, task: str, inputs: list[TaskInput], params: Params) -> list[TaskOutput]: ...


class LanceBackend:
    """The clean-room Lance implementation (lance_ray.models.lance)."""

    name = "lance"

    def __init__(self, model: ModelRef, family: str) -> None:
        from lance_ray.models.lance.pipeline import LancePipeline

        self.pipeline = LancePipeline.from_pretrained(
            model.source, family=family, revision=model.revision, device=model.device, dtype=model.precision
        )
        self.model_id = model.source
        self.model_revision = self.pipeline.revision or model.revision or "local"
        self.load_info = dataclasses.asdict(self.pipeline.load_stats)

    def run(self, task: str, inputs: list[TaskInput], params: Params) -> list[TaskOutput]:
        pipe = self.pipeline
        seeds = [row.seed for row in inputs]
        prompts = [row.prompt or "" for row in inputs]
        if task in TEXT_TASKS:
            media = [row.image for row in inputs] if task == "x2t_image" else [row.video for row in inputs]
            method = pipe.x2t_image if task == "x2t_image" else pipe.x2t_video
            texts = method(media, prompts, seeds=seeds, **_understanding_kwargs(params))
            return [TaskOutput(text=text) for text in texts]
        sampling = _sampling_kwargs(params)
        if task == "t2i":
            pixels = pipe.t2i(prompts, height=params.height, width=params.width, seeds=seeds, **sampling)
        elif task == "t2v":
            pixels = pipe.t2v(prompts, height=params.height, width=params.width, frames=params.frames,
                              seeds=seeds, **sampling)
        elif task == "i2v":
            pixels = pipe.i2v([row.image for row in inputs], prompts, preset=params.preset, frames=params.frames,
                              seeds=seeds, **sampling)
        elif task == "image_edit":
            pixels = pipe.image_edit([row.image for row in inputs], prompts, preset=params.preset, seeds=seeds,
                                     **sampling)
        elif task == "video_edit":
            pixels = pipe.video_edit([row.video for row in inputs], prompts, preset=params.preset, seeds=seeds,
                                     **sampling)
        else:
            raise ValueError(f"unknown task {task!r}")
        return [TaskOutput(pixels=array) for array in pixels]


def _understanding_kwargs(params: Params) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "preset": params.preset,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.system_prompt is not None:
        kwargs["system_prompt"] = params.system_prompt
    return kwargs


def _sampling_kwargs(params: Params) -> dict[str, Any]:
    return {
        "steps": params.steps,
        "shift": params.shift,
        "cfg_scale": params.cfg_scale,
        "cfg_interval": tuple(params.cfg_interval),
        "cfg_renorm_min": params.cfg_renorm_min,
    }


class DebugBackend:
    """Synthetic outputs with the right shapes, for pipeline tests; never a silent default."""

    name = "debug"
    model_revision = "debug"
    load_info: dict[str, Any] = {}

    def __init__(self, model: ModelRef, family: str) -> None:
        self.model_id = f"debug:{family}"

    def run(self, task: str, inputs: list[TaskInput], params: Params) -> list[TaskOutput]:
        return [self._one(task, row, params) for row in inputs]

    def _one(self, task: str, row: TaskInput, params: Params) -> TaskOutput:
        digest = hashlib.sha256(f"{task}|{row.prompt}|{row.seed}".encode()).hexdigest()[:12]
        if task in TEXT_TASKS:
            media = row.image if row.image is not None else row.video
            shape = "x".join(str(n) for n in media.shape) if media is not None else "none"
            return TaskOutput(text=f"[debug backend: not a model output] {task} {shape} {digest}")
        rng = np.random.default_rng(int(digest, 16))  # depends on prompt and seed, like a model's output
        if task in ("image_edit", "video_edit", "i2v"):
            source = row.image if row.image is not None else row.video
            height, width = source.shape[-3], source.shape[-2]
        else:
            height, width = params.height, params.width
        frames = 1 if task in IMAGE_OUTPUT_TASKS else (
            row.video.shape[0] if task == "video_edit" else params.frames)
        pixels = rng.integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
        return TaskOutput(pixels=pixels[0] if task in IMAGE_OUTPUT_TASKS else pixels)


def load_backend(model: ModelRef, family: str) -> Backend:
    if model.backend == "debug":
        return DebugBackend(model, family)
    return LanceBackend(model, family)
