"""`LancePipeline`: load a checkpoint family once, then one batched method per task.

    pipe = LancePipeline.from_pretrained("lance-tiny", family="image", device="auto", dtype="bfloat16")
    pipe.x2t_image(images, questions, preset="image_768res", max_new_tokens=256)

Media in are uint8 numpy arrays, images `(H, W, 3)`, videos `(T, H, W, 3)` already frame-sampled with
`media_rules.sample_frame_indices`; media out likewise.  Loaded parts are plain attributes: `model`
(LanceModel), `tokenizer`, `device`, `dtype`, `files`, `load_stats`; `vae` is loaded on first use by a
generation or editing task.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import preprocess
from .checkpoint import CheckpointFiles, resolve_checkpoint
from .generate import generate_media, media_rows, text_rows
from .loader import LoadStats, load_lance_model
from .sampler import SamplerSettings
from .sequence import build_understanding
from .tokenizer import LanceTokenizer
from .understand import generate_text, normalize_answer

if TYPE_CHECKING:
    from .vae import WanVAE

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LancePipeline:
    def __init__(self, files: CheckpointFiles, *, source: str, revision: str | None, device: torch.device,
                 dtype: torch.dtype, cache_dir: str | Path | None) -> None:
        self.files, self.source, self.revision = files, source, revision
        self.family = files.family
        self.device, self.dtype, self.cache_dir = device, dtype, cache_dir
        self.model, self.load_stats = load_lance_model(files, device, dtype)
        self.tokenizer = LanceTokenizer(files.model_dir)
        self._vae: WanVAE | None = None

    @classmethod
    def from_pretrained(cls, source: str, *, family: str, revision: str | None = None, device: str = "auto",
                        dtype: str = "bfloat16", cache_dir: str | Path | None = None) -> LancePipeline:
        files = resolve_checkpoint(source, family, revision=revision, cache_dir=cache_dir)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return cls(files, source=source, revision=revision, device=resolve_device(device), dtype=DTYPES[dtype],
                   cache_dir=cache_dir)

    @property
    def vae(self) -> WanVAE:
        """The Wan 2.2 VAE, fetched and loaded the first time a generation/editing task needs it."""
        if self._vae is None:
            from .vae import load_vae

            files = resolve_checkpoint(self.source, self.family, revision=self.revision, cache_dir=self.cache_dir,
                                       with_vae=True)
            self._vae = load_vae(files.vae_path, device=self.device, dtype=self.dtype)
        return self._vae

    # ------------------------------------------------------------------------------------------------
    # Understanding
    # ------------------------------------------------------------------------------------------------
    def x2t_image(self, images: list[np.ndarray], questions: list[str], *, preset: str = "image_768res",
                  max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  seeds: list[int] | None = None, system_prompt: str | None = None) -> list[str]:
        """Answer `questions[i]` about `images[i]` (uint8 (H, W, 3)); one batched decode."""
        return self._x2t(images, questions, "image", preset=preset, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, seeds=seeds, system_prompt=system_prompt)

    def x2t_video(self, videos: list[np.ndarray], questions: list[str], *, preset: str = "video_480p",
                  max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  seeds: list[int] | None = None, system_prompt: str | None = None) -> list[str]:
        """Answer `questions[i]` about `videos[i]` (uint8 (T, H, W, 3), already frame-sampled)."""
        return self._x2t(videos, questions, "video", preset=preset, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, seeds=seeds, system_prompt=system_prompt)

    def _x2t(self, media: list[np.ndarray], questions: list[str | None], kind: str, *, preset: str,
             max_new_tokens: int, temperature: float, top_p: float, seeds: list[int] | None,
             system_prompt: str | None) -> list[str]:
        if len(media) != len(questions):
            raise ValueError(f"{len(media)} inputs for {len(questions)} questions")
        if not media:
            return []
        merge = self.model.vit_cfg.spatial_merge_size
        patches, grids = [], []
        for frames in media:
            p, grid = preprocess.vit_patches(preprocess.resize_to_bucket(frames, preset, "vit"))
            patches.append(p)
            grids.append(grid)
        with torch.inference_mode():
            # One ViT pass over the whole batch; visuals never attend to each other.
            vit_out = self.model.vit(torch.cat(patches).to(self.device), grids)
        counts = [t * h * w // merge**2 for t, h, w in grids]
        vit_tokens = [[chunk] for chunk in vit_out.split(counts)]
        layouts = [
            build_understanding(self.tokenizer, q or "", [(t, h // merge, w // merge)], system_prompt=system_prompt,
                                kind=kind, tokens_per_second=self.model.llm_cfg.tokens_per_second)
            for q, (t, h, w) in zip(questions, grids, strict=True)
        ]
        result = generate_text(self.model, layouts, vit_tokens, eos_id=self.tokenizer.special.im_end,
                               vocab_limit=len(self.tokenizer), max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seeds=seeds)
        return [normalize_answer(self.tokenizer.decode(ids)) for ids in result.ids]

    # ------------------------------------------------------------------------------------------------
    # Generation and editing (generate.py); `max_batch_size` caps the rows denoised together
    # ------------------------------------------------------------------------------------------------
    def t2i(self, prompts: list[str], *, height: int = 768, width: int = 768, steps: int = 30, shift: float = 3.5,
            cfg_scale: float = 4.0, cfg_interval: tuple[float, float] = (0.4, 1.0), cfg_renorm_min: float = 0.0,
            seeds: list[int] | None = None, max_batch_size: int | None = None) -> list[np.ndarray]:
        """One uint8 (H, W, 3) image per prompt; H, W = the request floored to multiples of 16."""
        settings = SamplerSettings(steps, shift, cfg_scale, tuple(cfg_interval), cfg_renorm_min)
        return generate_media(self.model, self.tokenizer, self.vae, "t2i", text_rows(prompts, height, width, 1, seeds),
                              settings, max_batch_size=max_batch_size)

    def t2v(self, prompts: list[str], *, height: int = 768, width: int = 768, frames: int = 50, steps: int = 30,
            shift: float = 3.5, cfg_scale: float = 4.0, cfg_interval: tuple[float, float] = (0.4, 1.0),
            cfg_renorm_min: float = 0.0, seeds: list[int] | None = None,
            max_batch_size: int | None = None) -> list[np.ndarray]:
        """One uint8 (4(t-1)+1, H, W, 3) video per prompt, t = (frames - 1)//4 + 1 latent frames."""
        settings = SamplerSettings(steps, shift, cfg_scale, tuple(cfg_interval), cfg_renorm_min)
        rows = text_rows(prompts, height, width, frames, seeds)
        return generate_media(self.model, self.tokenizer, self.vae, "t2v", rows, settings,
                              max_batch_size=max_batch_size)

    def i2v(self, images: list[np.ndarray], prompts: list[str], *, preset: str = "video_480p", frames: int = 50,
            steps: int = 30, shift: float = 3.5, cfg_scale: float = 4.0,
            cfg_interval: tuple[float, float] = (0.4, 1.0), cfg_renorm_min: float = 0.0,
            seeds: list[int] | None = None, max_batch_size: int | None = None) -> list[np.ndarray]:
        """Animate `images[i]` (uint8 (H, W, 3), the first frame) per `prompts[i]`; size = the image's bucket."""
        settings = SamplerSettings(steps, shift, cfg_scale, tuple(cfg_interval), cfg_renorm_min)
        rows = media_rows(images, prompts, preset, seeds, frames=frames)
        return generate_media(self.model, self.tokenizer, self.vae, "i2v", rows, settings, preset=preset,
                              max_batch_size=max_batch_size)

    def image_edit(self, images: list[np.ndarray], instructions: list[str], *, preset: str = "image_768res",
                   steps: int = 30, shift: float = 3.5, cfg_scale: float = 4.0,
                   cfg_interval: tuple[float, float] = (0.4, 1.0), cfg_renorm_min: float = 0.0,
                   seeds: list[int] | None = None, max_batch_size: int | None = None) -> list[np.ndarray]:
        """Edit `images[i]` (uint8 (H, W, 3)) per `instructions[i]`; output size = the image's bucket."""
        settings = SamplerSettings(steps, shift, cfg_scale, tuple(cfg_interval), cfg_renorm_min)
        rows = media_rows(images, instructions, preset, seeds)
        return generate_media(self.model, self.tokenizer, self.vae, "image_edit", rows, settings, preset=preset,
                              max_batch_size=max_batch_size)

    def video_edit(self, videos: list[np.ndarray], instructions: list[str], *, preset: str = "video_480p",
                   steps: int = 30, shift: float = 3.5, cfg_scale: float = 4.0,
                   cfg_interval: tuple[float, float] = (0.4, 1.0), cfg_renorm_min: float = 0.0,
                   seeds: list[int] | None = None, max_batch_size: int | None = None) -> list[np.ndarray]:
        """Edit `videos[i]` (uint8 (T, H, W, 3), frame-sampled, T = 4k+1) per `instructions[i]`."""
        settings = SamplerSettings(steps, shift, cfg_scale, tuple(cfg_interval), cfg_renorm_min)
        rows = media_rows(videos, instructions, preset, seeds)
        return generate_media(self.model, self.tokenizer, self.vae, "video_edit", rows, settings, preset=preset,
                              max_batch_size=max_batch_size)

__all__ = ["LancePipeline", "LoadStats", "resolve_device"]
