"""The small modules between VAE latents and the transformer (official `modeling/lance/modeling_utils.py`:
`TimestepEmbedder`, `PositionEmbedding3D`; their use in `modeling/lance/lance.py`,
`Lance.validation_gen_KVcache`).

A latent token (one VAE voxel, 48 channels) enters the transformer as
    vae2llm(x) + time_embedder(sigma) + sincos_3d(t, h, w)
and leaves it through `llm2vae` as a velocity.  The 3-D sin-cos table is not a learned weight (the
official loader, `inference_lance.py: init_from_model_path_if_needed`, drops `latent_pos_embed.pos_embed`
from the checkpoint and the model recomputes it), so we compute
exactly the rows we need instead of holding a [frames*64*64, H] table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LLMConfig


class TimestepEmbedder(nn.Module):
    """Sinusoid of the raw sigma in [0, 1] (cos half first, not scaled by 1000) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        # sigma: [N] -> [N, hidden]
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
        )
        args = sigma.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.fc1.weight.dtype)
        return self.fc2(nn.functional.silu(self.fc1(emb)))


def latent_position_index(t: int, h: int, w: int, max_latent_size: int = 64) -> torch.Tensor:
    """Row of the official table for each latent voxel in (t h w) raster order: t*S*S + h*S + w.

    No clamping, as in the official code: a latent width >= S aliases into the next row.
    """
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return (tt * max_latent_size**2 + hh * max_latent_size + ww).reshape(-1)


def sincos_3d(index: torch.Tensor, hidden: int, max_latent_size: int = 64) -> torch.Tensor:
    """Rows `index` of the official 3-D sin-cos table, [N, hidden] float32.

    The table splits `hidden` into d (t), d (h), hidden - 2d (w) with d = hidden//3 rounded down to even;
    each part is [sin(p * w_i), cos(p * w_i)] with w_i = 10000^(-i / (dim/2)), computed in float64 as the
    official numpy code does.
    """
    s = max_latent_size
    coords = (index // (s * s), (index // s) % s, index % s)
    d = hidden // 3
    d -= d % 2
    parts = []
    for dim, p in zip((d, d, hidden - 2 * d), coords, strict=True):
        omega = 1.0 / 10000 ** (
            torch.arange(dim // 2, dtype=torch.float64, device=index.device) / (dim / 2.0)
        )
        angles = p.to(torch.float64)[:, None] * omega[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


class LatentAdapter(nn.Module):
    """vae2llm / llm2vae / timestep embedding: everything Lance adds around the LLM for VAE latents."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vae2llm = nn.Linear(cfg.latent_channels, cfg.hidden_size)
        self.llm2vae = nn.Linear(cfg.hidden_size, cfg.latent_channels)
        self.time_embedder = TimestepEmbedder(cfg.hidden_size, cfg.timestep_freq_dim)

    def embed(self, x: torch.Tensor, sigma: torch.Tensor, pos_index: torch.Tensor) -> torch.Tensor:
        """Input embeddings of latent tokens.  x: [N, 48], sigma: [N], pos_index: [N] -> [N, H]."""
        return self.embed_at(x, sigma, self.position_embedding(pos_index))

    def position_embedding(self, pos_index: torch.Tensor) -> torch.Tensor:
        """The sin-cos rows of `pos_index` in the model dtype: [N, H] (the denoising loop computes them once)."""
        pos = sincos_3d(pos_index, self.cfg.hidden_size, self.cfg.max_latent_size)
        return pos.to(self.vae2llm.weight.dtype)

    def embed_at(self, x: torch.Tensor, sigma: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """`embed` with the position rows already computed (`position_embedding`)."""
        return self.vae2llm(x.to(self.vae2llm.weight.dtype)) + self.time_embedder(sigma) + pos

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] final-normed gen-expert states -> [N, 48]."""
        return self.llm2vae(hidden)
