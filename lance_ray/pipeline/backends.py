"""What a worker actor runs rows through: the real Lance model, or the explicit `debug` backend.

A backend serves every task of one checkpoint family. The worker hands it one sub-batch at a time:
rows of one step (one task, one settings object), which the backend runs as one batched call.

The `debug` backend exists for exercising the pipeline without a model (it produces labelled, obviously
synthetic outputs). It is only ever used when a job file says `backend: debug`, and the CLI says so
loudly; it is never a default. To exercise timeouts it can stand for a slow model: a row whose prompt
starts with `[debug:sleep=SECONDS]` takes that long.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lance_ray.models.lance import DecodeSettings, GenerationSettings, TaskSpec
from lance_ray.spec import ModelRef

Settings = DecodeSettings | GenerationSettings
_SLEEP = re.compile(r"\[debug:sleep=(\d+(?:\.\d+)?)\]")


@dataclass
class TaskInput:
    """One row's model inputs: its prompt, its seed and its decoded input media (if the task takes any):
    uint8 [H, W, 3] for an image, frame-sampled uint8 [T, H, W, 3] for a video. Understanding rows come
    already resized to the ViT stream by the CPU stage (`resized`)."""

    prompt: str | None
    seed: int
    media: np.ndarray | None = None
    resized: bool = False
    max_new_tokens: int | None = None  # understanding: this row's own cap (else the step's)


@dataclass
class TaskOutput:
    """One row's result: `text` for understanding, `pixels` (uint8 [H, W, 3] or [T, H, W, 3]) otherwise,
    or `error` when this row alone failed."""

    text: str | None = None
    pixels: np.ndarray | None = None
    error: str | None = None


class Backend(Protocol):
    name: str
    model_id: str
    model_revision: str
    load_info: dict[str, Any]  # load time, peak memory ... (reported once per actor)

    def run(self, task: TaskSpec, inputs: list[TaskInput], settings: Settings) -> list[TaskOutput]: ...


class LanceBackend:
    """The clean-room Lance implementation (lance_ray.models.lance), driven by one GPU thread
    (`serving.GpuLoop`): caption rows from every concurrent call share its continuous-batching engine,
    generation calls run whole in between. Safe to call from several threads."""

    name = "lance"
    takes_resized_media = True  # understanding media come resized to the ViT stream by the CPU stage

    def __init__(self, model: ModelRef, family: str, *, understanding_only: bool = False) -> None:
        from lance_ray.models.lance import LancePipeline
        from lance_ray.pipeline.serving import GpuLoop

        self.pipeline = LancePipeline.from_pretrained(
            model.source, family=family, revision=model.revision, device=model.device, dtype=model.precision,
            understanding_only=understanding_only,
        )
        self.gpu = GpuLoop(self.pipeline)
        self._warm_up(family)
        self.model_id = model.source
        self.model_revision = self.pipeline.revision or model.revision or "local"
        self.load_info = dataclasses.asdict(self.pipeline.load_stats)

    def run(self, task: TaskSpec, inputs: list[TaskInput], settings: Settings) -> list[TaskOutput]:
        text = isinstance(settings, DecodeSettings)
        if text and settings.seed_mode != "official":
            return self._understand(task, inputs, settings)
        # Generation, and official-mode captions (one row a call, its full-size media: the official run's draws
        # pick the ViT crop), run whole on the GPU thread.
        if text and len(inputs) == 1 and inputs[0].max_new_tokens is not None:
            settings = dataclasses.replace(settings, max_new_tokens=inputs[0].max_new_tokens)
        media = None if task.input_media is None else [row.media for row in inputs]
        results = self.gpu.call(lambda: self.pipeline.run(task, media, [row.prompt or "" for row in inputs],
                                                          seeds=[row.seed for row in inputs], settings=settings))
        return [TaskOutput(text=r) if text else TaskOutput(pixels=r) for r in results]

    def _warm_up(self, family: str) -> None:
        """Answer one tiny question before the first batch arrives: kernel compilation and the first CUDA
        graph then happen while the CPU stages are still decoding the first rows, not in front of them."""
        from lance_ray.models.lance import tasks_of

        task = next(t for t in tasks_of(family) if t.output == "text")
        media = np.zeros((1 if task.input_media == "image" else 2, 56, 56, 3), np.uint8)
        request = self.pipeline.understanding_request(media, "", kind=task.input_media, seed=0, max_new_tokens=2,
                                                      settings=task.settings_for(), resized=True)
        self.gpu.answer([request])[0].result()

    def _understand(self, task: TaskSpec, inputs: list[TaskInput], settings: DecodeSettings) -> list[TaskOutput]:
        requests, outputs = [], [TaskOutput() for _ in inputs]
        for index, row in enumerate(inputs):
            try:  # tokenising and layout happen here, on the caller's thread, not the GPU's
                requests.append(self.pipeline.understanding_request(
                    row.media, row.prompt, kind=task.input_media, settings=settings, seed=row.seed,
                    max_new_tokens=row.max_new_tokens, resized=row.resized, tag=index))
            except Exception as exc:
                outputs[index].error = f"{type(exc).__name__}: {exc}"
        for request, future in zip(requests, self.gpu.answer(requests), strict=True):
            try:
                outputs[request.tag].text = self.pipeline.decode_answer(future.result())
            except Exception as exc:
                outputs[request.tag].error = f"{type(exc).__name__}: {exc}"
        return outputs


class DebugBackend:
    """Synthetic outputs with the right shapes, for pipeline tests; never a silent default."""

    name = "debug"
    takes_resized_media = False  # never reads pixels: the CPU stage need not resize them
    model_revision = "debug"
    load_info: dict[str, Any] = {}

    def __init__(self, model: ModelRef, family: str) -> None:
        self.model_id = f"debug:{family}"

    def run(self, task: TaskSpec, inputs: list[TaskInput], settings: Settings) -> list[TaskOutput]:
        for row in inputs:
            match = _SLEEP.match(row.prompt or "")
            if match:
                time.sleep(float(match.group(1)))
        return [self._one(task, row, settings) for row in inputs]

    def _one(self, task: TaskSpec, row: TaskInput, settings: Settings) -> TaskOutput:
        digest = hashlib.sha256(f"{task.name}|{row.prompt}|{row.seed}".encode()).hexdigest()[:12]
        if task.output == "text":
            shape = "x".join(str(n) for n in row.media.shape) if row.media is not None else "none"
            return TaskOutput(text=f"[debug backend: not a model output] {task.name} {shape} {digest}")
        assert isinstance(settings, GenerationSettings)
        rng = np.random.default_rng(int(digest, 16))  # depends on prompt and seed, like a model's output
        if row.media is not None:  # edits and i2v keep their input's size
            height, width = row.media.shape[-3], row.media.shape[-2]
        else:
            height, width = settings.height, settings.width
        # a video edit keeps its input's length; t2v / i2v make `frames`
        frames = 1 if task.output == "image" else settings.frames or row.media.shape[0]
        pixels = rng.integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
        return TaskOutput(pixels=pixels[0] if task.output == "image" else pixels)


BACKENDS: dict[str, type[LanceBackend] | type[DebugBackend]] = {"lance": LanceBackend, "debug": DebugBackend}


def load_backend(model: ModelRef, family: str, *, understanding_only: bool = False) -> Backend:
    """The actor's backend; `understanding_only` (every step of the group writes text) lets the model
    leave its generation weights unloaded."""
    if model.backend == "debug":
        return DebugBackend(model, family)
    return LanceBackend(model, family, understanding_only=understanding_only)
