"""What the model takes besides prompts, media and seeds: one frozen settings object per kind of task.

These are plain values, importable without torch. They carry no defaults and do no validation: the
task registry (`lance_ray.models.lance.tasks`) owns every default and builds them from parameters the job
spec (or the Python API, through the same spec) has already validated.
"""

from __future__ import annotations

from dataclasses import dataclass

from .params import SeedMode


@dataclass(frozen=True)
class SamplerSettings:
    """Denoising: flow-matching schedule and classifier-free guidance, shared by a batch."""

    steps: int
    shift: float  # timestep shift s of sigma = s*t / (1 + (s - 1)*t)
    cfg_scale: float  # <= 1 disables the unconditional branch
    cfg_interval: tuple[float, float]  # CFG on steps with low < sigma <= high
    cfg_renorm_min: float  # lower clamp of the global CFG renormalisation


@dataclass(frozen=True)
class SpeedSettings:
    """Opt-in speed modes of generation, each off unless a job or caller asks (their differences from the exact
    path: benchmarks/README.md)."""

    fp8: bool  # the generation expert's matmuls in FP8
    step_cache: float  # First-Block-Cache threshold; 0 = every step runs every layer
    cfg_parallel: bool  # the unconditional CFG branch on a second GPU


@dataclass(frozen=True)
class GenerationSettings:
    """t2i / t2v / i2v / image_edit / video_edit."""

    sampler: SamplerSettings
    speed: SpeedSettings
    preset: str  # how conditioning media are resized (edits, i2v)
    # per_row: every draw from the row's seed; official: a call's rows are one run of the official script,
    # whose global generators give ε, the crop offsets and a seed-0 noise (official_random.py)
    seed_mode: SeedMode
    height: int | None = None  # t2i / t2v output size; other tasks follow their input's bucket
    width: int | None = None
    frames: int | None = None  # t2v / i2v output frames; None for images and edits


@dataclass(frozen=True)
class DecodeSettings:
    """x2t_image / x2t_video: greedy (temperature 0) or nucleus sampling."""

    preset: str  # how the input media are resized for the ViT
    # official: a call's rows are one official run, whose draws give the caption instruction of a row without a
    # system prompt and the ViT crop offsets (official_random.py)
    seed_mode: SeedMode
    max_new_tokens: int
    temperature: float
    top_p: float
    system_prompt: str | None  # None: the official default caption instruction
