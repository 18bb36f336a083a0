"""Wan 2.2 VAE (48 latent channels, 16x spatial / 4x temporal), numerically faithful to the official code.

Clean-room PyTorch version of the VAE Lance uses (`Wan2.2_VAE.pth`; official `modeling/vae/wan/vae2_2.py`,
`WanVAE_` and `Wan2_2_VAE`, driven by `modeling/vae/wan/model.py`, `WanVideoVAE`).  Module and
parameter names follow the official state dict, so the official file loads with strict checking and no
key mapping.  Widths come from the checkpoint's tensor shapes (the official file carries no config):
``VAEConfig.from_state_dict(sd)``; ``VAEConfig.wan22()`` is the official size (encoder 160 / decoder 256),
``VAEConfig.small()`` the 16 / 32 model of the `tests/fixtures/golden/vae_small` parity fixtures.

Public API::

    vae = load_vae(path, device="cuda", dtype=torch.bfloat16)      # or WanVAE.from_state_dict(sd, ...)
    mu, log_var = vae.encode(pixels)      # pixels [B, 3, T, H, W] in [-1, 1] (T = 4k+1 used, H, W % 16 == 0)
                                          # -> [B, 48, t, h, w] each; mu normalised, log_var raw (float32)
    z = vae.sample(mu, log_var, generator)             # mu + exp(log_var / 2) * eps, eps from a CPU generator
    for chunk in vae.decode_chunks(z): ...             # pre-clamp floats [B, 3, 1 or 4, H, W] per latent frame
    frames = vae.decode_uint8(z)                       # uint8 [B, T, H, W, 3] with T = 4(t - 1) + 1
    x = vae.decode(z)                                  # float32 [B, 3, T, H, W] clamped to [-1, 1]
    sd = random_vae_state_dict(VAEConfig.small(), seed=0)   # deterministic random weights (tiny checkpoints)

Numerics that matter (all from the official ``vae2_2.py``):
* Input pixels are pixel-unshuffled by 2 (channel = 4*colour + 2*dx + dy) to 12 channels; the decoder's 12
  output channels are shuffled back the same way.
* Chunked causal processing: the encoder sees frame 0 alone, then chunks of 4 frames; the decoder one
  latent frame per call.  3x3x3 causal convs carry their last 2 input frames from chunk to chunk (so for them
  chunking equals one causal pass), but the temporal resampling does not: the encoder's temporal
  downsample skips its conv on the first chunk and later convolves [previous chunk's last frame] + chunk;
  the decoder's temporal upsample skips its conv on latent frame 0 and treats that frame as zeros in its
  causal context.  Reproducing this is the reason for the explicit chunk loop below.
* ``mu`` is normalised per channel with the 48 official mean/std constants, ``(mu - mean) * (1 / std)``,
  with ``1 / std`` computed in the model dtype; ``log_var`` is not normalised.  Decoding undoes it as
  ``z / (1 / std) + mean``.
* Pixels out: ``round((clamp(x, -1, 1) * 0.5 + 0.5) * 255)`` as uint8.

Why not diffusers' ``AutoencoderKLWan``: evaluated with diffusers 0.42 (its Wan 2.2 mode, ``is_residual=True``).
Its single-file converter mis-maps the Wan 2.2 keys, but with a hand-written key map (see
tests/test_lance_vae.py: test_matches_diffusers) it loads strictly and reproduces the goldens as closely as
this file does (the two agree to ~1e-6).  It is not used because what the pipeline needs is outside its
public API: per-latent-frame streaming and pre-clamp pixels would mean driving its private cache fields
(``_feat_map``, ``_conv_idx``, ``clear_cache``, ``decoder(first_chunk=...)``), its posterior clamps log_var
(the official does not), the latent normalisation is not part of it, and official keys need renaming.  This
implementation loads the official keys as they are and is bitwise identical to the official ``WanVAE_`` run
on the same machine (encode, decode; batch 1).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Official latent statistics (`Wan2_2_VAE.__init__`), one per latent channel.
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

PATCH = 2  # pixel unshuffle factor in front of the encoder / behind the decoder
SPATIAL = 16  # total spatial compression (patch 2 x three 2x downsamples)
TEMPORAL = 4  # total temporal compression (two 2x temporal downsamples)
CACHE_T = 2  # frames a 3x3x3 causal conv keeps from the previous chunk


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 160  # encoder base width (stage widths dim * [1, 1, 2, 4, 4])
    dec_dim: int = 256  # decoder base width (stage widths dec_dim * [4, 4, 4, 2, 1])
    z_dim: int = 48  # latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder stage; decoder: reversed

    @classmethod
    def wan22(cls) -> VAEConfig:
        """The official Wan2.2_VAE.pth (704,688,668 parameters)."""
        return cls()

    @classmethod
    def small(cls) -> VAEConfig:
        """The small-width model of the vae_small parity fixtures (10,497,388 parameters), for fast tests."""
        return cls(dim=16, dec_dim=32)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> VAEConfig:
        """Widths from tensor shapes; the rest of the architecture is fixed by Wan 2.2."""
        try:
            dim = sd["encoder.conv1.weight"].shape[0]
            dec_dim = sd["decoder.head.2.weight"].shape[1]
            z_dim = sd["conv2.weight"].shape[0]
        except KeyError as e:
            raise ValueError(f"not a Wan 2.2 VAE state dict: missing {e}") from None
        return cls(dim=dim, dec_dim=dec_dim, z_dim=z_dim)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
Cache = dict[nn.Module, torch.Tensor]  # per-clip state of a chunked pass: module -> frames it kept


class CausalConv3d(nn.Conv3d):
    """3D conv, zero-padded in time only in front (causal).  With a cache, the frames kept from the
    previous chunk replace the front zero padding, so a chunked pass equals one pass over the clip."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int, int]) -> None:
        super().__init__(c_in, c_out, kernel)
        kt, kh, kw = self.kernel_size
        self.front = kt - 1  # temporal padding, all in front
        self.spatial_pad = (kw // 2, kw // 2, kh // 2, kh // 2)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W]
        pad_t = self.front
        if cache is not None and self.front > 0:
            prev = cache.get(self)
            if prev is not None:
                x = torch.cat([prev, x], dim=2)
                pad_t -= prev.shape[2]
            cache[self] = x[:, :, -CACHE_T:].clone()  # a copy: a view would keep the whole chunk alive
        return super().forward(F.pad(x, (*self.spatial_pad, pad_t, 0)))


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned gain (official `RMS_norm`, no eps term)."""

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place on the fresh normalised tensor: the same operations in the same order, one buffer
        return F.normalize(x, dim=1).mul_(self.scale).mul_(self.gamma)


def per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame: [B, C, T, H, W] -> fold T into the batch and back."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(  # SiLU in place: it follows a norm whose output nothing else reads
            RMSNorm(c_in),
            nn.SiLU(inplace=True),
            CausalConv3d(c_in, c_out, 3),
            RMSNorm(c_out),
            nn.SiLU(inplace=True),
            nn.Identity(),  # the official dropout slot (p = 0), kept so parameter indices match
            CausalConv3d(c_out, c_out, 3),
        )
        self.shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions of each frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] (N = frames)
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)  # [N, 1, HW, C] each
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.squeeze(1).permute(0, 2, 1).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        return x + per_frame(self._attend, x)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of an encoder stage: fold (t, 2, 2) into channels, average channel groups."""

    def __init__(self, c_out: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.c_out, self.ft, self.fs = c_out, factor_t, factor_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))  # zero frames in front
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).contiguous()  # [B, C, ft, fs, fs, t', h', w']
        x = x.view(b, self.c_out, -1, t // ft, h // fs, w // fs)  # consecutive channel groups
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of a decoder stage: repeat channels, unfold them into (t, 2, 2)."""

    def __init__(self, c_in: int, c_out: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.c_out, self.ft, self.fs = c_out, factor_t, factor_s
        self.repeats = c_out * factor_t * factor_s * factor_s // c_in

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.c_out, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).contiguous().view(b, self.c_out, t * ft, h * fs, w * fs)
        # latent frame 0 decodes to a single frame: drop the first ft - 1 copies
        return x[:, :, ft - 1 :] if first_chunk else x


class Downsample(nn.Module):
    """2x spatial (right/bottom zero pad, stride-2 3x3 conv per frame), optionally then 2x temporal."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        # unpadded and uncached: forward builds its input from the previous chunk explicitly
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        prev = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if prev is None:  # first chunk (frame 0): no temporal conv
            return x
        # no zero padding: [last frame of the previous chunk] + chunk, stride 2 (5 -> 2, 3 -> 1 frames)
        return self.time_conv(torch.cat([prev, x], dim=2))


class Upsample(nn.Module):
    """Optionally 2x temporal first (a causal conv to 2C channels: [0:C] -> frame 2i, [C:2C] -> 2i+1),
    then 2x nearest-exact spatial and a 3x3 conv per frame.  (The official upsamples in float32 and casts
    back; nearest-exact only copies values, so doing it in the input dtype gives the same bits with half
    or a quarter of the memory.)"""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim, 3, padding=1)
        )
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample[1](self.resample[0](x))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.time_conv is not None:
            if self.time_conv not in cache:
                # latent frame 0 passes through and enters the causal context of later frames as zeros
                cache[self.time_conv] = torch.zeros_like(x[:, :, -1:])
            else:
                b, c, t, h, w = x.shape
                y = self.time_conv(x, cache).view(b, 2, c, t, h, w)
                x = torch.stack([y[:, 0], y[:, 1]], dim=3).view(b, c, t * 2, h, w)
        return per_frame(self._spatial, x)


class DownBlock(nn.Module):
    """Encoder stage: residual blocks (+ downsample) plus the AvgDown3D shortcut of the stage input."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(c_out, 2 if temporal else 1, 2 if down else 1)
        blocks: list[nn.Module] = [
            ResidualBlock(c_in if i == 0 else c_out, c_out) for i in range(num_res_blocks)
        ]
        if down:
            blocks.append(Downsample(c_out, temporal))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for block in self.downsamples:
            x = block(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    """Decoder stage: residual blocks (+ upsample) plus the DupUp3D shortcut when the stage upsamples."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(c_in, c_out, 2 if temporal else 1, 2) if up else None
        blocks: list[nn.Module] = [
            ResidualBlock(c_in if i == 0 else c_out, c_out) for i in range(num_res_blocks)
        ]
        if up:
            blocks.append(Upsample(c_out, temporal))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: Cache, first_chunk: bool) -> torch.Tensor:
        y = x
        for block in self.upsamples:
            y = block(y, cache)
        return y if self.avg_shortcut is None else y + self.avg_shortcut(x, first_chunk)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        n = len(cfg.dim_mult)
        t_down = cfg.temporal_downsample  # stages beyond the list do not resample in time
        t_down = tuple(i < len(t_down) and t_down[i] for i in range(n))
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3)
        self.downsamples = nn.Sequential(
            *(DownBlock(dims[i], dims[i + 1], cfg.num_res_blocks, t_down[i], i != n - 1) for i in range(n))
        )
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, cfg.z_dim * 2, 3))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        # x: one chunk [B, 12, 1 or 4, H/2, W/2] -> [B, 2z, 1, H/16, W/16]
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dec_dim * m for m in (mult[-1], *mult[::-1])]
        n = len(mult)
        t_up = cfg.temporal_downsample[::-1]  # stages beyond the list do not resample in time
        t_up = tuple(i < len(t_up) and t_up[i] for i in range(n))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        c = dims[0]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.upsamples = nn.Sequential(
            *(UpBlock(dims[i], dims[i + 1], cfg.num_res_blocks + 1, t_up[i], i != n - 1) for i in range(n))
        )
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3 * PATCH * PATCH, 3))
        # Stages after the last temporal upsampling are causal frame by frame (causal convs with their cache,
        # per-frame norms and spatial resampling): they run one pixel frame at a time, which cuts the
        # decoder's peak memory -- its widest activations are there, at full resolution -- by the 4 frames
        # a latent frame becomes.
        self.per_frame_from = 1 + max((i for i in range(n) if t_up[i]), default=-1)

    def forward(self, x: torch.Tensor, cache: Cache, first_chunk: bool) -> torch.Tensor:
        # x: one latent frame [B, z, 1, h, w] -> [B, 12, 1 (first) or 4, 8h, 8w]
        x = self.conv1(x, cache)
        for block in self.middle:
            x = block(x, cache)
        for block in self.upsamples[: self.per_frame_from]:
            x = block(x, cache, first_chunk)
        frames = []
        for f in range(x.shape[2]):
            y = x[:, :, f : f + 1]
            for block in self.upsamples[self.per_frame_from :]:
                y = block(y, cache, first_chunk)
            frames.append(self.head[2](self.head[1](self.head[0](y)), cache))
        return frames[0] if len(frames) == 1 else torch.cat(frames, dim=2)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, 4C, T, H/2, W/2], channel = 4c + 2*dx + dy."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)  # [b, c, t, h', dy, w', dx]
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, t, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of patchify."""
    b, c4, t, h, w = x.shape
    x = x.view(b, c4 // (PATCH * PATCH), PATCH, PATCH, t, h, w)  # [b, c, dx, dy, t, h, w]
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c4 // (PATCH * PATCH), t, h * PATCH, w * PATCH)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Official pixel conversion of decoder output [..] in (about) [-1, 1]: round((clamp * 0.5 + 0.5) * 255)."""
    return x.float().clamp(-1, 1).mul(0.5).add(0.5).mul(255).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------
class WanVAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)  # -> mu | log_var
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    @classmethod
    def from_state_dict(
        cls,
        sd: dict[str, torch.Tensor],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> WanVAE:
        """Build from an official-layout state dict (strict), casting tensor by tensor.  Tensors already in
        the target device/dtype are used as they are (shared with `sd`, e.g. a memory-mapped file)."""
        with torch.device("meta"):
            model = cls(VAEConfig.from_state_dict(sd))
        model.load_state_dict(
            {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True
        )
        return model.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) as [1, z, 1, 1, 1] in the model dtype (the official keeps them in the VAE dtype)."""
        mean = torch.tensor(LATENT_MEAN, dtype=self.dtype, device=device).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=self.dtype, device=device).view(1, -1, 1, 1, 1)
        return mean, inv_std

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, 3, T, H, W] (or [3, T, H, W]) in [-1, 1] -> (mu_norm, log_var), each float32
        [B, 48, t, h, w] with t = (T - 1)//4 + 1 (frames after 4(t-1)+1 are ignored), h, w = H/16, W/16."""
        if pixels.dim() == 4:
            pixels = pixels[None]
        if pixels.shape[-2] % SPATIAL or pixels.shape[-1] % SPATIAL:
            raise ValueError(
                f"height and width must be multiples of {SPATIAL}, got {tuple(pixels.shape[-2:])}"
            )
        x = patchify(pixels.to(device=self.conv2.weight.device, dtype=self.dtype))
        cache: Cache = {}
        chunks = [self.encoder(x[:, :, :1], cache)]
        for start in range(1, x.shape[2] - TEMPORAL + 1, TEMPORAL):
            chunks.append(self.encoder(x[:, :, start : start + TEMPORAL], cache))
        mu, log_var = self.conv1(torch.cat(chunks, dim=2)).chunk(2, dim=1)
        mean, inv_std = self.latent_stats(mu.device)
        return ((mu - mean) * inv_std).float(), log_var.float()

    @staticmethod
    def sample(
        mu: torch.Tensor,
        log_var: torch.Tensor,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Posterior draw mu + exp(log_var / 2) * eps (the official order of operations): eps ~ N(0, 1) float32
        from `generator` (a CPU generator: the same values on any device), or given -- under `seed_mode:
        official` the draw of the official run's global generator (official_random.py)."""
        if eps is None:
            eps = torch.randn(mu.shape, generator=generator, dtype=torch.float32)
        return eps.to(mu.device) * torch.exp(0.5 * log_var) + mu

    @torch.no_grad()
    def decode_chunks(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """Normalised latents [B, 48, t, h, w] (or [48, t, h, w]) -> per latent frame, the decoder's pixels
        before clamping, float32 [B, 3, n, 16h, 16w] with n = 1 for latent frame 0 and 4 after it.

        One latent frame per decoder call (the official chunking); only the causal caches (2 frames per
        conv) outlive a call, so memory does not grow with the clip length."""
        if z.dim() == 4:
            z = z[None]
        mean, inv_std = self.latent_stats(self.conv2.weight.device)
        z = z.to(device=mean.device, dtype=self.dtype)
        x = self.conv2(z / inv_std + mean)
        cache: Cache = {}
        for i in range(x.shape[2]):
            yield unpatchify(self.decoder(x[:, :, i : i + 1], cache, first_chunk=i == 0)).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, 48, t, h, w] -> float32 pixels [B, 3, 4(t-1)+1, 16h, 16w] clamped to [-1, 1]."""
        return torch.cat(list(self.decode_chunks(z)), dim=2).clamp_(-1, 1)

    def decode_uint8(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, 48, t, h, w] -> uint8 frames [B, 4(t-1)+1, 16h, 16w, 3] (on the model's device);
        converted chunk by chunk so the float clip never exists in full."""
        return torch.cat([to_uint8(c).permute(0, 2, 3, 4, 1) for c in self.decode_chunks(z)], dim=1)


def load_vae(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WanVAE:
    """Load `Wan2.2_VAE.pth` (or any state dict file in its layout) memory-mapped, cast tensor by tensor."""
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return WanVAE.from_state_dict(sd, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Random weights for tiny checkpoints and tests
# --------------------------------------------------------------------------------------------------
def random_vae_state_dict(
    config: VAEConfig, seed: int, tag_prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic random float32 weights in the official key layout (recipe: docs/model-facts.md).

    Each tensor draws float32 standard normals from numpy PCG64 seeded with [seed, crc32(tag_prefix + key)]:
    conv weights N(0, 1/fan_in), biases N(0, 0.02^2), RMS gains 1 + N(0, 0.05^2); the log-variance half of
    ``conv1.bias`` is -4 (posterior std ~0.14).  tag_prefix defaults to "vae." for the official size and
    "vae_small." otherwise, so that ``random_vae_state_dict(VAEConfig.small(), 0)`` is the model of the
    tests/fixtures/golden/vae_small fixtures bit for bit."""
    if tag_prefix is None:
        tag_prefix = "vae." if config == VAEConfig.wan22() else "vae_small."
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanVAE(config).state_dict().items()}
    sd = {}
    for key, shape in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32((tag_prefix + key).encode())])
        a = rng.standard_normal(size=shape, dtype=np.float32)
        if key.endswith(".gamma"):
            a = a * np.float32(0.05) + np.float32(1.0)
        elif key.endswith(".bias"):
            a *= np.float32(0.02)
        else:
            a *= np.float32(1.0 / math.sqrt(math.prod(shape[1:])))
        sd[key] = torch.from_numpy(a)
    sd["conv1.bias"][config.z_dim :] = -4.0
    return sd
