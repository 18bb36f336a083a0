"""Generation parity with the official code (fp32, KV path) on the tiny checkpoint, and batching.

Goldens: tests/fixtures/golden/fp32_kv/<task>/generation.* (see tests/test_lance_sampler.py for how they
were trimmed).  The golden VAE is the full-size random one, so the conditions it produced are injected:
``cond_latent`` (the sampled VAE posterior the official run used) and, for edits, the ViT output
``vit_out_0`` (the ViT itself is tested in the understanding tests).  Everything else -- layouts, position
ids, noise, prefill, 30 denoising steps with CFG -- is ours.  tests/fixtures/golden/bf16_kv/t2i/generation.safetensors
holds final_latent_0 (as ``final_latent_target``) and the step-0 velocities of the official bf16 run
(/work/shared/lance/golden/bf16_kv/t2i).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import official_runs
import pytest
import torch
from safetensors.torch import load_file

from lance_ray.models.lance import generate, preprocess
from lance_ray.models.lance.generate import GenerationInput, StepInfo, denoise, generate_media, media_rows
from lance_ray.models.lance.pipeline import LancePipeline
from lance_ray.models.lance.sampler import cfg_steps
from lance_ray.models.lance.settings import SamplerSettings
from lance_ray.models.lance.tasks import TASKS as TASK_SPECS

FIXTURES = Path(__file__).parent / "fixtures" / "golden"


def _sampler(**params) -> SamplerSettings:
    return TASK_SPECS["t2i"].settings_for(**params).sampler


GOLDEN = FIXTURES / "fp32_kv"
TASKS = ["t2i", "t2v", "i2v", "image_edit", "video_edit"]


@pytest.fixture(scope="module")
def pipes(tiny_ckpt: Path) -> dict[str, LancePipeline]:
    return {
        family: LancePipeline.from_pretrained(str(tiny_ckpt), family=family, device="cpu", dtype="float32")
        for family in ("image", "video")
    }


@pytest.fixture(scope="module")
def models(pipes: dict[str, LancePipeline]) -> dict[str, tuple]:
    return {family: (pipe.model, pipe.tokenizer) for family, pipe in pipes.items()}


def _golden_media() -> tuple[np.ndarray, np.ndarray]:
    """The golden input image (H, W, 3) and 5-frame video (T, H, W, 3); both are already of their bucket's
    size (304x224), so the official VAE-stream input is the media itself."""
    d = load_file(FIXTURES / "inputs" / "preprocess_fp32_kv.safetensors")
    image = d["image.vae_input_u8_cthw"][:, 0].permute(1, 2, 0).numpy()
    video = d["video.vae_input_u8_cthw"].permute(1, 2, 3, 0).numpy()
    return image, video


def _golden(task: str) -> tuple[dict[str, torch.Tensor], dict]:
    return (
        load_file(GOLDEN / task / "generation.safetensors"),
        json.loads((GOLDEN / task / "generation_meta.json").read_text()),
    )


def _golden_input(task: str, prompt: str | None = None, seed: int = 42) -> GenerationInput:
    g, meta = _golden(task)
    t, h, w, _ = g["final_latent_target"].shape
    kwargs = {}
    if "vit_out_0" in g:
        gt, gh, gw = g["vit_grid_thw_0"][0].tolist()  # ViT patch grid; the LLM sees merged 2x2 groups
        kwargs.update(vit_tokens=g["vit_out_0"], vit_grid=(gt, gh // 2, gw // 2))
    if "cond_latent" in g:
        kwargs["cond_latent"] = g["cond_latent"]
    return GenerationInput(prompt if prompt is not None else meta["prompt"], (t, h, w), seed, **kwargs)


def _max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


class _Recorder:
    """Keeps copies of what the steps listed in the golden trajectory saw, plus every call's positions."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self.x: dict[int, torch.Tensor] = {}
        self.step0: StepInfo | None = None

    def __call__(self, info: StepInfo) -> None:
        if info.step in self.steps:
            self.x[info.step] = info.x.clone()
        if info.step == 0:
            self.step0 = StepInfo(
                0,
                info.sigma.clone(),
                info.query.clone(),
                info.x.clone(),
                info.v_cond.clone(),
                None if info.v_uncond is None else info.v_uncond.clone(),
                info.v.clone(),
            )


@pytest.mark.parametrize("task", TASKS)
def test_denoising_matches_official(task: str, models, monkeypatch: pytest.MonkeyPatch) -> None:
    g, meta = _golden(task)
    model, tok = models[meta["model_family"]]
    calls: list[tuple[torch.Tensor, list]] = []
    forward = model.llm.forward

    def recording_forward(x, pos, rows, **kwargs):
        calls.append((pos.clone(), [[s.length for s in r] for r in rows]))
        return forward(x, pos, rows, **kwargs)

    monkeypatch.setattr(model.llm, "forward", recording_forward)
    rec = _Recorder(g["x_t_trajectory_steps"].tolist())
    latents = denoise(model, tok, task, [_golden_input(task)], _sampler(), on_step=rec)

    # Position ids fed to the model: prefill (cond row, then uncond row) + the first step's two queries.
    (prefill_pos, prefill_rows), (query_pos, query_rows) = calls[0], calls[1]
    n_cond, n_uncond = (sum(r) for r in prefill_rows)
    n_query = query_rows[0][0]
    assert query_rows == [[n_query], [n_query]]
    cond = torch.cat([prefill_pos[:, :n_cond], query_pos[:, :n_query]], dim=1)
    uncond = torch.cat([prefill_pos[:, n_cond:], query_pos[:, n_query:]], dim=1)
    assert torch.equal(cond, g["position_ids_cond"])
    assert torch.equal(uncond, g["position_ids_uncond"])  # including the official KV-path quirk
    # One prefill, then one batched call per step (cond + uncond rows together, or cond only).
    assert len(calls) == 1 + meta["sampler"]["num_timesteps"]
    assert [len(r) for _, r in calls[1:]] == [2] * len(calls[1:])
    cfg_calls = [sum(1 for row in r if row) == 2 for _, r in calls[1:]]
    assert cfg_calls == meta["cfg_applied_per_step"]

    step0 = rec.step0
    assert torch.equal(step0.x[0], g["x_t_init_denoised"])  # the official initial noise, bit for bit
    assert _max_rel(step0.query[0], g["step0_cond_query_embeds"]) < 1e-5
    assert _max_rel(step0.v_cond[0], g["step0_v_cond_target_span"]) < 1e-4
    assert _max_rel(step0.v_uncond[0], g["step0_v_uncond_target_span"]) < 1e-4
    assert _max_rel(step0.v[0], g["step0_v_cfg_renormed_target_span"]) < 1e-4
    for k, step in enumerate(g["x_t_trajectory_steps"].tolist()):
        assert _max_rel(rec.x[step][0], g["x_t_trajectory"][k]) < 1e-3, f"step {step}"
    assert latents.shape == (1, *g["final_latent_target"].shape)
    assert _max_rel(latents[0], g["final_latent_target"]) < 1e-3
    if task == "i2v":  # latent frame 0 is the clean first frame, untouched
        assert torch.equal(latents[0, :1], g["cond_latent"])


def test_bfloat16_matches_the_official_bfloat16_run(tiny_ckpt: Path) -> None:
    """Loose bounds (golden README §5): the official bf16 flow has hard-coded casts ours need not copy."""
    golden = load_file(FIXTURES / "bf16_kv" / "t2i" / "generation.safetensors")
    pipe = LancePipeline.from_pretrained(str(tiny_ckpt), family="image", device="cpu", dtype="bfloat16")
    seen: list[StepInfo] = []
    latents = denoise(pipe.model, pipe.tokenizer, "t2i", [_golden_input("t2i")], _sampler(),
                      on_step=lambda s: seen.append(s) if s.step == 0 else None)
    assert latents.dtype == torch.bfloat16

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.nn.functional.cosine_similarity(a.float().flatten(), b.flatten(), dim=0).item()

    assert cos(seen[0].v_cond[0], golden["step0_v_cond_target_span"]) > 0.9999
    assert cos(seen[0].v[0], golden["step0_v_cfg_renormed_target_span"]) > 0.999
    assert cos(latents[0], golden["final_latent_target"]) > 0.9999
    assert _max_rel(latents[0].float(), golden["final_latent_target"]) < 0.03


@pytest.mark.parametrize("task", ["t2i", "image_edit"])
def test_batch_neighbours_do_not_change_a_sample(task: str, models) -> None:
    """Each sample of a batch (other prompts, seeds, prefix lengths) gives the result it gets alone.

    8 steps: σ crosses the CFG interval's lower bound, so both kinds of step run.
    """
    _, meta = _golden(task)
    model, tok = models[meta["model_family"]]
    others = {
        "t2i": ["A lighthouse on a cliff at dusk.", "Two cats playing chess in a library, warm light, 35mm."],
        "image_edit": ["Make it night."],
    }[task]
    batch = [_golden_input(task)] + [_golden_input(task, p, seed=7 + i) for i, p in enumerate(others)]
    settings = _sampler(steps=8)
    assert len(set(cfg_steps(settings))) == 2
    together = denoise(model, tok, task, batch, settings)
    for b, inp in enumerate(batch):
        alone = denoise(model, tok, task, [inp], settings)[0]
        torch.testing.assert_close(together[b], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-2)


def test_cfg_scale_one_runs_the_conditional_branch_only(models) -> None:
    g, meta = _golden("t2i")
    model, tok = models["image"]
    seen: list[StepInfo] = []
    settings = _sampler(steps=3, cfg_scale=1.0)
    latents = denoise(model, tok, "t2i", [_golden_input("t2i")], settings, on_step=lambda s: seen.append(s))
    assert [s.v_uncond for s in seen] == [None] * 3
    assert all(s.v is s.v_cond for s in seen)
    # The conditional branch does not depend on whether an unconditional cache exists.
    assert _max_rel(seen[0].v_cond[0], g["step0_v_cond_target_span"]) < 1e-4
    assert latents.shape == (1, 1, 4, 6, 48)


def test_input_validation(models) -> None:
    model, tok = models["image"]
    settings = _sampler(steps=1)
    with pytest.raises(ValueError, match="one target shape"):
        denoise(model, tok, "t2i", [GenerationInput("a", (1, 4, 6), 0), GenerationInput("b", (1, 4, 4), 0)],
                settings)
    with pytest.raises(ValueError, match="one latent frame"):
        denoise(model, tok, "t2i", [GenerationInput("a", (2, 4, 6), 0)], settings)
    with pytest.raises(ValueError, match="needs vit_tokens"):
        denoise(model, tok, "image_edit", [GenerationInput("a", (1, 4, 6), 0)], settings)
    with pytest.raises(ValueError, match="first frame"):
        denoise(model, tok, "i2v", [GenerationInput("a", (2, 4, 6), 0, cond_latent=torch.zeros(2, 4, 6, 48))],
                settings)
    with pytest.raises(ValueError, match="no visual conditions"):
        denoise(model, tok, "t2v", [GenerationInput("a", (2, 4, 6), 0, cond_latent=torch.zeros(1, 4, 6, 48))],
                settings)


# ---------------------------------------------------------------------------------------------------
# From media to media (LancePipeline methods)
# ---------------------------------------------------------------------------------------------------
def test_pipeline_t2i_batches_and_seeds(pipes) -> None:
    pipe = pipes["image"]
    prompts = ["A red fox sitting in fresh snow.", "A lighthouse on a cliff at dusk.", "A red fox sitting in fresh snow."]
    # 70x100 is floored to 64x96; rows 0 and 2 are the same request in different batches.
    images = pipe.t2i(prompts, height=70, width=100, steps=4, seeds=[42, 42, 42], max_batch_size=2)
    assert [(im.shape, im.dtype) for im in images] == [((64, 96, 3), np.uint8)] * 3
    assert np.abs(images[0].astype(int) - images[2].astype(int)).max() <= 1
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 10
    other_seed = pipe.t2i(prompts[:1], height=64, width=96, steps=4, seeds=[43])[0]
    assert np.abs(images[0].astype(int) - other_seed.astype(int)).max() > 10
    videos = pipes["video"].t2v(["A red fox trots through fresh snow."], height=64, width=80, frames=6, steps=2)
    assert [(v.shape, v.dtype) for v in videos] == [((5, 64, 80, 3), np.uint8)]  # 6 frames -> 2 latent -> 5


def _spy_on_denoise(monkeypatch: pytest.MonkeyPatch) -> list[list[GenerationInput]]:
    seen: list[list[GenerationInput]] = []

    def spy(model, tokenizer, task, inputs, settings, **kwargs):
        seen.append(inputs)
        return denoise(model, tokenizer, task, inputs, settings, **kwargs)

    monkeypatch.setattr(generate, "denoise", spy)
    return seen


def _posterior_sample(pipe: LancePipeline, frames: np.ndarray, seed: int) -> torch.Tensor:
    """Independent derivation of a sampled VAE condition: [t, h, w, 48]."""
    mu, log_var = pipe.vae.encode(preprocess.vae_pixels(frames))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed))
    return (mu + torch.exp(0.5 * log_var) * eps)[0].permute(1, 2, 3, 0)


@pytest.mark.parametrize("task", ["image_edit", "video_edit"])
def test_pipeline_edit_conditions(task: str, pipes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The edit's ViT tokens are the official ones for the golden input; the source latent is the posterior
    sampled with the row's seed; a second input of another aspect ratio goes to its own batch."""
    g, meta = _golden(task)
    pipe = pipes[meta["model_family"]]
    image, video = _golden_media()
    source = image if task == "image_edit" else video
    square = np.random.default_rng(0).integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)
    other = square[0] if task == "image_edit" else np.repeat(square, 5, axis=0)
    seen = _spy_on_denoise(monkeypatch)
    rows = media_rows([source, other], ["Make it red.", "Make it blue."], meta["resolution"], [42, 5])
    latents = generate_media(pipe.model, pipe.tokenizer, pipe.vae, task, rows, _sampler(steps=1),
                             preset=meta["resolution"], max_batch_size=1, return_latents=True)
    t = 1 if task == "image_edit" else 2
    assert [tuple(z.shape) for z in latents] == [(t, 14, 19, 48), (t, 16, 16, 48)]  # row order kept
    assert [len(batch) for batch in seen] == [1, 1]
    (golden_row,) = next(batch for batch in seen if batch[0].prompt == "Make it red.")
    gt, gh, gw = g["vit_grid_thw_0"][0].tolist()
    assert golden_row.vit_grid == (gt, gh // 2, gw // 2)
    assert _max_rel(golden_row.vit_tokens, g["vit_out_0"]) < 1e-4
    frames = source.reshape(-1, *source.shape[-3:])  # (T, H, W, 3), already bucket-sized
    torch.testing.assert_close(golden_row.cond_latent, _posterior_sample(pipe, frames, 42))


def test_pipeline_i2v_keeps_the_image_latent(pipes, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = pipes["video"]
    image, _ = _golden_media()
    seen = _spy_on_denoise(monkeypatch)
    rows = media_rows([image], ["The yellow disc rolls to the right."], "video_192p", [42], frames=5)
    (latent,) = generate_media(pipe.model, pipe.tokenizer, pipe.vae, "i2v", rows, _sampler(steps=2),
                               preset="video_192p", return_latents=True)
    expected = _posterior_sample(pipe, image[None], 42)  # [1, 14, 19, 48]
    assert seen[0][0].target == (2, 14, 19)
    torch.testing.assert_close(seen[0][0].cond_latent, expected)
    torch.testing.assert_close(latent[:1], expected)
    assert not torch.allclose(latent[1:], expected.expand(1, -1, -1, -1), atol=0.1)


# ---------------------------------------------------------------------------------------------------------------
# seed_mode: official -- whole runs of the official script (tests/fixtures/golden/official_runs/)

@pytest.mark.parametrize("run_name", official_runs.GENERATION)
def test_python_api_reproduces_an_official_run(run_name: str, pipes) -> None:
    """One call with `seed_mode="official"` is one official run over its rows, in order: every row's pixels are
    the official ones, the later rows' too (their ε comes after the earlier rows' draws), whatever the batching.
    Float32 on the CPU, the tiny checkpoint."""
    run = official_runs.load(run_name)
    task = run.settings["task"]
    pipe = pipes[run.settings["family"]]
    prompts = [row.prompt for row in run.rows]
    inputs = [] if task in ("t2i", "t2v") else [[official_runs.load_input(row.media) for row in run.rows]]
    outputs = getattr(pipe, task)(*inputs, prompts, max_batch_size=2, **run.params)
    for row, output in zip(run.rows, outputs, strict=True):
        official_runs.assert_official_pixels(row.compare(output), row.pixels, identical=0.999)


def test_per_row_mode_draws_the_posterior_from_the_row_seed(pipes) -> None:
    """The default: ε from the row's own seed, so a row does not depend on the rows before it (unlike the official
    script), and its pixels differ from the official run's."""
    run = official_runs.load("image_edit_seed11_cfg1")
    images = [official_runs.load_input(row.media) for row in run.rows]
    prompts = [row.prompt for row in run.rows]
    per_row = {**run.params, "seed_mode": "per_row"}
    alone = pipes["image"].image_edit(images[1:2], prompts[1:2], **per_row)[0]
    together = pipes["image"].image_edit(images, prompts, **per_row)[1]
    assert np.array_equal(alone, together)
    with pytest.raises(AssertionError, match="identical"):
        official_runs.assert_official_pixels(alone, run.rows[1].pixels, identical=0.999)
