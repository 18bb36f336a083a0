"""Sampler parity with the official code's fp32 KV-path goldens.

Fixtures: tests/fixtures/golden/fp32_kv/<task>/generation.safetensors + generation_meta.json, trimmed from
/work/shared/lance/golden/fp32_kv/<task>/ (tensors.safetensors / meta.json / input.json written by the
official code on the tiny checkpoint).  Renamed there: ``x_t_init_denoised`` = x_t_init[denoised_rows],
``final_latent_target`` = the target's final_latent_j, ``cond_latent`` = vae_enc_sample_0 as (t, h, w, 48)
(i2v: latent frame 0 only); trajectories keep every recorded step for t2i/t2v, steps 0, 1 and the last
recorded one otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lance_ray.models.lance.params import Params
from lance_ray.models.lance.sampler import (
    Schedule,
    apply_cfg,
    cfg_steps,
    euler_step,
    initial_noise,
    renorm_scale,
    schedule_sigmas,
)
from lance_ray.models.lance.settings import SamplerSettings
from lance_ray.models.lance.tasks import TASKS as TASK_SPECS

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "fp32_kv"
TASKS = ["t2i", "t2v", "i2v", "image_edit", "video_edit"]


def _sampler(**params) -> SamplerSettings:
    """Denoising settings as a job step or LancePipeline gets them: the task defaults, `params` over them."""
    return TASK_SPECS["t2i"].settings_for(**params).sampler


def _golden(task: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(GOLDEN / task / "generation.safetensors")
    meta = json.loads((GOLDEN / task / "generation_meta.json").read_text())
    return tensors, meta


def _settings(meta: dict) -> SamplerSettings:
    s = meta["sampler"]
    return SamplerSettings(
        steps=s["num_timesteps"],
        shift=s["timestep_shift"],
        cfg_scale=s["cfg_text_scale"],
        cfg_interval=tuple(s["cfg_interval"]),
        cfg_renorm_min=s["cfg_renorm_min"],
    )


def test_defaults_are_the_reference_defaults() -> None:
    _, meta = _golden("t2i")  # the goldens ran with the reference's defaults
    assert _settings(meta) == _sampler()


@pytest.mark.parametrize("task", TASKS)
def test_schedule_matches_golden_bitwise(task: str) -> None:
    tensors, meta = _golden(task)
    settings = _settings(meta)
    assert torch.equal(schedule_sigmas(settings.steps, settings.shift), tensors["schedule_sigmas"])
    schedule = Schedule.build(settings)
    fed = torch.tensor(meta["timesteps_fed"], dtype=torch.float32)
    assert torch.equal(schedule.sigmas[:-1], fed)
    assert torch.equal(schedule.step_sizes, tensors["schedule_sigmas"][:-1] - tensors["schedule_sigmas"][1:])
    assert list(schedule.cfg_on) == meta["cfg_applied_per_step"]
    assert cfg_steps(settings) == meta["cfg_applied_per_step"]


@pytest.mark.parametrize("task", TASKS)
def test_initial_noise_is_the_reference_draw(task: str) -> None:
    tensors, meta = _golden(task)
    n_rows = tensors["timestep_vector_step0"].shape[0]  # every latent row of the sample, conditions included
    n_target = tensors["denoised_rows"].shape[0]
    seed = meta["sampler"]["validation_noise_seed"]
    noise = initial_noise(seed, n_rows, keep_last=n_target)
    assert noise.dtype == torch.float32
    assert torch.equal(noise, tensors["x_t_init_denoised"])
    assert torch.equal(initial_noise(seed, n_rows)[-n_target:], noise)
    assert not torch.equal(initial_noise(seed + 1, n_rows, keep_last=n_target), noise)


@pytest.mark.parametrize("task", TASKS)
def test_cfg_with_global_renorm_matches_golden(task: str) -> None:
    tensors, meta = _golden(task)
    settings = _settings(meta)
    v_cond = tensors["step0_v_cond_target_span"][None]
    v_uncond = tensors["step0_v_uncond_target_span"][None]
    v = apply_cfg(v_cond, v_uncond, settings.cfg_scale, settings.cfg_renorm_min)
    torch.testing.assert_close(v[0], tensors["step0_v_cfg_renormed_target_span"], rtol=1e-5, atol=1e-6)
    scale = renorm_scale(v_cond, v_uncond + settings.cfg_scale * (v_cond - v_uncond), settings.cfg_renorm_min)
    assert scale.shape == (1, 1, 1)
    assert scale.item() == pytest.approx(meta["step0_cfg_renorm_scale"], rel=1e-6)


def test_cfg_is_per_sample_in_a_batch() -> None:
    # i2v and video_edit have target spans of the same size (532 rows); a third sample whose unconditional
    # velocity is pushed away gets a renorm ratio < 1 while the two goldens have ratio 1.
    goldens = [_golden(task)[0] for task in ("i2v", "video_edit")]
    v_cond = [g["step0_v_cond_target_span"] for g in goldens]
    v_uncond = [g["step0_v_uncond_target_span"] for g in goldens]
    v_cond.append(v_cond[1])
    v_uncond.append(v_uncond[1] - v_cond[1])
    v_cond_b, v_uncond_b = torch.stack(v_cond), torch.stack(v_uncond)
    ratios = renorm_scale(v_cond_b, v_uncond_b + 4.0 * (v_cond_b - v_uncond_b), 0.0).flatten()
    assert ratios[2] < 0.99 and ratios[0] == ratios[1] == 1.0
    batched = apply_cfg(v_cond_b, v_uncond_b, 4.0, 0.0)
    for b, g in enumerate(goldens):
        torch.testing.assert_close(batched[b], g["step0_v_cfg_renormed_target_span"], rtol=1e-5, atol=1e-6)
    alone = apply_cfg(v_cond_b[2:], v_uncond_b[2:], 4.0, 0.0)
    torch.testing.assert_close(batched[2:], alone, rtol=1e-6, atol=1e-7)


def test_renorm_floor() -> None:
    tensors, meta = _golden("t2i")  # its step-0 ratio is below 0.95
    assert meta["step0_cfg_renorm_scale"] < 0.95
    v_cond = tensors["step0_v_cond_target_span"][None]
    v_uncond = tensors["step0_v_uncond_target_span"][None]
    raw = v_uncond + 4.0 * (v_cond - v_uncond)
    torch.testing.assert_close(apply_cfg(v_cond, v_uncond, 4.0, 0.95), 0.95 * raw)


@pytest.mark.parametrize("task", TASKS)
def test_first_euler_step_reproduces_the_trajectory(task: str) -> None:
    tensors, meta = _golden(task)
    assert tensors["x_t_trajectory_steps"][:2].tolist() == [0, 1]
    schedule = Schedule.build(_settings(meta))
    x0, x1 = tensors["x_t_trajectory"][0], tensors["x_t_trajectory"][1]
    assert torch.equal(x0, tensors["x_t_init_denoised"])
    # The velocity span covers the whole target; for i2v its head is the clean frame 0, not integrated.
    v = tensors["step0_v_cfg_renormed_target_span"][-x0.shape[0] :]
    torch.testing.assert_close(euler_step(x0, v, schedule.step_sizes[0]), x1, rtol=1e-5, atol=1e-6)


def test_scale_at_most_one_means_no_unconditional_branch() -> None:
    for scale in (1.0, 0.5):
        settings = _sampler(cfg_scale=scale)
        assert not any(cfg_steps(settings))
        assert cfg_steps(settings) == [False] * settings.steps
    assert any(cfg_steps(_sampler()))
    # An interval that no σ falls into also needs no unconditional branch.
    assert not any(cfg_steps(_sampler(cfg_interval=(0.999, 0.9995))))


def test_cfg_interval_bounds_are_lower_exclusive_upper_inclusive() -> None:
    settings = _sampler(steps=4, shift=1.0, cfg_interval=(0.5, 0.75))  # σ = 1, .75, .5, .25
    assert cfg_steps(settings) == [False, True, False, False]


def test_settings_validation() -> None:
    # Values are checked once, by Params, on the way in (job file or Python call), never again.
    with pytest.raises(ValueError, match="steps"):
        _sampler(steps=0)
    with pytest.raises(ValueError, match="shift"):
        _sampler(shift=0.0)
    with pytest.raises(ValueError, match="cfg_interval"):
        _sampler(cfg_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="finite"):
        Params(cfg_scale=float("inf"))
    with pytest.raises(TypeError, match="does not read frames"):
        _sampler(frames=5)
    assert _sampler(cfg_interval=[0.4, 1.0]) == _sampler(cfg_interval=(0.4, 1.0)) == _sampler()
    with pytest.raises(ValueError, match="keep_last"):
        initial_noise(42, 4, keep_last=5)
