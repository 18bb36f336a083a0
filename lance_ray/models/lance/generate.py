"""Batched denoising for t2i / t2v / i2v / image_edit / video_edit (the official KV path, LANCE_FACTS §8).

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
initial noise comes from its own seed (sampler.initial_noise: all latent rows drawn, the denoised rows take
the tail), so a sample's result does not depend on its batch neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .latent import latent_position_index
from .sampler import SamplerSettings, Schedule, apply_cfg, euler_step, initial_noise
from .sequence import GenerationLayout, Grid, build_generation
from .tokenizer import LanceTokenizer
from .transformer import KVCache, LanceModel, Split

EDIT_TASKS = ("image_edit", "video_edit")


@dataclass
class GenerationInput:
    """One sample to denoise, its conditions already encoded."""

    prompt: str  # prompt (t2i/t2v/i2v) or instruction (edits), without any template
    target: Grid  # latent grid (t, h, w) of the output
    seed: int
    vit_tokens: torch.Tensor | None = None  # edits: [K, H] ViT outputs of the source
    vit_grid: Grid | None = None  # edits: their LLM-level grid (frames/2, H/28, W/28), K = t*h*w
    cond_latent: torch.Tensor | None = None  # edits: source latent [t, h, w, 48]; i2v: frame 0 [1, h, w, 48]


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


def _check_inputs(task: str, inputs: list[GenerationInput], hidden: int) -> None:
    if not inputs:
        raise ValueError("no inputs")
    target = inputs[0].target
    for inp in inputs:
        if inp.target != target:
            raise ValueError(f"one batch needs one target shape, got {inp.target} and {target}")
        t, h, w = inp.target
        if task == "t2i" and t != 1:
            raise ValueError(f"t2i targets one latent frame, got {inp.target}")
        if task in EDIT_TASKS:
            if inp.vit_tokens is None or inp.vit_grid is None or inp.cond_latent is None:
                raise ValueError(f"{task} needs vit_tokens, vit_grid and cond_latent")
            gt, gh, gw = inp.vit_grid
            if tuple(inp.vit_tokens.shape) != (gt * gh * gw, hidden):
                raise ValueError(f"vit_tokens {tuple(inp.vit_tokens.shape)} do not match grid {inp.vit_grid}")
            if tuple(inp.cond_latent.shape) != (t, h, w, 48):
                raise ValueError(f"source latent {tuple(inp.cond_latent.shape)} must be the target's {(t, h, w, 48)}")
        elif task == "i2v":
            if inp.cond_latent is None or tuple(inp.cond_latent.shape) != (1, h, w, 48):
                raise ValueError(f"i2v needs the first frame's latent of shape {(1, h, w, 48)}")
            if t < 2:
                raise ValueError("i2v needs at least 2 latent frames (5 output frames)")
        elif inp.vit_tokens is not None or inp.cond_latent is not None:
            raise ValueError(f"{task} takes no visual conditions")


def _prefix_embeddings(model: LanceModel, layout: GenerationLayout, inp: GenerationInput) -> torch.Tensor:
    """Input embeddings of the whole conditional sequence except the target latents: [L, H].

    Text tokens (including each visual's start/end tokens) embed their ids; edits put the ViT tokens and
    the clean source latent (σ = 0) into their placeholder spans.
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
    task: str,
    inputs: list[GenerationInput],
    settings: SamplerSettings,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """Denoise B samples of one task and one target shape -> target latents [B, t, h, w, 48].

    The latents are in the model's dtype (the official code keeps x_t in it), ready for the VAE decoder.
    """
    llm = model.llm
    device, dtype = llm.embed.weight.device, llm.embed.weight.dtype
    _check_inputs(task, inputs, llm.cfg.hidden_size)
    B = len(inputs)
    layouts = [
        build_generation(
            tokenizer,
            task,
            inp.prompt,
            target=inp.target,
            vit_grids=[inp.vit_grid] if inp.vit_grid is not None else None,
            source=inp.target if task in EDIT_TASKS else None,
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
    n_source = n_target if task in EDIT_TASKS else 0  # the noise draw covers every latent row of a sample
    x = torch.stack([initial_noise(inp.seed, n_source + n_target, keep_last=n_denoised) for inp in inputs])
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
    one_gen_mask = torch.ones(Lq, dtype=torch.bool, device=device)
    one_gen_mask[0] = one_gen_mask[-1] = False
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
            gen_mask=one_gen_mask.repeat(n_query_rows),
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
