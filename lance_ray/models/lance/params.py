"""`Params`: every knob of Lance a job step or a Python caller can set, with its type and range —
but no defaults.

A field left unset is `None` here. Which params a task reads and what each defaults to is the task's
business (`tasks.py`, the only copy of every default); `TaskSpec.resolve` fills them in. The job
spec and `LancePipeline`'s methods validate through this one model.

Models are pydantic v2 in strict mode: a quoted "30" is not a number and `true` is not 1. Floats
must be finite (`.inf` and `.nan` are YAML floats, never a useful setting).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .presets import MAX_FRAMES, MAX_SIDE, PRESETS, SIZE_MULTIPLE

Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
SeedMode = Literal["per_row", "official"]
MAX_SEED = 2**63  # seeds are int64 in every table and torch generator
MAX_NEW_TOKENS = 4096  # most tokens an understanding row may generate


class StrictModel(BaseModel):
    """Base of every job-file model: strict types, unknown keys rejected, immutable, finite floats."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class Params(StrictModel):
    """Sampling and output parameters. Every field is optional; the task's defaults fill the rest."""

    steps: int | None = Field(default=None, ge=1, le=1000, description="Denoising steps.")
    shift: float | None = Field(default=None, gt=0, description="Flow-matching timestep shift.")
    cfg_scale: float | None = Field(
        default=None, ge=0, description="Text classifier-free guidance scale (≤ 1 disables CFG)."
    )
    cfg_interval: list[float] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="[low, high]: CFG is applied on steps with low < sigma <= high.",
    )
    cfg_renorm_min: float | None = Field(
        default=None, ge=0, le=1, description="Lower clamp of the global CFG renormalisation."
    )
    fp8: bool | None = Field(
        default=None,
        description="Speed mode: the generation expert's matmuls in FP8 (e4m3, per-token and per-channel scales). "
        "Needs FP8 matmuls (CUDA compute capability 8.9+); elsewhere the exact path runs, with a warning. "
        "Difference measured on random weights; quality with the published weights not verified here.",
    )
    step_cache: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Speed mode (0 = off): a step reuses its deep layers' last output when the first layer's "
        "output changed by less than this relative amount since the last full step, per CFG branch "
        "(First-Block-Cache). Difference measured on random weights; quality with the published weights not "
        "verified here.",
    )
    cfg_parallel: bool | None = Field(
        default=None,
        description="Speed mode: the unconditional CFG branch on a second GPU of the same actor (the step's "
        "actors get 2 GPUs each), for latency; same result as one GPU up to rounding.",
    )
    seed: int | None = Field(default=None, ge=0, lt=MAX_SEED, description="Base seed.")
    seed_mode: SeedMode | None = Field(
        default=None,
        description="`per_row`: each row's seed is derived from `seed` and its row_id, and every random draw of "
        "the row comes from it, so results do not depend on batching or order. `official`: every row uses "
        "`seed`, and every other draw (the VAE posterior sample of i2v/edit inputs, crop offsets, caption "
        "instructions, the noise of seed 0) is the official script's: each row is one official run.",
    )
    preset: Preset | None = Field(
        default=None,
        description="Resolution preset: how input media are resized (and the default t2i/t2v size). Image "
        "tasks take image presets, video tasks video presets.",
    )
    height: int | None = Field(
        default=None,
        ge=SIZE_MULTIPLE,
        le=MAX_SIDE,
        description=f"t2i/t2v output height in pixels (floored to a multiple of {SIZE_MULTIPLE}, as the official "
        "script does).",
    )
    width: int | None = Field(
        default=None,
        ge=SIZE_MULTIPLE,
        le=MAX_SIDE,
        description=f"t2i/t2v output width in pixels (floored to a multiple of {SIZE_MULTIPLE}).",
    )
    frames: int | None = Field(default=None, ge=1, le=MAX_FRAMES, description="t2v/i2v output frames.")
    fps: int | None = Field(default=None, ge=1, le=120, description="Frame rate of written videos.")
    max_new_tokens: int | None = Field(
        default=None, ge=1, le=MAX_NEW_TOKENS,
        description="x2t: most tokens generated per row (an input column `max_new_tokens` overrides it per row).",
    )
    temperature: float | None = Field(
        default=None, ge=0, description="x2t: sampling temperature; 0 is greedy decoding."
    )
    top_p: float | None = Field(default=None, gt=0, le=1, description="x2t: nucleus sampling mass.")
    system_prompt: str | None = Field(
        default=None, description="x2t: system prompt (unset: the reference's caption instruction)."
    )

    @field_validator("cfg_interval")
    @classmethod
    def _ordered_interval(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not 0.0 <= value[0] <= value[1] <= 1.0:
            raise ValueError(f"must be [low, high] with 0 <= low <= high <= 1 (got {value})")
        return value

    def given(self) -> dict[str, object]:
        """The fields that were set (not None)."""
        return {name: value for name, value in self if value is not None}
