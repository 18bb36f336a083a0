"""How much GPU memory a generation batch needs, so that `generate_media` picks the largest batch that fits.

A per-shape model, computed from the backbone's shapes and from how transformer.py and vae.py run:

* denoising, per sample: the activations of the biggest forward (the prefill of the conditional and
  unconditional prefixes, or the per-step target query, whichever has more tokens), the KV caches of the
  prefixes, and the step's own tensors (latent embeddings, query, velocities);
* VAE decode, per output pixel of one decoder call (one image, or one pixel frame of a video: vae.py runs
  the full-resolution stages frame by frame), from the decoder's widths.

    footprint = GenerationFootprint.of(llm_cfg, vae_dec_dim, dtype_bytes, shape)
    footprint.batch_bytes(batch)       denoising of `batch` samples + decoding one image/frame at a time
    largest_batch(footprint, budget, cap)

The constants are upper bounds of what is alive at the peak (counted below), with `SAFETY` on top;
benchmarks/bench_generation.py prints predicted against measured peaks.  `free_gpu_bytes(device)` is
the budget: free device memory plus what PyTorch's allocator holds but does not use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LLMConfig
from .transformer import MLP_CHUNK_TOKENS

SAFETY = 1.25  # headroom for allocator fragmentation and what the counts below leave out
RESERVE_BYTES = 1 << 30  # never plan into the last GiB (CUDA context growth, cuDNN workspaces)
TEXT_TOKENS = 1024  # allowance for the template and prompt tokens of a prefix


@dataclass(frozen=True)
class GenerationShape:
    """What one sample of a batch brings to the GPU (all rows of a batch share it)."""

    target_tokens: int  # latent tokens of the output: t * h * w
    condition_tokens: int  # tokens of visual conditions in the prefix (edits: ViT + source latent)
    pixels_per_frame: int  # output H * W
    cfg: bool  # whether an unconditional branch runs (two query rows per sample)


@dataclass(frozen=True)
class GenerationFootprint:
    shape: GenerationShape
    bytes_per_token: int  # activations of one forward, per token, at its widest point
    bytes_per_sample_token: int  # the step's own tensors, per latent token of a sample
    cache_bytes_per_token: int  # KV cache of all layers, per cached token
    mlp_chunk_bytes: int  # the MLP's intermediates of one token chunk (fixed, not per token)
    decode_bytes_per_pixel: int  # VAE decoder activations per output pixel of one call

    @classmethod
    def of(cls, cfg: LLMConfig, vae_dec_dim: int, dtype_bytes: int, shape: GenerationShape) -> GenerationFootprint:
        H, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        # A layer's attention stage, per token, at the attention call: the residual stream and the caller's
        # input, packed q|k|v, rotated q|k, keys/values with the cached ones and repeated for the query
        # heads, the attention output and its copy into the packed order.
        attention = 2 * H + (nh + 2 * nkv) * hd + (nh + nkv) * hd + 2 * nkv * hd + 2 * nh * hd + 2 * nh * hd
        # The MLP stage outside its chunk: residual, caller's input, norm, output, new residual.
        mlp = 5 * H
        return cls(
            shape,
            bytes_per_token=max(attention, mlp) * dtype_bytes,
            bytes_per_sample_token=3 * H * dtype_bytes,  # query, latent embeddings, position rows
            cache_bytes_per_token=cfg.num_hidden_layers * 2 * nkv * hd * dtype_bytes,
            mlp_chunk_bytes=MLP_CHUNK_TOKENS * (3 * inter + H) * dtype_bytes,  # gate|up, activation, out
            # The decoder peaks where its second-to-last stage upsamples to half the output resolution
            # (2 * dec_dim channels there, i.e. dec_dim / 2 values per output pixel per tensor): the
            # upsampled input and the conv output, the shortcut before and after its reshuffle, the stage
            # input at a quarter resolution -- about 3 * dec_dim values per output pixel.
            decode_bytes_per_pixel=3 * vae_dec_dim * dtype_bytes,
        )

    def denoise_bytes(self, batch: int) -> int:
        s = self.shape
        branches = 2 if s.cfg else 1
        prefix = TEXT_TOKENS + s.condition_tokens
        forward_tokens = batch * branches * max(prefix, s.target_tokens + 2)
        return (forward_tokens * self.bytes_per_token + batch * s.target_tokens * self.bytes_per_sample_token
                + self.mlp_chunk_bytes + batch * branches * prefix * self.cache_bytes_per_token)

    def decode_bytes(self) -> int:
        """One decoder call: one image, or one pixel frame of a video."""
        return self.shape.pixels_per_frame * self.decode_bytes_per_pixel

    def batch_bytes(self, batch: int, decoded: int = 1) -> int:
        """Denoising `batch` samples while `decoded` images (or frames) of the previous batch decode."""
        return int(SAFETY * (self.denoise_bytes(batch) + decoded * self.decode_bytes()))

    def decode_chunk(self, batch: int, budget: int | None) -> int:
        """How many images of a batch one decoder call takes, next to the next batch's denoising."""
        if budget is None:
            return batch
        chunk = batch
        while chunk > 1 and self.batch_bytes(batch, chunk) > budget:
            chunk -= 1
        return chunk


def largest_batch(footprint: GenerationFootprint, budget: int | None, cap: int) -> int:
    """The largest batch <= cap whose footprint fits `budget` bytes (None: no limit); at least 1."""
    if budget is None:
        return cap
    batch = cap
    while batch > 1 and footprint.batch_bytes(batch) > budget:
        batch -= 1
    return batch


def free_gpu_bytes(device: torch.device) -> int | None:
    """Bytes a new batch may use on `device`: free memory plus the allocator's unused cache, less a reserve
    (None off CUDA: host memory is not planned)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(free + cached - RESERVE_BYTES, 0)
