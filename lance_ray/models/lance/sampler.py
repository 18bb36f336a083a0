"""Flow-matching sampler of Lance: schedule, per-sample initial noise, CFG with global renorm, Euler step.

Facts reproduced (official `modeling/lance/lance.py`, `Lance.validation_gen_KVcache`):

* Schedule: ``t_i = linspace(1, 0, N + 1)`` and ``σ_i = s·t_i / (1 + (s − 1)·t_i)`` in float32 (s = shift).
  Step i feeds σ_i to the model and integrates ``x ← x − v·(σ_i − σ_{i+1})``; v predicts noise − data.
* CFG runs only on steps with ``lo < σ_i ≤ hi`` (the comparison is done in float32, as the reference does)
  and only when the scale is > 1; with a scale ≤ 1 there is no unconditional branch at all.
  ``v = v_u + s·(v_c − v_u)``, then the "global" renorm ``v ← v · clamp(‖v_c‖ / (‖v‖ + 1e−8), min, 1)``
  with Frobenius norms over each sample's whole (tokens × 48) velocity block.
* Noise: each sample has its own seed; ``torch.randn(n_rows, 48)`` from a CPU generator seeded with it,
  where n_rows counts *all* latent rows of the sample (conditioning rows included); the denoised target
  takes the tail of the draw.  On CPU this is exactly the reference's draw for the same seed (the reference
  run with one sample per batch on rank 0 seeds its generator with the seed itself).  Drawing on the CPU
  makes a seed mean the same noise on every device (`seed_mode: per_row`).  The reference draws on its
  device -- CUDA Philox on a GPU, other values -- and treats a seed ≤ 0 as "unseeded" (its global
  generator); here every int is a seed.  `seed_mode: official` draws as the reference does instead
  (official_random.py).

Everything here is batched over B samples of the same shape; the per-step CFG decision is precomputed on
the host so that the denoising loop never waits on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .settings import SamplerSettings

LATENT_CHANNELS = 48
# Added to the CFG norm in the renorm ratio to avoid 0/0 (reference constant).
_RENORM_EPS = 1e-8


def schedule_sigmas(steps: int, shift: float) -> torch.Tensor:
    """σ_0 = 1 > σ_1 > … > σ_N = 0, float32 on the CPU: ``[steps + 1]``."""
    t = torch.linspace(1, 0, steps + 1)
    # Same operation order as the reference so the float32 values match bit for bit.
    return shift * t / (1 + (shift - 1) * t)


def cfg_steps(settings: SamplerSettings) -> list[bool]:
    """Per step, whether the unconditional branch runs and CFG is applied (host-side list)."""
    if settings.cfg_scale <= 1.0:
        return [False] * settings.steps
    sigmas = schedule_sigmas(settings.steps, settings.shift)[:-1]
    lo, hi = settings.cfg_interval
    return ((sigmas > lo) & (sigmas <= hi)).tolist()


@dataclass(frozen=True)
class Schedule:
    """A settings' schedule on a device: what the denoising loop indexes per step."""

    sigmas: torch.Tensor  # [N + 1] float32, σ fed at step i is sigmas[i]
    step_sizes: torch.Tensor  # [N] float32, σ_i − σ_{i+1}
    cfg_on: tuple[bool, ...]  # [N] host booleans

    @classmethod
    def build(cls, settings: SamplerSettings, device: torch.device | str = "cpu") -> Schedule:
        sigmas = schedule_sigmas(settings.steps, settings.shift)
        return cls(
            sigmas=sigmas.to(device),
            step_sizes=(sigmas[:-1] - sigmas[1:]).to(device),
            cfg_on=tuple(cfg_steps(settings)),
        )

    @property
    def steps(self) -> int:
        return len(self.cfg_on)


def initial_noise(seed: int, n_rows: int, keep_last: int | None = None) -> torch.Tensor:
    """The reference's initial noise for one sample, drawn on the CPU in float32.

    Returns the last ``keep_last`` rows (all when None) of ``randn(n_rows, 48)``: ``[keep_last, 48]``.
    The caller moves it to its device/dtype (a bfloat16 draw on the CPU is the float32 draw rounded).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(n_rows, LATENT_CHANNELS, generator=generator, dtype=torch.float32)
    if keep_last is None:
        return noise
    if not 0 < keep_last <= n_rows:
        raise ValueError(f"keep_last must be in 1..{n_rows}, got {keep_last}")
    return noise[n_rows - keep_last :]


def apply_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, renorm_min: float) -> torch.Tensor:
    """Text CFG with the reference's "global" renorm, per sample.

    v_cond, v_uncond: [B, N, 48] velocities of the same rows; returns [B, N, 48].
    """
    v = v_uncond + scale * (v_cond - v_uncond)
    return v * renorm_scale(v_cond, v, renorm_min)


def renorm_scale(v_cond: torch.Tensor, v_cfg: torch.Tensor, renorm_min: float) -> torch.Tensor:
    """``clamp(‖v_c‖ / (‖v_cfg‖ + 1e−8), renorm_min, 1)`` per sample: [B, N, 48] x2 -> [B, 1, 1]."""
    norm_cond = torch.linalg.vector_norm(v_cond, dim=(-2, -1), keepdim=True)
    norm_cfg = torch.linalg.vector_norm(v_cfg, dim=(-2, -1), keepdim=True)
    return (norm_cond / (norm_cfg + _RENORM_EPS)).clamp(min=renorm_min, max=1.0)


def euler_step(x: torch.Tensor, v: torch.Tensor, step_size: torch.Tensor) -> torch.Tensor:
    """One flow-matching Euler step toward data: ``x − v·(σ_i − σ_{i+1})`` (step_size a 0-d tensor)."""
    return x - v * step_size
