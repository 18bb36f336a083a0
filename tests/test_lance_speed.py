"""Generation speed work on CPU: the exact path's restructuring keeps results (fused projections, majority
routing, padded-key attention, chunked MLP and VAE decode, memory-aware batches), and the opt-in speed
modes (fp8, step_cache, cfg_parallel) run end to end with the shapes and plumbing they need.  Their speed and
their differences at real shapes are measured on a GPU by benchmarks/bench_generation.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lance_ray.models.lance import branches, generate, transformer
from lance_ray.models.lance.config import LLMConfig
from lance_ray.models.lance.fp8 import fp8_available, fp8_linear, quantize_weight
from lance_ray.models.lance.generate import GenerationInput, denoise, generate_media, text_rows
from lance_ray.models.lance.memory import GenerationFootprint, GenerationShape, largest_batch
from lance_ray.models.lance.pipeline import LancePipeline
from lance_ray.models.lance.settings import SpeedSettings
from lance_ray.models.lance.tasks import TASKS
from lance_ray.models.lance.transformer import Expert, KVCache, Routing, Split, group_rows
from lance_ray.models.lance.vae import VAEConfig, WanVAE, random_vae_state_dict
from lance_ray.spec import load_job_text

EXACT = SpeedSettings(fp8=False, step_cache=0.0, cfg_parallel=False)


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path) -> LancePipeline:
    return LancePipeline.from_pretrained(str(tiny_ckpt), family="image", device="cpu", dtype="float32")


def _sampler(**params):
    return TASKS["t2i"].settings_for(**params).sampler


def _inputs() -> list[GenerationInput]:
    # Different prompt lengths: the conditional rows' cached prefixes differ (padded, masked attention).
    return [GenerationInput("A red fox sitting in fresh snow.", (1, 6, 6), 1),
            GenerationInput("Two cats playing chess in a library, warm light, 35mm film.", (1, 6, 6), 2)]


# ---------------------------------------------------------------------------------------------------
# The exact path, restructured
# ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def test_fused_projections_compute_the_separate_ones() -> None:
    cfg = LLMConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=16, mrope_section=(2, 3, 3))
    expert = Expert(cfg)
    for p in expert.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(7, 64)
    q = expert.q_norm(expert.q_proj(x).unflatten(-1, (-1, 16)))
    k = expert.k_norm(expert.k_proj(x).unflatten(-1, (-1, 16)))
    v = expert.v_proj(x).unflatten(-1, (-1, 16))
    mlp = expert.down_proj(torch.nn.functional.silu(expert.gate_proj(x)) * expert.up_proj(x))
    expert.fuse_projections()
    assert not hasattr(expert, "q_proj") and expert.qkv_proj.weight.shape == (4 * 16 + 2 * 2 * 16, 64)
    for ours, separate in zip(expert.qkv(x, 16), (q, k, v), strict=True):
        torch.testing.assert_close(ours, separate, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(expert.mlp(x), mlp, rtol=1e-6, atol=1e-6)


@torch.inference_mode()
def test_mlp_in_token_chunks_equals_one_call(monkeypatch: pytest.MonkeyPatch, pipe: LancePipeline) -> None:
    expert = pipe.model.llm.layers[0].gen
    x = torch.randn(50, pipe.model.llm_cfg.hidden_size)
    whole = expert.mlp(x)
    monkeypatch.setattr(transformer, "MLP_CHUNK_TOKENS", 16)
    torch.testing.assert_close(expert.mlp(x), whole, rtol=1e-6, atol=1e-6)


@torch.inference_mode()
def test_majority_routing_equals_gather_scatter_routing(monkeypatch: pytest.MonkeyPatch, pipe: LancePipeline) -> None:
    """The denoising query's layout: per row two und tokens around many gen tokens."""
    llm = pipe.model.llm
    rows, n = 3, 70
    gen_mask = torch.ones(rows, n, dtype=torch.bool)
    gen_mask[:, 0] = gen_mask[:, -1] = False
    gen_mask = gen_mask.flatten()
    x = torch.randn(rows * n, llm.cfg.hidden_size)
    pos = torch.arange(rows * n).expand(3, -1)
    layout = [[Split(n, False)]] * rows
    majority = Routing(gen_mask)
    assert majority.majority == "gen" and majority.minority_index.tolist() == [0, 69, 70, 139, 140, 209]
    monkeypatch.setattr(Routing, "MAJORITY_ROUTING_SHARE", 0.0)
    split = Routing(gen_mask)
    assert split.majority is None
    torch.testing.assert_close(llm(x, pos, layout, routing=majority), llm(x, pos, layout, routing=split),
                               rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_query_rows_with_many_cached_lengths_share_a_padded_batch(pipe: LancePipeline) -> None:
    llm = pipe.model.llm
    H = llm.cfg.hidden_size
    g = torch.Generator().manual_seed(3)
    prefixes = [5, 9, 9, 2, 7, 3, 4]  # 6 lengths: rows 1 and 2 share one, the other five are alone
    cache = KVCache(llm.cfg, len(prefixes), 16, "cpu", torch.float32)
    llm(torch.randn(sum(prefixes), H, generator=g), torch.arange(sum(prefixes)).expand(3, -1),
        [[Split(n, True)] for n in prefixes], cache=cache)
    n = 6
    query = torch.randn(len(prefixes) * n, H, generator=g)
    qpos = (torch.arange(len(prefixes) * n) + 20).expand(3, -1)
    rows = [[Split(n, False)]] * len(prefixes)
    groups = group_rows(rows, cache, torch.device("cpu"), pad_cached=True)
    assert [(g.rows, g.key_mask is None) for g in groups] == [([0, 3, 4, 5, 6], False), ([1, 2], True)]
    assert groups[0].key_mask.shape == (5, 1, 1, 7 + n) and groups[1].token_index == slice(n, 3 * n)
    assert len(group_rows(rows[:4], cache, torch.device("cpu"), pad_cached=True)) == 3  # few lengths: exact
    batched = llm(query, qpos, rows, cache=cache, update_cache=False)
    for b in range(len(prefixes)):  # each row alone: its own cache row only, no padding
        alone_rows = [[Split(n, False)] if r == b else [] for r in range(len(prefixes))]
        alone = llm(query[n * b : n * b + n], qpos[:, n * b : n * b + n], alone_rows, cache=cache,
                    update_cache=False)
        torch.testing.assert_close(batched[n * b : n * b + n], alone, rtol=1e-5, atol=1e-5)
    assert cache.lens == prefixes  # read, never extended


def test_vae_decode_in_chunks_equals_one_pass() -> None:
    """Frame by frame at full resolution (vae.py's default) and image chunks equal the unchunked decode."""
    vae = WanVAE.from_state_dict(random_vae_state_dict(VAEConfig.small(), 0))
    z = torch.randn(3, 48, 2, 4, 5, generator=torch.Generator().manual_seed(0))
    frame_by_frame = vae.decode(z)
    assert frame_by_frame.shape == (3, 3, 5, 64, 80)
    vae.decoder.per_frame_from = len(vae.decoder.upsamples)  # every stage on all 4 frames at once
    whole = vae.decode(z)
    torch.testing.assert_close(frame_by_frame, whole, rtol=0, atol=1e-5)
    by_image = torch.cat([vae.decode(z[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(by_image, whole, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Memory-aware batches
# ---------------------------------------------------------------------------------------------------
def _footprint(target: tuple[int, int, int], conditions: int = 0) -> GenerationFootprint:
    t, h, w = target
    shape = GenerationShape(target_tokens=t * h * w, condition_tokens=conditions, pixels_per_frame=256 * h * w,
                            cfg=True)
    return GenerationFootprint.of(LLMConfig.lance_3b(), 256, 2, shape)


def test_memory_model_at_real_shapes() -> None:
    """The issue's goals on a 24 GB card: weights of the image family take ~13.8 GB (load measurement), the
    video family's ~15.2 GB (plus the VAE)."""
    t2i = _footprint((1, 48, 48))
    assert all(t2i.batch_bytes(b) < t2i.batch_bytes(b + 1) for b in range(1, 16))
    assert largest_batch(t2i, int(24e9 - 13.8e9), cap=16) >= 4
    assert largest_batch(t2i, None, cap=16) == 16  # no budget (CPU): the cap
    assert largest_batch(t2i, 0, cap=16) == 1  # never below one sample
    t2v_121 = _footprint((31, 30, 53))
    assert t2v_121.batch_bytes(1) < 24e9 - 15.2e9 - 1.4e9
    assert t2i.decode_chunk(8, None) == 8 and t2i.decode_chunk(8, t2i.batch_bytes(8, 3)) == 3


def test_generate_media_splits_what_does_not_fit(monkeypatch: pytest.MonkeyPatch, pipe: LancePipeline) -> None:
    rows = text_rows(["a red fox", "a lighthouse", "a bowl of ramen"], 64, 64, 1, [1, 2, 3])
    settings = _sampler(steps=2)
    together = generate_media(pipe.model, pipe.tokenizer, None, "t2i", rows, settings, preset="image_768res",
                              return_latents=True)
    sizes: list[int] = []
    real_denoise = generate.denoise

    def spy(model, tokenizer, task, inputs, settings, **kwargs):
        sizes.append(len(inputs))
        return real_denoise(model, tokenizer, task, inputs, settings, **kwargs)

    footprint = generate._footprint(pipe.model, None, TASKS["t2i"], rows[0].target, settings)
    monkeypatch.setattr(generate, "denoise", spy)
    monkeypatch.setattr(generate, "free_gpu_bytes", lambda device: footprint.batch_bytes(2))
    apart = generate_media(pipe.model, pipe.tokenizer, None, "t2i", rows, settings, preset="image_768res",
                           return_latents=True)
    assert sizes == [2, 1]
    for a, b in zip(together, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Opt-in speed modes
# ---------------------------------------------------------------------------------------------------
def test_speed_params_in_job_files_and_the_python_api() -> None:
    text = ("name: d\nsteps:\n  - {name: s, task: t2v, input: {rows: [{prompt: p}]},\n"
            "     params: {fp8: true, step_cache: 0.05, cfg_parallel: true}}\n")
    job = load_job_text(text, "d.yaml", "/jobs")
    step = job.steps[0]
    assert step.spec.settings(step.params_for(job)).speed == SpeedSettings(True, 0.05, True)
    assert TASKS["t2i"].settings_for().speed == EXACT  # every mode is off unless asked for
    with pytest.raises(ValueError, match="step_cache"):
        TASKS["t2i"].settings_for(step_cache=2.0)
    with pytest.raises(TypeError, match="x2t_image does not read fp8"):
        TASKS["x2t_image"].settings_for(fp8=True)


def test_fp8_linear_is_the_dequantised_matmul() -> None:
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(5, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    w8 = quantize_weight(weight, bias)
    assert w8.weight.dtype == torch.float8_e4m3fn and w8.scale.shape == (1, 32)
    x_scale = x.abs().amax(1, keepdim=True) / 448
    x_deq = (x / x_scale).to(torch.float8_e4m3fn).float() * x_scale
    reference = x_deq @ (w8.weight.float() * w8.scale.T).T + w8.bias.float()
    torch.testing.assert_close(fp8_linear(x, w8), reference, rtol=2e-2, atol=2e-2)  # bf16 output
    exact = x @ weight.T + bias
    assert ((fp8_linear(x, w8) - exact).norm() / exact.norm()) < 0.05


@torch.inference_mode()
def test_fp8_mode_runs_the_gen_expert_in_fp8(pipe: LancePipeline) -> None:
    assert fp8_available(torch.device("cpu"))  # this torch's CPU build has the FP8 matmul
    settings = _sampler(steps=3)
    exact = denoise(pipe.model, pipe.tokenizer, "t2i", _inputs(), settings)
    fast = denoise(pipe.model, pipe.tokenizer, "t2i", _inputs(), settings, speed=SpeedSettings(True, 0.0, False))
    assert fast.shape == exact.shape and torch.isfinite(fast).all()
    difference = ((fast - exact).norm() / exact.norm()).item()
    assert 0 < difference < 0.2
    assert pipe.model.llm.layers[0].gen._fp8 is not None and pipe.model.llm.layers[0].und._fp8 is None


@torch.inference_mode()
def test_fp8_without_fp8_matmuls_warns_and_runs_exact(monkeypatch: pytest.MonkeyPatch, pipe: LancePipeline,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(generate, "fp8_available", lambda device: False)
    settings = _sampler(steps=2)
    with caplog.at_level(logging.WARNING):
        fast = denoise(pipe.model, pipe.tokenizer, "t2i", _inputs(), settings, speed=SpeedSettings(True, 0.0, False))
    assert "FP8 matmuls are not available" in caplog.text
    torch.testing.assert_close(fast, denoise(pipe.model, pipe.tokenizer, "t2i", _inputs(), settings))


def test_step_cache_skips_on_small_changes_and_keeps_per_branch_state() -> None:
    cache = branches.StepCache(threshold=0.1)
    base = torch.ones(4, 8)
    assert not cache.can_skip(base)  # first step: nothing to reuse
    cache.deep_residual = torch.zeros(4, 8)
    assert cache.can_skip(base * 1.05)  # 5% change
    assert not cache.can_skip(base * 1.12)  # 5% + 6.7% accumulated: over the threshold -> full step
    assert cache.can_skip(base * 1.13)  # accumulation restarted at the full step
    assert cache.skipped == 2


@torch.inference_mode()
def test_step_cache_mode(pipe: LancePipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _sampler(steps=6)
    exact = denoise(pipe.model, pipe.tokenizer, "t2i", _inputs(), settings)
    lanes: list[branches.Lane] = []
    real_lanes = generate._lanes
    monkeypatch.setattr(generate, "_lanes", lambda *a: lanes.extend(real_lanes(*a)) or lanes)
    cached = denoise(pipe.model, pipe.tokenizer, "t2i", _inputs(), settings, speed=SpeedSettings(False, 0.5, False))
    skipped = lanes[0].skipped_steps()
    assert set(skipped) == {"cond", "uncond"} and skipped["cond"] > 0
    assert cached.shape == exact.shape and torch.isfinite(cached).all()
    assert 0 < ((cached - exact).norm() / exact.norm()).item() < 1.0
    # A threshold nothing stays under runs every step in full: the exact result.
    lanes.clear()
    full = denoise(pipe.model, pipe.tokenizer, "t2i", _inputs(), settings, speed=SpeedSettings(False, 1e-9, False))
    assert lanes[0].skipped_steps() == {"cond": 0, "uncond": 0}
    torch.testing.assert_close(full, exact, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_cfg_parallel_runs_the_branches_on_their_own_lanes(pipe: LancePipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two lanes, each with its own KV cache and forward (here both on the CPU), give the joint result."""
    settings = _sampler(steps=4)
    exact = denoise(pipe.model, pipe.tokenizer, "t2i", _inputs(), settings)
    lanes: list[branches.Lane] = []
    real_lanes = generate._lanes
    monkeypatch.setattr(generate, "_lanes", lambda *a: lanes.extend(real_lanes(*a)) or lanes)
    parallel = denoise(pipe.model, pipe.tokenizer, "t2i", _inputs(), settings,
                       speed=SpeedSettings(False, 0.0, True), uncond_device="cpu")
    assert [lane.branches for lane in lanes] == [("cond",), ("uncond",)]
    assert [lane.cache.batch for lane in lanes] == [2, 2]
    torch.testing.assert_close(parallel, exact, rtol=1e-5, atol=1e-5)


def test_cfg_parallel_without_a_second_gpu_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert generate._second_gpu(torch.device("cpu")) is None
    assert "cfg_parallel needs two GPUs" in caplog.text


def test_replicate_copies_parameters_and_buffers_without_fp8_copies(pipe: LancePipeline) -> None:
    layer = pipe.model.llm.layers[0]
    layer.gen.fp8_weights()
    copy = branches.replicate(layer, torch.device("cpu"))
    assert copy.gen._fp8 is None and layer.gen._fp8 is not None
    assert copy.gen is not layer.gen and torch.equal(copy.gen.qkv_proj.weight, layer.gen.qkv_proj.weight)
    assert torch.equal(copy.gen.qk_norm_weight, layer.gen.qk_norm_weight)


def test_speed_modes_through_the_python_api(pipe: LancePipeline) -> None:
    images = pipe.t2i(["a red fox"], height=64, width=64, steps=3, seeds=[1], fp8=True, step_cache=0.2)
    assert images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8
