"""`LancePipeline`: load a checkpoint family once, then one batched method per task.

    pipe = LancePipeline.from_pretrained("lance-tiny", family="image", device="auto", dtype="bfloat16")
    pipe.x2t_image(images, questions, max_new_tokens=128)
    pipe.t2i(prompts, height=512, width=512, seeds=[1, 2])

Every method takes the task's params as keyword arguments (see `tasks.py` for which params a task
reads); anything left out gets the task's default -- the same defaults a job file gets. Params are
validated once, by `Params`, then turned into the model's settings by the task (`TaskSpec.settings`).
`run(task, ...)` is the uniform entry the pipeline's worker uses with settings it built itself.

Media in are uint8 numpy arrays, images `(H, W, 3)`, videos `(T, H, W, 3)` already frame-sampled with
`media_rules.sample_frame_indices`; media out likewise.  Loaded parts are plain attributes: `model`
(LanceModel), `tokenizer`, `device`, `dtype`, `files`, `load_stats`; `vae` is loaded on first use by a
generation or editing task.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import preprocess
from .checkpoint import CheckpointFiles, resolve_checkpoint
from .generate import generate_media, media_rows, text_rows
from .loader import LoadStats, load_lance_model
from .official_random import OfficialRun
from .sequence import build_understanding, caption_instructions
from .settings import DecodeSettings, GenerationSettings
from .tasks import TaskSpec, get_task
from .tokenizer import LanceTokenizer
from .understand import (
    ADMIT_BYTES_PER_TOKEN,
    ADMIT_TOKENS,
    DecodeEngine,
    Request,
    answer_all,
    capacity_for,
    normalize_answer,
    slots_for_memory,
)

if TYPE_CHECKING:
    from .vae import WanVAE

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LancePipeline:
    def __init__(self, files: CheckpointFiles, *, source: str, revision: str | None, device: torch.device,
                 dtype: torch.dtype, cache_dir: str | Path | None, understanding_only: bool = False) -> None:
        self.files, self.source, self.revision = files, source, revision
        self.family = files.family
        self.device, self.dtype, self.cache_dir = device, dtype, cache_dir
        self.understanding_only = understanding_only
        self.model, self.load_stats = load_lance_model(files, device, dtype, understanding_only=understanding_only)
        self.tokenizer = LanceTokenizer(files.model_dir)
        self._vae: WanVAE | None = None

    @classmethod
    def from_pretrained(cls, source: str, *, family: str, revision: str | None = None, device: str = "auto",
                        dtype: str = "bfloat16", cache_dir: str | Path | None = None,
                        understanding_only: bool = False) -> LancePipeline:
        """Load a checkpoint family. `understanding_only`: for x2t alone, leave the generation expert, the
        latent adapters and the VAE off the device (a caption job then needs 8 GB of weights, not 14)."""
        files = resolve_checkpoint(source, family, revision=revision, cache_dir=cache_dir)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return cls(files, source=source, revision=revision, device=resolve_device(device), dtype=DTYPES[dtype],
                   cache_dir=cache_dir, understanding_only=understanding_only)

    @property
    def vae(self) -> WanVAE:
        """The Wan 2.2 VAE, fetched and loaded the first time a generation/editing task needs it."""
        if self.understanding_only:
            raise ValueError("this LancePipeline was loaded with understanding_only=True: it cannot generate")
        if self._vae is None:
            from .vae import load_vae

            files = resolve_checkpoint(self.source, self.family, revision=self.revision, cache_dir=self.cache_dir,
                                       with_vae=True)
            self._vae = load_vae(files.vae_path, device=self.device, dtype=self.dtype)
        return self._vae

    # ------------------------------------------------------------------------------------------------
    # One method per task: keyword params as in a job file's `params`, task defaults for the rest
    # ------------------------------------------------------------------------------------------------
    def x2t_image(self, images: list[np.ndarray], questions: list[str | None], *, seeds: list[int] | None = None,
                  **params) -> list[str]:
        """Answer `questions[i]` about `images[i]` (uint8 (H, W, 3)); params: preset, max_new_tokens, temperature,
        top_p, system_prompt, seed."""
        return self._call("x2t_image", images, questions, seeds, params)

    def x2t_video(self, videos: list[np.ndarray], questions: list[str | None], *, seeds: list[int] | None = None,
                  **params) -> list[str]:
        """Answer `questions[i]` about `videos[i]` (uint8 (T, H, W, 3), frame-sampled with
        `sample_frame_indices`); params as x2t_image."""
        return self._call("x2t_video", videos, questions, seeds, params)

    def t2i(self, prompts: list[str], *, seeds: list[int] | None = None, max_batch_size: int | None = None,
            **params) -> list[np.ndarray]:
        """One uint8 (H, W, 3) image per prompt; params: height, width (floored to multiples of 16), steps,
        shift, cfg_scale, cfg_interval, cfg_renorm_min, preset, seed."""
        return self._call("t2i", None, prompts, seeds, params, max_batch_size)

    def t2v(self, prompts: list[str], *, seeds: list[int] | None = None, max_batch_size: int | None = None,
            **params) -> list[np.ndarray]:
        """One uint8 (4(t-1)+1, H, W, 3) video per prompt, t = (frames - 1)//4 + 1 latent frames; params as t2i
        plus frames."""
        return self._call("t2v", None, prompts, seeds, params, max_batch_size)

    def i2v(self, images: list[np.ndarray], prompts: list[str], *, seeds: list[int] | None = None,
            max_batch_size: int | None = None, **params) -> list[np.ndarray]:
        """Animate `images[i]` (uint8 (H, W, 3), the first frame) per `prompts[i]`; size = the image's bucket
        in `preset`; params: frames and the denoising params."""
        return self._call("i2v", images, prompts, seeds, params, max_batch_size)

    def image_edit(self, images: list[np.ndarray], instructions: list[str], *, seeds: list[int] | None = None,
                   max_batch_size: int | None = None, **params) -> list[np.ndarray]:
        """Edit `images[i]` (uint8 (H, W, 3)) per `instructions[i]`; output size = the image's bucket."""
        return self._call("image_edit", images, instructions, seeds, params, max_batch_size)

    def video_edit(self, videos: list[np.ndarray], instructions: list[str], *, seeds: list[int] | None = None,
                   max_batch_size: int | None = None, **params) -> list[np.ndarray]:
        """Edit `videos[i]` (uint8 (T, H, W, 3), frame-sampled, T = 4k+1) per `instructions[i]`."""
        return self._call("video_edit", videos, instructions, seeds, params, max_batch_size)

    def _call(self, name: str, media: list[np.ndarray] | None, prompts: list, seeds: list[int] | None,
              params: dict, max_batch_size: int | None = None) -> list:
        task = get_task(name)
        resolved = task.resolve_kwargs(params)
        if seeds is None:
            seeds = [resolved.seed] * len(prompts)  # the official script's one seed for every row
        return self.run(task, media, prompts, seeds=seeds, settings=task.settings(resolved),
                        max_batch_size=max_batch_size)

    # ------------------------------------------------------------------------------------------------
    # The uniform entry
    # ------------------------------------------------------------------------------------------------
    def run(self, task: TaskSpec, media: list[np.ndarray] | None, prompts: list, *, seeds: list[int],
            settings: DecodeSettings | GenerationSettings, max_batch_size: int | None = None) -> list:
        """Run `task` over rows given as parallel lists: input media (None for prompt-only tasks), prompts and
        seeds. Returns answers (str) for understanding tasks, uint8 pixels otherwise.

        With `settings.seed_mode == "official"` the rows are one run of the official script, in the order
        given: every random draw of that run is reproduced (official_random.py)."""
        if len(seeds) != len(prompts) or (media is not None and len(media) != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts, {len(seeds)} seeds and "
                             f"{'no' if media is None else len(media)} inputs do not line up")
        if not prompts:
            return []
        official = (OfficialRun(self.model.llm_cfg, self.model.vit_cfg, self.device)
                    if settings.seed_mode == "official" else None)
        if isinstance(settings, DecodeSettings):
            return self._understand(media, prompts, task.input_media, seeds, settings, official)
        if self.understanding_only:
            raise ValueError(f"{task.name}: this LancePipeline was loaded with understanding_only=True")
        if task.input_media is None:
            rows = text_rows(prompts, settings.height, settings.width, settings.frames or 1, seeds)
        else:
            rows = media_rows(media, prompts, settings.preset, seeds, frames=settings.frames)
        return generate_media(self.model, self.tokenizer, self.vae, task, rows, settings.sampler,
                              preset=settings.preset, max_batch_size=max_batch_size, speed=settings.speed,
                              official=official)

    def _understand(self, media: list[np.ndarray], questions: list[str | None], kind: str, seeds: list[int],
                    settings: DecodeSettings, official: OfficialRun | None) -> list[str]:
        requests = []
        for frames, question, seed in zip(media, questions, seeds, strict=True):
            row_settings, offsets = settings, None
            if official is not None:  # the official run's draws, row by row, in order
                frames = frames[None] if frames.ndim == 3 else frames
                draws = official.understanding_row(
                    frames.shape[:3], settings.preset,
                    caption_instructions(kind) if settings.system_prompt is None else None)
                if draws.instruction is not None:
                    row_settings = replace(settings, system_prompt=draws.instruction)
                offsets = draws.vit_offsets
            resized = preprocess.resize_to_bucket(frames, settings.preset, "vit", offsets)
            requests.append(self.understanding_request(resized, question, kind=kind, settings=row_settings,
                                                       seed=seed, resized=True))
        engine = self.new_engine(requests, max_slots=len(requests))
        return [self.decode_answer(a.ids) for a in answer_all(engine, requests)]

    # ------------------------------------------------------------------------------------------------
    # Understanding with continuous batching (understand.py): what a serving loop calls
    # ------------------------------------------------------------------------------------------------
    def understanding_request(self, media: np.ndarray, question: str | None, *, kind: str,
                              settings: DecodeSettings, seed: int, max_new_tokens: int | None = None,
                              resized: bool = False, tag: Any = None) -> Request:
        """One x2t row as a decode request: its prompt layout (tokenised here, on the caller's thread) and its
        ViT-stream frames. `media`: uint8 [H, W, 3] or [T, H, W, 3]; `resized`: already resized to the
        preset's ViT bucket (`resize_for_understanding`, done in a CPU stage). `max_new_tokens` overrides
        the settings' for this row."""
        frames = media if resized else preprocess.resize_for_understanding(media, settings.preset)
        frames = frames[None] if frames.ndim == 3 else frames
        merge = self.model.vit_cfg.spatial_merge_size
        t, h, w = preprocess.vit_grid(frames.shape[1], frames.shape[2], frames.shape[0])
        layout = build_understanding(self.tokenizer, question or "", [(t, h // merge, w // merge)],
                                     system_prompt=settings.system_prompt, kind=kind,
                                     tokens_per_second=self.model.llm_cfg.tokens_per_second)
        tensor = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()  # the copy to the GPU then overlaps other work
        return Request(layout, max_new_tokens or settings.max_new_tokens, settings.temperature, settings.top_p,
                       int(seed), visuals=[tensor], tag=tag)

    def new_engine(self, requests: list[Request], *, max_slots: int = 256, reserve_bytes: int | None = None
                   ) -> DecodeEngine:
        """A decode engine whose slots hold every one of `requests`, with as many slots (at most `max_slots`)
        as the free GPU memory allows after `reserve_bytes` for the activations of admissions (default: a
        quarter of it, at least 4 GiB), and admissions sized to that reserve. On CPU: up to 16 slots."""
        capacity = capacity_for(requests)
        if self.device.type != "cuda":
            return DecodeEngine(self.model, eos_id=self.tokenizer.special.im_end, vocab_limit=len(self.tokenizer),
                                slots=max(1, min(max_slots, 16)), capacity=capacity)
        free, _ = torch.cuda.mem_get_info(self.device)
        reserve = reserve_bytes if reserve_bytes is not None else max(4 << 30, free // 4)
        slots = slots_for_memory(self.model.llm, capacity, free, reserve_bytes=reserve, max_slots=max_slots)
        admit_tokens = max(1024, min(ADMIT_TOKENS, reserve // ADMIT_BYTES_PER_TOKEN))
        return DecodeEngine(self.model, eos_id=self.tokenizer.special.im_end, vocab_limit=len(self.tokenizer),
                            slots=slots, capacity=capacity, admit_tokens=admit_tokens)

    def decode_answer(self, ids: list[int]) -> str:
        return normalize_answer(self.tokenizer.decode(ids))


__all__ = ["LancePipeline", "LoadStats", "resolve_device"]
