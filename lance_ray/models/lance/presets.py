"""Resolution presets and size limits of Lance: plain numbers, importable without torch.

A preset names two target areas, one per input stream (the official `RESOLUTION` setting):
the VAE stream (pixels for the Wan 2.2 VAE, sides multiple of 16) and the ViT stream (pixels for the
Qwen2.5-VL vision tower, sides multiple of 28). Image presets size the media of image tasks, video
presets those of video tasks. `preprocess.py` turns a preset into resized pixels; the job spec and the
task registry read names, families and default output sizes from here.

Buckets: for an area res², one (h, w) per aspect ratio of `ASPECT_RATIOS`, sides multiple of 16
(official `data/data_utils.py`, the bucket table of the resize transform).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Literal

Stream = Literal["vae", "vit"]
Family = Literal["image", "video"]

ASPECT_RATIOS = ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16")  # "w:h", in the official order
BUCKET_STRIDE = 16

# The checkpoints' latent position table covers 64 x 64 latents of 16 pixels: no side beyond 1024.
SIZE_MULTIPLE = 16
MAX_SIDE = 1024
MAX_FRAMES = 121  # official max_num_frames


@dataclass(frozen=True)
class Preset:
    name: str
    family: Family  # which checkpoint family's tasks it sizes
    vae_res: int  # VAE-stream buckets have area vae_res**2
    vit_res: int  # ViT-stream buckets have area vit_res**2

    def res(self, stream: Stream) -> int:
        if stream == "vae":
            return self.vae_res
        if stream == "vit":
            return self.vit_res
        raise ValueError(f"unknown stream {stream!r} (expected 'vae' or 'vit')")

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of a t2i/t2v output when the job gives no size: the VAE-stream bucket of the
        preset's area, square for image presets and 16:9 landscape for video presets."""
        ratio = "1:1" if self.family == "image" else "16:9"
        return buckets(self.vae_res)[ASPECT_RATIOS.index(ratio)]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("image_256res", "image", 256, 224),
        Preset("image_512res", "image", 512, 448),
        Preset("image_768res", "image", 768, 672),
        Preset("video_192p", "video", 256, 224),
        Preset("video_360p", "video", 480, 476),
        Preset("video_480p", "video", 640, 616),
    )
}


def presets_of(family: str) -> tuple[str, ...]:
    """Preset names for a checkpoint family, smallest first."""
    return tuple(name for name, p in PRESETS.items() if p.family == family)


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}") from None


def _bucket_for_ratio(w_over_h: float, area: int, stride: int) -> tuple[int, int]:
    """(h, w) multiple of `stride`, area close to `area`, ratio as close as possible to `w_over_h`.

    Two candidates: fix the width from the area first, or the height first; keep the one with the
    closer ratio, ties broken by the closer area (the width-first one on a full tie).  Python's
    round-half-to-even is part of the recipe."""
    w1 = round(math.sqrt(area * w_over_h) / stride) * stride
    h1 = round(w1 / w_over_h / stride) * stride
    h2 = round(math.sqrt(area / w_over_h) / stride) * stride
    w2 = round(h2 * w_over_h / stride) * stride
    err1, err2 = abs(w1 / h1 - w_over_h), abs(w2 / h2 - w_over_h)
    if err1 < err2 or (err1 == err2 and abs(w1 * h1 - area) <= abs(w2 * h2 - area)):
        return h1, w1
    return h2, w2


@cache
def buckets(res: int) -> tuple[tuple[int, int], ...]:
    """The (h, w) buckets of area res**2 for ASPECT_RATIOS, in that order."""
    out = []
    for name in ASPECT_RATIOS:
        w, h = (int(v) for v in name.split(":"))
        out.append(_bucket_for_ratio(w / h, res * res, BUCKET_STRIDE))
    return tuple(out)
