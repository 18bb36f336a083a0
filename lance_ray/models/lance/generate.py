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

Conditions are given already encoded (`GenerationInput`): edits bring the source's ViT tokens and its
(sampled) VAE latent, which enter the prefix with σ = 0; i2v brings the first frame's latent.  Each sample's
initial noise comes from its own seed (sampler.initial_noise: all latent rows drawn on the CPU, the denoised
rows take the tail) -- or is given, drawn as the official run draws it (`seed_mode: official`: on the
model's device, so a CUDA draw on a GPU; the global generator for seed 0) -- so a sample's result does not
depend on its batch neighbours.

From media to media (what `LancePipeline`'s generation methods call): `MediaRow` per input row, then
`generate_media` groups rows by target shape, and per batch of at most `max_batch_size` rows encodes the
conditions, denoises and decodes.  Conditions:
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

from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import preprocess
from .latent import latent_position_index
from .model import LanceModel
from .official_random import OfficialRun, RowDraws
from .sampler import Schedule, apply_cfg, euler_step, initial_noise
from .sequence import GenerationLayout, Grid, build_generation
from .settings import SamplerSettings
from .tasks import TaskSpec, get_task
from .tokenizer import LanceTokenizer
from .transformer import KVCache, Routing, Split

if TYPE_CHECKING:
    from .vae import WanVAE



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
    on_step: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """Denoise B samples of one task and one target shape -> target latents [B, t, h, w, 48].

    The latents are in the model's dtype (the official code keeps x_t in it), ready for the VAE decoder.
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

    # ---- prefill: cond rows 0..B-1, uncond rows B..2B-1 --------------------------------------------------
    embeds = [_prefix_embeddings(model, lay, inp) for lay, inp in zip(layouts, inputs, strict=True)]
    cache_rows = 2 * B if use_cfg else B
    branches = [(lay.prefix_splits, emb, lay) for lay, emb in zip(layouts, embeds, strict=True)]
    if use_cfg:
        branches += [
            ([lay.splits[i] for i in lay.prefix_splits_uncond], emb, lay)
            for lay, emb in zip(layouts, embeds, strict=True)
        ]
    xs, pos, gen, rows = [], [], [], []
    for splits, emb, lay in branches:
        for s in splits:
            xs.append(emb[s.start : s.end])
            pos.append(lay.position_ids[:, s.start : s.end])  # uncond prefix too: the official quirk
            gen.append(lay.gen_mask[s.start : s.end])
        rows.append([Split(s.length, s.causal) for s in splits])
    capacity = max(sum(s.length for s in r) for r in rows)
    cache = KVCache(llm.cfg, cache_rows, capacity, device, dtype)
    llm(torch.cat(xs), torch.cat(pos, dim=1).to(device), rows, cache=cache, gen_mask=torch.cat(gen).to(device))
    del xs, gen

    # ---- the per-step query: [<|vision_start|>, N_target latents, <|vision_end|>] per row -----------------
    targets = [lay.target_split for lay in layouts]  # same length, different starts (prompt lengths differ)
    Lq = targets[0].length
    start_end = torch.stack([emb[[s.start, s.end - 1]] for emb, s in zip(embeds, targets, strict=True)])  # [B, 2, H]
    del embeds
    cond_pos = torch.cat([lay.position_ids[:, s.start : s.end] for lay, s in zip(layouts, targets, strict=True)], dim=1)
    query_pos = {False: cond_pos.to(device)}
    query_rows = {False: [[Split(Lq, False)]] * B + [[]] * (cache_rows - B)}
    if use_cfg:
        uncond_pos = torch.cat([lay.uncond_target_position_ids for lay in layouts], dim=1)
        query_pos[True] = torch.cat([cond_pos, uncond_pos], dim=1).to(device)
        query_rows[True] = [[Split(Lq, False)]] * (2 * B)
    gen_row = torch.ones(Lq, dtype=torch.bool, device=device)  # start/end tokens use the und expert
    gen_row[0] = gen_row[-1] = False
    # The expert split of the query is the same every step: build it once (building it syncs with the host).
    query_routing = {False: Routing(gen_row.repeat(B)), True: Routing(gen_row.repeat(2 * B))}
    pos_index = latent_position_index(t, h, w).to(device).repeat(B)  # [B * N_target]
    sigma_rows = torch.zeros(n_target, device=device)

    for i in range(schedule.steps):
        cfg = schedule.cfg_on[i]
        sigma = schedule.sigmas[i]
        sigma_rows[n_clean:] = sigma  # device-side copy: no host sync
        latents = x if clean is None else torch.cat([clean, x], dim=1)  # [B, N_target, 48]
        lat_emb = model.latent.embed(latents.reshape(-1, 48), sigma_rows.repeat(B), pos_index)
        query = torch.cat([start_end[:, :1], lat_emb.view(B, n_target, -1), start_end[:, 1:]], dim=1)
        n_query_rows = 2 * B if cfg else B
        q = query.repeat(2, 1, 1) if cfg else query  # [n_query_rows, Lq, H]
        hidden = llm(
            q.reshape(n_query_rows * Lq, -1),
            query_pos[cfg],
            query_rows[cfg],
            cache=cache,
            routing=query_routing[cfg],
            update_cache=False,
        )
        v_all = model.latent.velocity(hidden.view(n_query_rows, Lq, -1)[:, 1:-1])  # [rows, N_target, 48]
        del hidden
        v_cond = v_all[:B]
        v_uncond = v_all[B:] if cfg else None
        v = apply_cfg(v_cond, v_uncond, settings.cfg_scale, settings.cfg_renorm_min) if cfg else v_cond
        if on_step is not None:
            on_step(StepInfo(i, sigma, query, x, v_cond, v_uncond, v))
        x = euler_step(x, v[:, n_clean:], schedule.step_sizes[i])
        del v_all, v_cond, v_uncond, v, query, q, lat_emb, latents
    del cache

    final = x if clean is None else torch.cat([clean, x], dim=1)
    return final.view(B, t, h, w, 48)


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
    official: OfficialRun | None = None,
) -> list[np.ndarray] | list[torch.Tensor]:
    """Run `task` for every row; rows of one target shape share batches of at most `max_batch_size`.

    Returns, in row order, uint8 images (H, W, 3) for t2i/image_edit and videos (T, H, W, 3) otherwise,
    or with `return_latents` the float32 CPU target latents [t, h, w, 48].  `preset` sizes the conditioning
    media (edits, i2v).  `vae` may be None only for t2i/t2v with `return_latents`.  With `official`, the rows
    are the official run's rows, in order: its draws replace the per-row ones (ε, crop offsets, the initial
    noise).
    """
    task = get_task(task) if isinstance(task, str) else task
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    dtype = model.llm.embed.weight.dtype
    draws = [None] * len(rows) if official is None else _official_draws(official, task, rows, preset, dtype)
    image_out = task.output == "image"
    results: list = [None] * len(rows)
    by_shape = sorted(range(len(rows)), key=lambda i: rows[i].target)
    for _, group in groupby(by_shape, key=lambda i: rows[i].target):
        group = list(group)
        size = max_batch_size or len(group)
        for start in range(0, len(group), size):
            batch = group[start : start + size]
            inputs = _batch_inputs(model, vae, task, [rows[i] for i in batch], preset, [draws[i] for i in batch])
            latents = denoise(model, tokenizer, task, inputs, settings)  # [B, t, h, w, 48]
            del inputs
            if return_latents:
                out = list(latents.float().cpu())
            else:
                pixels = vae.decode_uint8(latents.permute(0, 4, 1, 2, 3)).cpu().numpy()  # [B, T, H, W, 3]
                out = [p[0] if image_out else p for p in pixels]
            del latents
            for i, o in zip(batch, out, strict=True):
                results[i] = o
    return results
