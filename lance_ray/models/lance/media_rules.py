"""The official rules media decoding must follow before any preprocessing: no torch here, so the IO
layer (lance_ray/io/media.py) can decode images and pick video frames without importing the model.

    image_to_rgb(image: PIL.Image) -> uint8 [H, W, 3]          # official mode conversion
    sample_frame_indices(total_frames, avg_fps) -> [int]       # which decoded frames to keep

preprocess.py turns the result into model inputs.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

VAE_TEMPORAL = 4  # VAE time compression: T frames -> (T - 1) // 4 + 1 latent frames; clips are 4k+1 frames
SAMPLE_FPS = 12
MAX_DURATION_S = 6.0
FALLBACK_FPS = 24  # used by the official sampler when the container reports no frame rate


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """Official image decode (`data/datasets_custom/validation_dataset.py`,
    `ValidationDataset.get_video_tensor_online`): palette -> RGBA, RGBA composited on white, anything
    else converted to RGB."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        bg = Image.new("RGB", image.size, (255, 255, 255))
        bg.paste(image, mask=image.split()[3])
        image = bg
    else:
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def sample_frame_indices(total_frames: int, avg_fps: float) -> list[int]:
    """Indices of the decoded frames the official sampler keeps (`data/video/sampler/frames.py`,
    `MultiClipsFrameSampler` with the settings `data/datasets_custom/validation_dataset.py` gives it:
    temporal 4, 12 fps, at most 6 s, one clip over the whole video, 4k+1 frames).

    fps = round(avg_fps) (24 when unknown); n = round(min(total/fps, 6 s) * 12) frames, snapped to 4k+1
    (down to the previous 4k+1, or n - 3 when n is a multiple of 4); the n indices are an
    int-truncated linspace over the WHOLE clip, so long clips are subsampled, not cut.  Clips too short
    for one frame (n < 1, where the official code fails) give [0]."""
    if total_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {total_frames}")
    fps = int(round(avg_fps)) if math.isfinite(avg_fps) else 0
    if fps <= 0:
        fps = FALLBACK_FPS
    duration = min(total_frames / fps, MAX_DURATION_S)
    n = int(round(duration * SAMPLE_FPS))
    n = n // VAE_TEMPORAL * VAE_TEMPORAL + 1 if n % VAE_TEMPORAL else n + 1 - VAE_TEMPORAL
    n = max(n, 1)
    return np.linspace(0, total_frames - 1, n).astype(np.int64).tolist()
