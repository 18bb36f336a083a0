"""The official inference script's random draws, replayed draw for draw (`seed_mode: official`).

One run of the official `inference_lance.py` (one task, batch size 1, one process) draws from torch's
global generators, in this order (read from the official code; checked draw for draw against it by the
fixtures in tests/fixtures/golden/official_runs/):

start-up  `set_seed(2025)` (`global_seed * world_size + rank`) seeds python `random`, numpy, the CPU
          generator and every CUDA generator.  The modules are built on the CPU and draw their default
          initialisation from the CPU generator before the checkpoint overwrites the values: the LLM
          (`Qwen2ForCausalLM`: embedding normal, then per layer the und and gen attention projections and
          MLPs, then `lm_head`), the ViT, then Lance's own layers (timestep MLP, `vae2llm`, `llm2vae`); the
          VAE is built on the meta device (no draws).  `iter(DataLoader)` draws one int64 (its base seed).
row k     the dataset, CPU generator: torchvision `RandomResizedCrop` per frame of each resized stream (edits:
          the ViT stream, then the VAE stream; i2v: the VAE stream) -- 2 uniforms and 2 randints (the crop
          offset) when the full-area crop fits, else 10 x 2 uniforms and a centred crop -- then
          `torch.randn` of the placeholder target video [3, T, H, W] (edits: the source's frames and bucket;
          i2v: NUM_FRAMES -- lance-ray's `frames` -- and the image's bucket).
          The VAE encode, on the VAE's device (the CPU generator on a CPU, the device's CUDA generator on a
          GPU): one float32 `randn_like` [1, 48, t, h, w] per encoded clip -- edits: the source (its
          posterior sample ε) then the placeholder (discarded); i2v: the whole T-frame clip, of which
          latent frame 0 is kept.
          The initial noise [all latent rows, 48] in the model's dtype, on the model's device (a CUDA
          generator on a GPU): from its own generator seeded with seed + i_sample (= the seed at batch
          size 1), except for a seed <= 0: then from the global generator of that device, after the encode.
          t2i and t2v rows draw nothing else from torch (python `random` picks among one-element lists).
          x2t rows: `RandomResizedCrop` per frame of the ViT stream, and for a caption (no question) python
          `random.choice` of the four caption instructions.

`OfficialRun` holds those generators and hands each row its draws, rows in the run's order.  The CPU
generator is replayed only when one of its values is needed (on a CPU: every ε; on a GPU: only a crop
offset that has two possible values): until then its draws are only counted.  Replaying the start-up
costs what initialising the model's weights on the CPU costs, once per process and model: 6.8 billion
draws for the real checkpoint, 35 s of one CPU core and 1.5 GB at peak (measured 2026-11-30); well under a
second for the tiny one.  On a GPU the CUDA generator's Philox
offsets depend on the draw sizes and on the GPU model (the kernel's launch grid), so ε is the official
one on the same kind of GPU; what we reproduce there is the generator kind, its seed and its sequence of
draws.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Literal

import torch

from . import preprocess
from .config import LLMConfig, ViTConfig
from .presets import Stream
from .sampler import LATENT_CHANNELS
from .tasks import TaskSpec

GLOBAL_SEED = 2025  # inference_lance.py: set_seed(global_seed * world_size + rank), one process
# torchvision RandomResizedCrop.get_params: attempts before the centred fallback, 2 uniforms each.
_CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class Draw:
    """One torch op on a generator; replaying it moves the generator exactly as the official op did."""

    kind: Literal["uniform", "normal", "int64", "randint"]
    shape: tuple[int, ...]
    high: int = 0  # randint: values in [0, high)

    def replay(self, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "uniform":  # nn.init.kaiming_uniform_ / uniform_, torch.empty(1).uniform_
            return torch.empty(self.shape).uniform_(generator=generator)
        if self.kind == "normal":  # nn.init.normal_, torch.randn (both fill an empty float32 tensor)
            return torch.empty(self.shape).normal_(generator=generator)
        if self.kind == "int64":  # torch.empty((), dtype=torch.int64).random_() (DataLoader base seed)
            return torch.empty(self.shape, dtype=torch.int64).random_(generator=generator)
        return torch.randint(0, self.high, self.shape, generator=generator)


def _linear(out_features: int, in_features: int, bias: bool = True) -> list[Draw]:
    # nn.Linear.reset_parameters: kaiming-uniform weight, then a uniform bias.
    return [Draw("uniform", (out_features, in_features))] + ([Draw("uniform", (out_features,))] if bias else [])


def startup_draws(llm: LLMConfig, vit: ViTConfig) -> list[Draw]:
    """The CPU-generator draws of the official start-up, in order, for a checkpoint of these shapes."""
    H, inter = llm.hidden_size, llm.intermediate_size
    q, kv = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    attention = _linear(q, H) + _linear(kv, H) + _linear(kv, H) + _linear(H, q, bias=False)
    mlp = _linear(inter, H, bias=False) + _linear(inter, H, bias=False) + _linear(H, inter, bias=False)
    draws = [Draw("normal", (llm.vocab_size, H))]  # embed_tokens
    for _ in range(llm.num_hidden_layers):  # attention und, attention gen, MLP und, MLP gen
        draws += attention + attention + mlp + mlp
    draws += _linear(llm.vocab_size, H, bias=False)  # lm_head
    D, vit_inter = vit.hidden_size, vit.intermediate_size
    draws.append(Draw("uniform", (D, vit.in_channels, vit.temporal_patch_size, vit.patch_size, vit.patch_size)))
    block = _linear(3 * D, D) + _linear(D, D) + _linear(vit_inter, D) + _linear(vit_inter, D) + _linear(D, vit_inter)
    draws += block * vit.depth
    merged = D * vit.spatial_merge_size**2
    draws += _linear(merged, merged) + _linear(vit.out_hidden_size, merged)  # patch merger
    draws += _linear(H, llm.timestep_freq_dim) + _linear(H, H)  # timestep embedder
    draws += _linear(H, llm.latent_channels) + _linear(llm.latent_channels, H)  # vae2llm, llm2vae
    draws.append(Draw("int64", ()))  # iter(DataLoader)
    return draws


@functools.lru_cache(maxsize=2)
def _startup_state(llm: LLMConfig, vit: ViTConfig) -> torch.Tensor:
    """The CPU generator's state after the official start-up (replayed once per process and model)."""
    generator = torch.Generator().manual_seed(GLOBAL_SEED)
    for draw in startup_draws(llm, vit):
        draw.replay(generator)
    return generator.get_state()


@dataclass
class RowDraws:
    """The official run's draws for one row, those lance-ray uses (the others only move the generators)."""

    eps: torch.Tensor | None = None  # float32 [48, t, h, w] on the VAE's device: posterior noise of the condition
    vit_offsets: list[tuple[int, int]] | None = None  # per source frame, (top, left) of the ViT-stream crop
    vae_offsets: list[tuple[int, int]] | None = None  # same for the VAE stream
    noise: torch.Tensor | None = None  # [n_rows, 48] initial noise (all latent rows), on the model's device
    instruction: str | None = None  # x2t: the caption instruction python's `random` picked


class OfficialRun:
    """One run of the official script: its global generators, advanced row by row in the run's order."""

    def __init__(self, llm: LLMConfig, vit: ViTConfig, device: torch.device | str) -> None:
        self.llm, self.vit = llm, vit
        self.device = torch.device(device)
        self._cpu: torch.Generator | None = None  # the CPU generator, once replayed
        self._pending: list[Draw] = []  # CPU draws made since, not replayed yet
        self._cuda = (None if self.device.type == "cpu"
                      else torch.Generator(self.device).manual_seed(GLOBAL_SEED))
        self._python = random.Random(GLOBAL_SEED)  # set_seed seeds python's `random` too

    # ---- the generators --------------------------------------------------------------------------------
    def _cpu_generator(self) -> torch.Generator:
        """The CPU generator brought up to date (start-up and every draw counted so far)."""
        if self._cpu is None:
            self._cpu = torch.Generator()
            self._cpu.set_state(_startup_state(self.llm, self.vit))
        for draw in self._pending:
            draw.replay(self._cpu)
        self._pending.clear()
        return self._cpu

    def _cpu_draw(self, draw: Draw) -> None:
        """A CPU draw whose value nobody uses: counted now, replayed when a later value is needed."""
        self._pending.append(draw)

    def _device_randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`torch.randn` from the global generator of the VAE/model device (float32 unless `dtype`)."""
        if self._cuda is None:
            return torch.randn(shape, generator=self._cpu_generator(), dtype=dtype)
        return torch.randn(shape, generator=self._cuda, device=self.device, dtype=dtype)

    # ---- the dataset's draws ---------------------------------------------------------------------------
    def crop_offsets(self, height: int, width: int, frames: int, preset: str,
                     stream: Stream) -> list[tuple[int, int]] | None:
        """torchvision RandomResizedCrop on `frames` frames of height x width: per frame the crop's
        (top, left), or None where the crop is the centred fallback (its 20 draws only move the generator)."""
        slack = preprocess.crop_slack(height, width, preset, stream)
        if slack is None:
            for _ in range(frames * 2 * _CROP_ATTEMPTS):
                self._cpu_draw(Draw("uniform", (1,)))
            return None
        offsets = []
        for _ in range(frames):
            self._cpu_draw(Draw("uniform", (1,)))  # area scale, always 1
            self._cpu_draw(Draw("uniform", (1,)))  # log aspect ratio, always the bucket's
            offsets.append((self._offset(slack[0]), self._offset(slack[1])))
        return offsets

    def _offset(self, choices: int) -> int:
        draw = Draw("randint", (1,), high=choices)
        if choices == 1:  # one possible value: no need to bring the generator up to date for it
            self._cpu_draw(draw)
            return 0
        return int(draw.replay(self._cpu_generator()).item())

    # ---- one row ------------------------------------------------------------------------------------------
    def generation_row(self, task: TaskSpec, media_shape: tuple[int, int, int] | None, preset: str,
                       frames: int | None, seed: int, noise_rows: int, noise_dtype: torch.dtype) -> RowDraws:
        """The official draws of the next row of a generation run: `media_shape` = (T, H, W) of its input
        media (None for t2i/t2v), `frames` the run's NUM_FRAMES (i2v), `noise_rows` the latent rows of its
        initial noise, drawn in `noise_dtype` on the device as the official code draws it."""
        row = RowDraws()
        if task.conditioning != "none":
            if media_shape is None:
                raise ValueError(f"{task.name} needs input media")
            count, height, width = media_shape
            if task.conditioning == "source":
                row.vit_offsets = self.crop_offsets(height, width, count, preset, "vit")
            else:  # first_frame: the image alone, in the VAE stream only
                count = 1
            row.vae_offsets = self.crop_offsets(height, width, count, preset, "vae")
            bucket_h, bucket_w = preprocess.stream_size(height, width, preset, "vae")
            clip = count if task.conditioning == "source" else frames
            if clip is None:
                raise ValueError(f"{task.name} needs its number of frames")
            self._cpu_draw(Draw("normal", (3, clip, bucket_h, bucket_w)))  # placeholder target video
            grid = (preprocess.latent_frames(clip), bucket_h // preprocess.VAE_SPATIAL,
                    bucket_w // preprocess.VAE_SPATIAL)
            eps = self._device_randn((1, LATENT_CHANNELS, *grid))[0]
            if task.conditioning == "source":
                self._encode_discarded(grid)  # the placeholder's posterior sample
                row.eps = eps
            else:
                row.eps = eps[:, :1]  # latent frame 0: the image
        shape = (noise_rows, LATENT_CHANNELS)
        if seed <= 0:  # the official "unseeded" noise: the global generator
            row.noise = self._device_randn(shape, dtype=noise_dtype)
        else:  # its own generator of the device's kind (on a GPU, CUDA Philox: not the CPU's values)
            generator = torch.Generator(self.device).manual_seed(seed)
            row.noise = torch.randn(shape, generator=generator, device=self.device, dtype=noise_dtype)
        return row

    def understanding_row(self, media_shape: tuple[int, int, int], preset: str,
                          instructions: tuple[str, ...] | None) -> RowDraws:
        """The official draws of the next row of an x2t run: the ViT-stream crops of its (T, H, W) media and,
        given the `instructions` to pick from (a row without a system prompt), python's pick."""
        count, height, width = media_shape
        row = RowDraws(vit_offsets=self.crop_offsets(height, width, count, preset, "vit"))
        if instructions is not None:
            row.instruction = self._python.choice(instructions)
        return row

    def _encode_discarded(self, grid: tuple[int, int, int]) -> None:
        shape = (1, LATENT_CHANNELS, *grid)
        if self._cuda is None:
            self._cpu_draw(Draw("normal", shape))
        else:
            self._device_randn(shape)
