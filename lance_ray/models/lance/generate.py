"""Batched denoising for t2i / t2v / i2v / image_edit / video_edit.

Reproduces the official KV path (`modeling/lance/lance.py`, `Lance.validation_gen_KVcache`).

Per sample the official code prefills every split before the noisy target into a KV cache -- the
conditional cache with all of them, the unconditional (CFG) cache with those whose first token is not
user text -- and then, at every step, feeds the target split `[<|vision_start|>, latents, <|vision_end|>]`
as a non-causal query over each cache without extending it.  We do the same for B samples of one
target shape at once:

* one packed prefill call fills a cache of B conditional rows followed by B unconditional rows (the
  unconditional rows only when some step uses CFG); the unconditional prefix is fed with the
  *conditional* position ids and only its target with recomputed ones (the official quirk, kept);
* every step runs the 2B target queries (B when the step has no CFG: the unconditional rows then carry
  no tokens) in ONE forward, `llm2vae` on the target's latent rows, CFG + global renorm per sample, and an
  Euler update of the denoised rows only.  For i2v the query holds latent frame 0 (the clean first-frame
  latent, σ = 0 forever) and CFG/renorm see those rows too, as in the official code; they are never
  updated.
The caches and the per-step forward live in `Lane`s (branches.py): one lane for both branches on the exact
path; opt-in speed modes (`SpeedSettings`): `fp8` (the gen expert's matmuls in FP8), `step_cache` (skip a
step's deep layers when its first layer's output barely changed, per branch) and `cfg_parallel` (the
unconditional branch on its own lane on a second GPU).

Conditions are given already encoded (`GenerationInput`): edits bring the source's ViT tokens and its
(sampled) VAE latent, which enter the prefix with σ = 0; i2v brings the first frame's latent.  Each sample's
initial noise comes from its own seed (sampler.initial_noise: all latent rows drawn on the CPU, the denoised
rows take the tail) -- or is given, drawn as the official run draws it (`seed_mode: official`: on the
model's device, so a CUDA draw on a GPU; the global generator for seed 0) -- so a sample's result does not
depend on its batch neighbours.

From media to media (what `LancePipeline`'s generation methods call): `MediaRow` per input row, then
`generate_media` groups rows by target shape, and per batch of at most `max_batch_size` rows (and on a GPU
at most what memory.py says fits) encodes the conditions, denoises and decodes -- the decode on a side
CUDA stream, beside the next batch's denoising.  Conditions:
* edits: the source through the ViT stream (preset buckets, one ViT call per batch) and through the VAE
  stream, encoded and *sampled* from the posterior ``mu + exp(log_var / 2)·ε``;
* i2v: the image through the VAE stream, sampled likewise; it becomes latent frame 0 of the target (the
  VAE is causal, so encoding the image alone gives exactly the latent frame 0 the official code keeps
  from its padded clip).
Where ε comes from depends on the seed mode:
* `per_row` (the default): from a CPU generator seeded with the row's seed -- the same seed as the initial
  noise, whose draw covers every latent row with the conditioning rows first: ε takes the head of that
  stream, exactly the values the initial-noise draw puts in the conditioning rows (which the official code
  overwrites), so ε and the target's noise never share a value, and a row's result depends on nothing but
  the row.
* `official`: from the official script's global generators as its run over these rows draws it
  (`official_random.OfficialRun`: the CPU generator after its start-up draws on a CPU, the CUDA generator on
  a GPU), rows in their given order; the crop offsets of the official resize come from the same run.  All
  of a call's draws are made up front in row order, so batching and shape grouping change nothing.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import preprocess
from .branches import BRANCHES, Lane, replicate, side_stream
from .fp8 import fp8_available
from .latent import LatentAdapter, latent_position_index
from .memory import GenerationFootprint, GenerationShape, free_gpu_bytes, largest_batch
from .model import LanceModel
from .official_random import OfficialRun, RowDraws
from .sampler import Schedule, apply_cfg, cfg_steps, euler_step, initial_noise
from .sequence import GenerationLayout, Grid, build_generation
from .settings import SamplerSettings, SpeedSettings
from .tasks import TaskSpec, get_task
from .tokenizer import LanceTokenizer
from .transformer import LanguageModel, Split

if TYPE_CHECKING:
    from .vae import WanVAE

log = logging.getLogger(__name__)


@dataclass
class GenerationInput:
    """One sample to denoise, its conditions already encoded."""

    prompt: str  # prompt (t2i/t2v/i2v) or instruction (edits), without any template
    target: Grid  # latent grid (t, h, w) of the output
    seed: int
    vit_tokens: torch.Tensor | None = None  # edits: [K, H] ViT outputs of the source
    vit_grid: Grid | None = None  # edits: their LLM-level grid (frames/2, H/28, W/28), K = t*h*w
    cond_latent: torch.Tensor | None = None  # edits: source latent [t, h, w, 48]; i2v: frame 0 [1, h, w, 48]
    noise: torch.Tensor | None = None  # initial noise of every latent row [n_rows, 48] (None: drawn from `seed`)

    def initial_noise(self, n_rows: int, n_denoised: int) -> torch.Tensor:
        """The denoised rows' initial noise [n_denoised, 48]: the tail of the sample's draw over all its rows."""
        if self.noise is None:
            return initial_noise(self.seed, n_rows, keep_last=n_denoised)
        if self.noise.shape[0] != n_rows:
            raise ValueError(f"noise has {self.noise.shape[0]} rows, the sample {n_rows}")
        return self.noise[n_rows - n_denoised :]


@dataclass
class StepInfo:
    """What one denoising step saw and computed (for tests and debugging; tensors are live, not copies)."""

    step: int
    sigma: torch.Tensor  # 0-d, σ fed at this step
    query: torch.Tensor  # [B, Lq, H] conditional query embeddings of the target split
    x: torch.Tensor  # [B, N_denoised, 48] the denoised rows entering the step
    v_cond: torch.Tensor  # [B, N_target, 48] conditional velocity on all target latent rows
    v_uncond: torch.Tensor | None  # [B, N_target, 48], None on steps without CFG
    v: torch.Tensor  # [B, N_target, 48] velocity after CFG + renorm (== v_cond without CFG)


def _check_inputs(task: TaskSpec, inputs: list[GenerationInput], hidden: int) -> None:
    if not inputs:
        raise ValueError("no inputs")
    target = inputs[0].target
    for inp in inputs:
        if inp.target != target:
            raise ValueError(f"one batch needs one target shape, got {inp.target} and {target}")
        t, h, w = inp.target
        if task.output == "image" and t != 1:
            raise ValueError(f"{task.name} targets one latent frame, got {inp.target}")
        if task.conditioning == "source":
            if inp.vit_tokens is None or inp.vit_grid is None or inp.cond_latent is None:
                raise ValueError(f"{task.name} needs vit_tokens, vit_grid and cond_latent")
            gt, gh, gw = inp.vit_grid
            if tuple(inp.vit_tokens.shape) != (gt * gh * gw, hidden):
                raise ValueError(f"vit_tokens {tuple(inp.vit_tokens.shape)} do not match grid {inp.vit_grid}")
            if tuple(inp.cond_latent.shape) != (t, h, w, 48):
                raise ValueError(f"source latent {tuple(inp.cond_latent.shape)} must be the target's {(t, h, w, 48)}")
        elif task.conditioning == "first_frame":
            if inp.cond_latent is None or tuple(inp.cond_latent.shape) != (1, h, w, 48):
                raise ValueError(f"{task.name} needs the first frame's latent of shape {(1, h, w, 48)}")
            if t < 2:
                raise ValueError(f"{task.name} needs at least 2 latent frames (5 output frames)")
        elif inp.vit_tokens is not None or inp.cond_latent is not None:
            raise ValueError(f"{task.name} takes no visual conditions")


def _prefix_embeddings(model: LanceModel, layout: GenerationLayout, inp: GenerationInput) -> torch.Tensor:
    """Input embeddings of the whole conditional sequence: [L, H].

    Text tokens (including each visual's start/end tokens) embed their ids; edits put the ViT tokens and
    the clean source latent (σ = 0) into their placeholder spans.  The target's latent rows keep their
    placeholder embedding here: the denoising loop builds them anew at every step.
    """
    device = model.llm.embed.weight.device
    x = model.llm.embed(layout.token_ids.to(device))
    if inp.vit_tokens is not None:
        (va, vb), (sa, sb) = layout.visual_spans[0], layout.visual_spans[1]
        x[va:vb] = inp.vit_tokens.to(x.dtype)
        source = inp.cond_latent.reshape(-1, 48).to(device)
        x[sa:sb] = model.latent.embed(
            source,
            torch.zeros(source.shape[0], device=device),
            latent_position_index(*layout.source_latent).to(device),
        )
    return x


@torch.inference_mode()
def denoise(
    model: LanceModel,
    tokenizer: LanceTokenizer,
    task: TaskSpec | str,
    inputs: list[GenerationInput],
    settings: SamplerSettings,
    *,
    speed: SpeedSettings | None = None,
    uncond_device: torch.device | str | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """Denoise B samples of one task and one target shape -> target latents [B, t, h, w, 48].

    The latents are in the model's dtype (the official code keeps x_t in it), ready for the VAE decoder.
    `speed` turns on opt-in speed modes (None: the exact path): `fp8` and `step_cache` here; for
    `cfg_parallel` the caller passes `uncond_device`, where the unconditional branch then runs (on a
    replica of the language model; the same device as the model is allowed, for tests).
    """
    task = get_task(task) if isinstance(task, str) else task
    llm = model.llm
    device, dtype = llm.embed.weight.device, llm.embed.weight.dtype
    _check_inputs(task, inputs, llm.cfg.hidden_size)
    B = len(inputs)
    edit = task.conditioning == "source"
    layouts = [
        build_generation(
            tokenizer,
            task.name,
            inp.prompt,
            target=inp.target,
            vit_grids=[inp.vit_grid] if inp.vit_grid is not None else None,
            source=inp.target if edit else None,
            tokens_per_second=llm.cfg.tokens_per_second,
        )
        for inp in inputs
    ]
    schedule = Schedule.build(settings, device)
    use_cfg = any(schedule.cfg_on)

    t, h, w = inputs[0].target
    n_target = t * h * w
    n_clean = layouts[0].clean_target_rows  # i2v: latent frame 0 rides along in the query, never updated
    n_denoised = n_target - n_clean
    n_source = n_target if edit else 0  # the noise draw covers every latent row of a sample
    x = torch.stack([inp.initial_noise(n_source + n_target, n_denoised) for inp in inputs])
    x = x.to(device=device, dtype=dtype)  # [B, N_denoised, 48]
    clean = None
    if n_clean:
        clean = torch.stack([inp.cond_latent.reshape(-1, 48) for inp in inputs]).to(device=device, dtype=dtype)

    # ---- prefill: each branch's rows into the cache of the lane that runs it -------------------------------
    lanes = _lanes(model, B, use_cfg, speed, uncond_device)
    embeds = [_prefix_embeddings(model, lay, inp) for lay, inp in zip(layouts, inputs, strict=True)]
    prefix_splits = {"cond": [lay.prefix_splits for lay in layouts],
                     "uncond": [[lay.splits[i] for i in lay.prefix_splits_uncond] for lay in layouts]}
    prefixes = {
        branch: [(torch.cat([emb[s.start : s.end] for s in splits]),
                  # the uncond prefix keeps the conditional position ids: the official quirk
                  torch.cat([lay.position_ids[:, s.start : s.end] for s in splits], dim=1),
                  torch.cat([lay.gen_mask[s.start : s.end] for s in splits]),
                  [Split(s.length, s.causal) for s in splits])
                 for splits, emb, lay in zip(prefix_splits[branch], embeds, layouts, strict=True)]
        for branch in ("cond", "uncond") if branch == "cond" or use_cfg
    }
    for lane in lanes:
        lane.prefill(prefixes)
    del prefixes

    # ---- the per-step query: [<|vision_start|>, N_target latents, <|vision_end|>] per row -----------------
    targets = [lay.target_split for lay in layouts]  # same length, different starts (prompt lengths differ)
    Lq = targets[0].length
    start_end = torch.stack([emb[[s.start, s.end - 1]] for emb, s in zip(embeds, targets, strict=True)])  # [B, 2, H]
    del embeds
    positions = {"cond": torch.cat([lay.position_ids[:, s.start : s.end] for lay, s in zip(layouts, targets, strict=True)],
                                   dim=1)}
    if use_cfg:
        positions["uncond"] = torch.cat([lay.uncond_target_position_ids for lay in layouts], dim=1)
    gen_row = torch.ones(Lq, dtype=torch.bool)  # start/end tokens use the und expert
    gen_row[0] = gen_row[-1] = False
    for lane in lanes:
        lane.set_query_layout(Lq, positions, gen_row)
    pos_emb = model.latent.position_embedding(latent_position_index(t, h, w).to(device)).repeat(B, 1)  # [B*N, H]
    sigma_rows = torch.zeros(n_target, device=device)

    for i in range(schedule.steps):
        cfg = schedule.cfg_on[i]
        sigma = schedule.sigmas[i]
        sigma_rows[n_clean:] = sigma  # device-side copy: no host sync
        latents = x if clean is None else torch.cat([clean, x], dim=1)  # [B, N_target, 48]
        lat_emb = model.latent.embed_at(latents.reshape(-1, 48), sigma_rows.repeat(B), pos_emb)
        query = torch.cat([start_end[:, :1], lat_emb.view(B, n_target, -1), start_end[:, 1:]], dim=1)
        active = BRANCHES if cfg else ("cond",)
        v_branch = {}
        for lane in lanes:  # launched one after the other; lanes on different GPUs run at the same time
            v_branch.update(lane.velocities(query, active))
        v_cond = v_branch["cond"]
        v_uncond = v_branch["uncond"].to(device) if cfg else None
        v = apply_cfg(v_cond, v_uncond, settings.cfg_scale, settings.cfg_renorm_min) if cfg else v_cond
        if on_step is not None:
            on_step(StepInfo(i, sigma, query, x, v_cond, v_uncond, v))
        x = euler_step(x, v[:, n_clean:], schedule.step_sizes[i])
        del v_branch, v_cond, v_uncond, v, query, lat_emb, latents
    for lane in lanes:
        if lane.step_cache is not None:
            log.info("step cache: deep layers skipped on %s of %d steps", lane.skipped_steps(), schedule.steps)
    del lanes

    final = x if clean is None else torch.cat([clean, x], dim=1)
    return final.view(B, t, h, w, 48)


def _lanes(model: LanceModel, batch: int, use_cfg: bool, speed: SpeedSettings | None,
           uncond_device: torch.device | str | None) -> list[Lane]:
    """One lane for both branches, or (CFG-parallel) the unconditional branch on its own lane."""
    device = model.llm.embed.weight.device
    gen_fp8 = bool(speed and speed.fp8) and _fp8_on(device)
    options = {"gen_fp8": gen_fp8, "step_cache": speed.step_cache if speed else 0.0}
    if uncond_device is None or not use_cfg:
        return [Lane(model.llm, model.latent, BRANCHES if use_cfg else ("cond",), batch, **options)]
    llm, latent = _replica(model, torch.device(uncond_device))
    return [Lane(model.llm, model.latent, ("cond",), batch, **options),
            Lane(llm, latent, ("uncond",), batch, **options)]


_replicas: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _replica(model: LanceModel, device: torch.device) -> tuple[LanguageModel, LatentAdapter]:
    """The language model and latent adapter on `device` (made once per model and device)."""
    if device == model.llm.embed.weight.device:
        return model.llm, model.latent
    per_device = _replicas.setdefault(model, {})
    if device not in per_device:
        per_device[device] = (replicate(model.llm, device), replicate(model.latent, device))
    return per_device[device]


def _fp8_on(device: torch.device) -> bool:
    if fp8_available(device):
        return True
    log.warning("fp8 asked for, but FP8 matmuls are not available on %s: running the exact bf16 path", device)
    return False


# ---------------------------------------------------------------------------------------------------
# From media to media
# ---------------------------------------------------------------------------------------------------
@dataclass
class MediaRow:
    """One generation request as the pipeline receives it."""

    prompt: str
    seed: int
    target: Grid  # latent grid of the output
    media: np.ndarray | None = None  # uint8 [T, H, W, 3]: edit source, or the i2v image (T = 1)
    frames: int | None = None  # t2v / i2v: the frames asked for (the official NUM_FRAMES); target[0] follows


def _check_seeds(seeds: list[int], n: int) -> list[int]:
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} rows")
    return [int(s) for s in seeds]


def _as_frames(media: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) image or (T, H, W, 3) video -> (T, H, W, 3)."""
    if media.dtype != np.uint8 or media.ndim not in (3, 4) or media.shape[-1] != 3:
        raise ValueError(f"media must be uint8 (H, W, 3) or (T, H, W, 3), got {media.dtype} {media.shape}")
    return media[None] if media.ndim == 3 else media


def text_rows(prompts: list[str], height: int, width: int, frames: int, seeds: list[int]) -> list[MediaRow]:
    """t2i (frames = 1) / t2v rows: output size = the request floored to multiples of 16."""
    h, w = preprocess.output_size(height, width)
    target = (preprocess.latent_frames(frames), h // 16, w // 16)
    return [MediaRow(p, s, target, frames=frames)
            for p, s in zip(prompts, _check_seeds(seeds, len(prompts)), strict=True)]


def media_rows(media: list[np.ndarray], prompts: list[str], preset: str, seeds: list[int],
               frames: int | None = None) -> list[MediaRow]:
    """Edit rows (target = the source's bucket and frame count) or, with `frames`, i2v rows (the image's
    bucket, `frames` output frames)."""
    if len(media) != len(prompts):
        raise ValueError(f"{len(media)} inputs for {len(prompts)} prompts/instructions")
    rows = []
    for m, p, s in zip(media, prompts, _check_seeds(seeds, len(prompts)), strict=True):
        m = _as_frames(m)
        h, w = preprocess.stream_size(m.shape[1], m.shape[2], preset, "vae")
        t = preprocess.latent_frames(frames if frames is not None else m.shape[0])
        rows.append(MediaRow(p, s, (t, h // 16, w // 16), m, frames=frames))
    return rows


def _official_draws(official: OfficialRun, task: TaskSpec, rows: list[MediaRow], preset: str,
                    dtype: torch.dtype) -> list[RowDraws]:
    """The official run's draws for `rows`, made in row order."""
    draws = []
    for row in rows:
        t, h, w = row.target
        noise_rows = t * h * w * (2 if task.conditioning == "source" else 1)  # edits: source + target rows
        shape = None if row.media is None else row.media.shape[:3]
        draws.append(official.generation_row(task, shape, preset, row.frames, row.seed, noise_rows, dtype))
    return draws


def _sampled_latents(vae: WanVAE, frames: list[np.ndarray], preset: str, seeds: list[int],
                     draws: list[RowDraws | None]) -> list[torch.Tensor]:
    """VAE-stream frames of one size -> sampled posterior latents [t, h, w, 48] (one encode call); ε and the
    crop offsets from the official run's draws where given, else ε from the row's seed."""
    pixels = []
    for f, d in zip(frames, draws, strict=True):
        offsets = None if d is None or d.vae_offsets is None else d.vae_offsets[: len(f)]
        pixels.append(preprocess.vae_pixels(preprocess.resize_to_bucket(f, preset, "vae", offsets)))
    mu, log_var = vae.encode(torch.stack(pixels))  # [B, 48, t, h, w] each
    latents = []
    for b, (seed, d) in enumerate(zip(seeds, draws, strict=True)):
        if d is None:
            z = vae.sample(mu[b : b + 1], log_var[b : b + 1], torch.Generator().manual_seed(seed))
        else:
            z = vae.sample(mu[b : b + 1], log_var[b : b + 1], eps=d.eps[None])
        latents.append(z[0].permute(1, 2, 3, 0))
    return latents


def _vit_conditions(model: LanceModel, frames: list[np.ndarray], preset: str,
                    draws: list[RowDraws | None]) -> list[tuple[torch.Tensor, Grid]]:
    """ViT tokens [K, H] and their LLM-level grid per source (one ViT call for the batch)."""
    patches, grids = zip(*(
        preprocess.vit_patches(preprocess.resize_to_bucket(f, preset, "vit", None if d is None else d.vit_offsets))
        for f, d in zip(frames, draws, strict=True)
    ), strict=True)
    device = model.llm.embed.weight.device
    tokens = model.vit(torch.cat(patches).to(device), list(grids))
    m = model.vit_cfg.spatial_merge_size
    llm_grids = [(t, h // m, w // m) for t, h, w in grids]
    return list(zip(tokens.split([t * h * w for t, h, w in llm_grids]), llm_grids, strict=True))


@torch.inference_mode()
def _batch_inputs(model: LanceModel, vae: WanVAE | None, task: TaskSpec, rows: list[MediaRow], preset: str,
                  draws: list[RowDraws | None]) -> list[GenerationInput]:
    noise = [None if d is None else d.noise for d in draws]
    if task.conditioning == "none":
        return [GenerationInput(r.prompt, r.target, r.seed, noise=n) for r, n in zip(rows, noise, strict=True)]
    frames = [r.media for r in rows]
    # The VAE stream sees frames 0..4(t-1) (the encoder ignores the rest) -- i2v: the image alone.
    vae_frames = [f[: 4 * (r.target[0] - 1) + 1] if task.conditioning == "source" else f[:1]
                  for f, r in zip(frames, rows, strict=True)]
    latents = _sampled_latents(vae, vae_frames, preset, [r.seed for r in rows], draws)
    if task.conditioning == "first_frame":
        return [GenerationInput(r.prompt, r.target, r.seed, cond_latent=z, noise=n)
                for r, z, n in zip(rows, latents, noise, strict=True)]
    vit = _vit_conditions(model, frames, preset, draws)
    return [
        GenerationInput(r.prompt, r.target, r.seed, vit_tokens=tokens, vit_grid=grid, cond_latent=z, noise=n)
        for r, (tokens, grid), z, n in zip(rows, vit, latents, noise, strict=True)
    ]


def generate_media(
    model: LanceModel,
    tokenizer: LanceTokenizer,
    vae: WanVAE | None,
    task: TaskSpec | str,
    rows: list[MediaRow],
    settings: SamplerSettings,
    *,
    preset: str,
    max_batch_size: int | None = None,
    return_latents: bool = False,
    speed: SpeedSettings | None = None,
    official: OfficialRun | None = None,
) -> list[np.ndarray] | list[torch.Tensor]:
    """Run `task` for every row; rows of one target shape share batches.

    Returns, in row order, uint8 images (H, W, 3) for t2i/image_edit and videos (T, H, W, 3) otherwise,
    or with `return_latents` the float32 CPU target latents [t, h, w, 48].  `preset` sizes the conditioning
    media (edits, i2v).  `vae` may be None only for t2i/t2v with `return_latents`.  `speed`: opt-in speed
    modes (None: the exact path).  With `official`, the rows are the official run's rows, in order: its
    draws replace the per-row ones (ε, crop offsets, the initial noise).

    A batch is at most `max_batch_size` rows (default: all rows of the shape) and, on a GPU, at most what
    fits its free memory (memory.py); a batch's VAE decode runs in chunks of images that fit beside the next
    batch's denoising, on a second CUDA stream so that the two overlap (on the CPU one after the other).
    """
    task = get_task(task) if isinstance(task, str) else task
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    device = model.llm.embed.weight.device
    uncond_device = _second_gpu(device) if speed is not None and speed.cfg_parallel else None
    dtype = model.llm.embed.weight.dtype
    draws = [None] * len(rows) if official is None else _official_draws(official, task, rows, preset, dtype)
    results: list = [None] * len(rows)
    decoding: _Decoding | None = None
    by_shape = sorted(range(len(rows)), key=lambda i: rows[i].target)
    for target, group in groupby(by_shape, key=lambda i: rows[i].target):
        group = list(group)
        footprint = _footprint(model, vae, task, target, settings)
        budget = free_gpu_bytes(device)
        size = largest_batch(footprint, budget, max_batch_size or len(group))
        for start in range(0, len(group), size):
            batch = group[start : start + size]
            inputs = _batch_inputs(model, vae, task, [rows[i] for i in batch], preset, [draws[i] for i in batch])
            latents = denoise(model, tokenizer, task, inputs, settings, speed=speed, uncond_device=uncond_device)
            del inputs
            if decoding is not None:  # the previous batch's decode ran beside this batch's denoising
                decoding.collect(results)
            decoding = _Decoding(vae, task, latents, batch, return_latents,
                                 footprint.decode_chunk(len(batch), free_gpu_bytes(device)))
            del latents
    if decoding is not None:
        decoding.collect(results)
    return results


class _Decoding:
    """One batch's VAE decode (or latents copy) to the host, started at once -- on a side CUDA stream when the
    batch is on a GPU, so that the caller can start the next batch's denoising meanwhile."""

    def __init__(self, vae: WanVAE | None, task: TaskSpec, latents: torch.Tensor, rows: list[int],
                 return_latents: bool, chunk: int) -> None:
        self.rows, self.image_out, self.return_latents = rows, task.output == "image", return_latents
        on_gpu = latents.is_cuda
        self.stream = side_stream(latents.device, "decode") if on_gpu else None
        if on_gpu:
            self.stream.wait_stream(torch.cuda.current_stream(latents.device))
            latents.record_stream(self.stream)  # its memory stays reserved until the side stream is done
        with torch.inference_mode(), torch.cuda.stream(self.stream) if on_gpu else nullcontext():
            if return_latents:
                out = latents.float()
            else:
                z = latents.permute(0, 4, 1, 2, 3)  # [B, 48, t, h, w]
                out = torch.cat([vae.decode_uint8(z[i : i + chunk]) for i in range(0, len(rows), chunk)])
            self.out = out.to("cpu", non_blocking=on_gpu)  # [B, t, h, w, 48] or uint8 [B, T, H, W, 3]
            self.done = torch.cuda.Event() if on_gpu else None
            if on_gpu:
                self.done.record(self.stream)

    def collect(self, results: list) -> None:
        """Wait for the decode and put each row's result in `results`."""
        if self.done is not None:
            self.done.synchronize()
        for i, out in zip(self.rows, self.out, strict=True):
            if self.return_latents:
                results[i] = out
            else:
                results[i] = out[0].numpy() if self.image_out else out.numpy()


def _footprint(model: LanceModel, vae: WanVAE | None, task: TaskSpec, target: Grid,
               settings: SamplerSettings) -> GenerationFootprint:
    t, h, w = target
    pixels = 16 * h * 16 * w
    frames = 4 * (t - 1) + 1
    conditions = t * h * w + max(1, frames // 2) * pixels // 28**2 if task.conditioning == "source" else 0
    shape = GenerationShape(target_tokens=t * h * w, condition_tokens=conditions, pixels_per_frame=pixels,
                            cfg=any(cfg_steps(settings)))
    dec_dim = vae.config.dec_dim if vae is not None else 0  # no VAE: latents only, nothing decoded
    return GenerationFootprint.of(model.llm_cfg, dec_dim, model.llm.embed.weight.element_size(), shape)


def _second_gpu(device: torch.device) -> torch.device | None:
    """Where CFG-parallel puts the unconditional branch: the next GPU this process sees."""
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.device("cuda", (index + 1) % torch.cuda.device_count())
    log.warning("cfg_parallel needs two GPUs in this process, found %s on %s: both branches run on %s",
                torch.cuda.device_count() if device.type == "cuda" else 0, device.type, device)
    return None
