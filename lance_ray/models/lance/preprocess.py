"""Official Lance media preprocessing: presets, buckets, resize rule, frame sampling, ViT patches.

Every input image or video reaches the model through two streams, each with its own target area:
the VAE stream (pixels for the Wan 2.2 VAE, sizes multiple of 16) and the ViT stream (pixels for the
Qwen2.5-VL vision tower, sizes multiple of 28).  Both streams follow the same recipe (official
`data/datasets_custom/validation_dataset.py`, `ValidationDataset.get_video_tensor_online`, with the
transforms `BucketResize` of `data/video/transforms/bucket_resize.py` and `DivisibleCrop` of
`data/video/transforms/divisible_crop.py`):

1. choose the bucket (h, w) of the stream's area whose actual w/h ratio is closest to the input's;
2. crop the input to the bucket's ratio (full-area crop when it fits, else a centred crop spanning the
   full width or height) and resize the crop to the bucket with PIL bicubic (small inputs are upscaled);
3. centre-crop to a multiple of 16 (VAE: a no-op on buckets) or 28 (ViT, e.g. 192x256 -> 168x252);
4. normalise: VAE ``(x/255 - 0.5)/0.5``; ViT with the CLIP mean/std.

Images are decoded with `media_rules.image_to_rgb`; videos are first frame-sampled with
`media_rules.sample_frame_indices` (12 fps target, at most 6 s worth of frames, 4k+1 frames spread over
the whole clip).  The ViT stream needs an even frame count (temporal patch 2): images are shown as 2
identical frames, odd clips repeat their last frame.

The official ``RandomResizedCrop`` draws a random 0/1-pixel offset per frame where the input's ratio equals
the bucket's up to rounding and the crop is one pixel smaller than the input (`crop_slack` says where).
By default we take the deterministic offset ``(size - crop) // 2`` (= 0), one of the official outcomes;
``seed_mode: official`` passes the offsets the official run draws (`official_random.py`).  All other
cases have no randomness in the official code either.

API (uint8 arrays are ``[T, H, W, 3]`` RGB; an ``[H, W, 3]`` image is accepted as one frame)::

    (presets and buckets: presets.py)
    bucket_size(height, width, preset, stream) -> (h, w)       # bucket chosen for an input size
    stream_size(height, width, preset, stream) -> (h, w)       # final size (after the divisible crop)
    resize_to_bucket(frames, preset, stream, offsets=None) -> uint8 [T, h, w, 3]   # steps 1-3
    crop_slack(height, width, preset, stream) -> (rows, cols) | None   # where the official crop offset is drawn
    vae_pixels(frames) -> float32 [3, T, H, W] in [-1, 1]      # step 4, VAE
    vit_frames(frames) -> uint8 [T', H, W, 3]                  # even frame count for the ViT
    vit_patches(frames) -> (float32 [N, 1176], (t, h, w))      # ViT input rows + grid_thw
    latent_frames(num_frames), decoded_frames(num_frames), output_size(height, width)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

# image_to_rgb and sample_frame_indices live in the torch-free media_rules.py; they stay importable from
# here (re-exported) because they are the first steps of this recipe.
from .media_rules import VAE_TEMPORAL, image_to_rgb, sample_frame_indices  # noqa: F401
from .presets import Preset, Stream, buckets, get_preset

DIVISOR = {"vae": 16, "vit": 28}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VAE_SPATIAL = 16  # VAE space compression
VIT_PATCH = 14
VIT_TEMPORAL_PATCH = 2
VIT_MERGE = 2


def bucket_size(height: int, width: int, preset: str | Preset, stream: Stream) -> tuple[int, int]:
    """The bucket (h, w) an input of this size is resized to (before the divisible crop)."""
    ratio = width / height
    best, best_err = None, math.inf
    for h, w in buckets(get_preset(preset).res(stream)):
        err = abs(ratio - w / h)
        if err < best_err:  # strict: the first of equally close buckets wins
            best, best_err = (h, w), err
    assert best is not None
    return best


def stream_size(height: int, width: int, preset: str | Preset, stream: Stream) -> tuple[int, int]:
    """Final (h, w) of the stream's pixels for an input of this size (bucket, then divisible crop)."""
    h, w = bucket_size(height, width, preset, stream)
    d = DIVISOR[stream]
    return h - h % d, w - w % d


# --------------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------------
def _full_area_crop(height: int, width: int, ratio: float) -> tuple[int, int] | None:
    """(h, w) of torchvision RandomResizedCrop.get_params' crop with scale (1, 1) and ratio (r, r) -- the
    full-area crop of ratio r, r passed through float32 log/exp as torchvision does -- or None when it does
    not fit inside the input (then torchvision falls back to a centred crop)."""
    r32 = torch.exp(torch.log(torch.tensor(ratio, dtype=torch.float32))).item()
    area = height * width
    w = int(round(math.sqrt(area * r32)))
    h = int(round(math.sqrt(area / r32)))
    return (h, w) if 0 < w <= width and 0 < h <= height else None


def crop_slack(height: int, width: int, preset: str | Preset, stream: Stream) -> tuple[int, int] | None:
    """Where the official crop draws an offset: (rows, cols) = how many top and left offsets the full-area crop
    can take inside an input of this size (torchvision draws one of each per frame, uniformly; at most 2 here),
    or None when the crop is the centred fallback (no offset drawn; the draws still happen, see
    official_random.py)."""
    bh, bw = bucket_size(height, width, preset, stream)
    crop = _full_area_crop(height, width, bw / bh)
    return None if crop is None else (height - crop[0] + 1, width - crop[1] + 1)


def _ratio_crop(height: int, width: int, ratio: float) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the crop of aspect ratio `ratio` (w/h) taken before resizing: the full-area crop
    when it fits (centred; the official offset is random, see `crop_slack`), else the fallback crop spanning
    the full width or height."""
    crop = _full_area_crop(height, width, ratio)
    if crop is not None:
        h, w = crop
        return (height - h) // 2, (width - w) // 2, h, w
    if width / height < ratio:
        w, h = width, int(round(width / ratio))
    elif width / height > ratio:
        h, w = height, int(round(height * ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _as_frames(frames: np.ndarray) -> np.ndarray:
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 frames [T, H, W, 3] (or an image [H, W, 3]), got {frames.dtype} {frames.shape}"
        )
    return frames


def _centre_crop(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    """torchvision center_crop offsets: round((H - h) / 2) with Python's half-to-even rounding."""
    top = int(round((frames.shape[1] - h) / 2.0))
    left = int(round((frames.shape[2] - w) / 2.0))
    return frames[:, top : top + h, left : left + w]


def resize_to_bucket(frames: np.ndarray, preset: str | Preset, stream: Stream,
                     offsets: list[tuple[int, int]] | None = None) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3]: bucket crop + bicubic resize + divisible crop.

    The result is exactly what the official stream sees before normalisation (and, for the ViT,
    before frame duplication: see vit_frames).  `offsets`: per frame, the (top, left) of the full-area crop
    where `crop_slack` is not None (the official run's draws); default: the centred crop."""
    frames = _as_frames(frames)
    height, width = frames.shape[1:3]
    bh, bw = bucket_size(height, width, preset, stream)
    top, left, ch, cw = _ratio_crop(height, width, bw / bh)
    if offsets is not None:
        slack = crop_slack(height, width, preset, stream)
        if slack is None or len(offsets) != len(frames) or any(
                not (0 <= t < slack[0] and 0 <= x < slack[1]) for t, x in offsets):
            raise ValueError(f"crop offsets {offsets} do not fit {len(frames)} frames of {height}x{width} "
                             f"(possible offsets: {slack})")
    out = np.empty((frames.shape[0], bh, bw, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        if offsets is not None:
            top, left = offsets[i]
        img = Image.fromarray(frame).crop((left, top, left + cw, top + ch))
        if img.size != (bw, bh):
            img = img.resize((bw, bh), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img)
    d = DIVISOR[stream]
    return np.ascontiguousarray(_centre_crop(out, bh - bh % d, bw - bw % d))


def resize_for_understanding(media: np.ndarray, preset: str | Preset) -> np.ndarray:
    """uint8 image [H, W, 3] or video [T, H, W, 3] -> ViT-stream frames [T, h, w, 3] of `preset`: the CPU
    part of understanding's preprocessing, which a CPU stage can do before the GPU sees the row
    (`LancePipeline.understanding_request(..., resized=True)` takes the result)."""
    return resize_to_bucket(media, preset, "vit")


# --------------------------------------------------------------------------------------------------
# Normalisation and ViT patches
# --------------------------------------------------------------------------------------------------
def _to_float_cthw(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    # torchvision ToTensor: float32 division by 255 (exact in float32, so the same on every device)
    x = torch.from_numpy(_as_frames(frames)) if isinstance(frames, np.ndarray) else frames
    return x.permute(3, 0, 1, 2).float().div(255)


def vae_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1], as the official Normalize(0.5, 0.5)."""
    return _to_float_cthw(frames).sub(0.5).div(0.5)


def vit_frames(frames: np.ndarray) -> np.ndarray:
    """Even frame count for the ViT's temporal patch of 2: repeat the last frame when T is odd
    (an image becomes 2 identical frames, 4k+1 video frames become 4k+2)."""
    frames = _as_frames(frames)
    if frames.shape[0] % 2:
        frames = np.concatenate([frames, frames[-1:]], axis=0)
    return frames


def vit_patches(frames: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """ViT-stream uint8 frames (sizes multiple of 28) -> (patches [N, 1176] float32, grid (t, h, w)).

    Applies vit_frames and the CLIP normalisation.  Rows are ordered (t, h/2, w/2, dy, dx): the four
    patches of each 2x2 merge group are contiguous.  Each row is one (C=3, 2 frames, 14, 14) block
    flattened in (C, frame, y, x) order.  grid = (T/2, H/14, W/14); merged tokens = t*h*w/4.
    `frames` may be a uint8 tensor [T, H, W, 3] on any device: the GPU then does this work (the same
    float32 operations, so the same values)."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(vit_frames(frames))
    elif frames.shape[0] % 2:
        frames = torch.cat([frames, frames[-1:]])
    x = _to_float_cthw(frames)  # [C, T, H, W]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(3, 1, 1, 1)
    x = x.sub(mean).div(std)
    c, t, h, w = x.shape
    p, tp, m = VIT_PATCH, VIT_TEMPORAL_PATCH, VIT_MERGE
    if h % (p * m) or w % (p * m):
        raise ValueError(f"ViT frames must be multiples of {p * m} px, got {h}x{w}")
    gt, gh, gw = t // tp, h // p, w // p
    x = x.reshape(c, gt, tp, gh // m, m, p, gw // m, m, p)
    # -> [gt, gh/m, gw/m, dy, dx, C, tp, p, p]
    x = x.permute(1, 3, 6, 4, 7, 0, 2, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p).contiguous(), (gt, gh, gw)


def vit_grid(height: int, width: int, frames: int) -> tuple[int, int, int]:
    """The ViT patch grid (t, h, w) of ViT-stream frames of this size (before the even-frame padding)."""
    return (frames + 1) // VIT_TEMPORAL_PATCH, height // VIT_PATCH, width // VIT_PATCH


# --------------------------------------------------------------------------------------------------
# Frames and sizes
# --------------------------------------------------------------------------------------------------
def latent_frames(num_frames: int) -> int:
    """Latent frames for num_frames pixel frames (the VAE keeps frames 0..4k, ignoring the rest)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return (num_frames - 1) // VAE_TEMPORAL + 1


def decoded_frames(num_frames: int) -> int:
    """Pixel frames the VAE decodes back for a request of num_frames: 4(t - 1) + 1."""
    return VAE_TEMPORAL * (latent_frames(num_frames) - 1) + 1


def output_size(height: int, width: int) -> tuple[int, int]:
    """t2i/t2v output size: the request floored to multiples of 16 (latent h, w = H//16, W//16)."""
    h, w = height // VAE_SPATIAL * VAE_SPATIAL, width // VAE_SPATIAL * VAE_SPATIAL
    if h < VAE_SPATIAL or w < VAE_SPATIAL:
        raise ValueError(f"height and width must be at least {VAE_SPATIAL}, got {height}x{width}")
    return h, w
