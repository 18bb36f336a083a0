"""Render the small sample media and prompt files in this folder (deterministic; no downloads).

    python datasets/make_samples.py            # rewrites datasets/{images,videos,*.jsonl,*.csv}

Images cover the aspect ratios the Lance buckets care about plus the decode special cases
(alpha channel, grayscale); videos are short H.264 clips at 12, 24 and 25 fps.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lance_ray.io.media import encode_video

HERE = Path(__file__).resolve().parent


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates: y, x in [0, 1], each [H, W]."""
    return np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def sunset(height: int, width: int) -> Image.Image:
    """Sky gradient, a sun and a dark sea."""
    y, x = _grid(height, width)
    sky = np.stack([0.95 - 0.3 * y, 0.45 + 0.3 * y, 0.35 + 0.5 * (1 - y)], axis=-1)
    sun = ((x - 0.65) ** 2 + ((y - 0.45) * height / width) ** 2) < 0.012
    sky[sun] = (1.0, 0.85, 0.3)
    sky[y > 0.7] = np.stack([0.05 + 0.1 * x, 0.15 + 0.1 * x, 0.35 + 0.0 * x], axis=-1)[y > 0.7]
    return Image.fromarray(_to_uint8(sky))


def tower(height: int, width: int) -> Image.Image:
    """A portrait scene: a striped tower against a blue sky."""
    image = Image.new("RGB", (width, height), (120, 170, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(height * 0.85), width, height), fill=(60, 140, 60))
    left, right = int(width * 0.38), int(width * 0.62)
    for i, top in enumerate(range(int(height * 0.2), int(height * 0.85), 20)):
        draw.rectangle((left, top, right, top + 20), fill=(200, 40, 40) if i % 2 else (240, 240, 240))
    draw.polygon(
        [(left - 8, int(height * 0.2)), (right + 8, int(height * 0.2)), (width // 2, 20)], (90, 60, 40)
    )
    return image


def tiles(size: int) -> Image.Image:
    """A square checkerboard of coloured tiles."""
    y, x = _grid(size, size)
    cells = (np.floor(y * 8) + np.floor(x * 8)) % 2
    rgb = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * cells, 0.8 - 0.6 * y], axis=-1)
    return Image.fromarray(_to_uint8(rgb))


def badge(size: int) -> Image.Image:
    """An RGBA badge: an opaque disc with a soft, semi-transparent rim on a transparent canvas."""
    y, x = _grid(size, size)
    r = np.hypot(x - 0.5, y - 0.5)
    alpha = np.clip((0.45 - r) / 0.08, 0, 1)
    rgba = np.stack([0.1 + 0.8 * x, 0.5 + 0.0 * x, 0.9 - 0.7 * y, alpha], axis=-1)
    return Image.fromarray(_to_uint8(rgba), mode="RGBA")


def moon(height: int, width: int) -> Image.Image:
    """A grayscale night sky with a crescent moon."""
    y, x = _grid(height, width)
    aspect = height / width
    lit = ((x - 0.5) ** 2 + ((y - 0.5) * aspect) ** 2) < 0.04
    shadow = ((x - 0.56) ** 2 + ((y - 0.46) * aspect) ** 2) < 0.035
    gray = 0.1 + 0.15 * y
    gray[lit & ~shadow] = 0.92
    return Image.fromarray(_to_uint8(gray), mode="L")


def banner(height: int, width: int) -> Image.Image:
    """A wide (21:9-like) banner with diagonal stripes."""
    y, x = _grid(height, width)
    stripes = (np.floor((x * width + y * height) / 24) % 2)[..., None]
    rgb = stripes * np.array([0.95, 0.75, 0.2]) + (1 - stripes) * np.array([0.15, 0.2, 0.35])
    return Image.fromarray(_to_uint8(rgb))


def orbit_clip(frames: int, height: int, width: int) -> np.ndarray:
    """A bright ball circling over a slowly shifting gradient; [T, H, W, 3]."""
    y, x = _grid(height, width)
    clip = []
    for t in range(frames):
        phase = 2 * np.pi * t / frames
        rgb = np.stack([0.2 + 0.3 * x, 0.25 + 0.2 * np.sin(phase + 3 * y), 0.5 + 0.3 * y], axis=-1)
        cx, cy = 0.5 + 0.3 * np.cos(phase), 0.5 + 0.3 * np.sin(phase)
        rgb[((x - cx) * width) ** 2 + ((y - cy) * height) ** 2 < 14**2] = (1.0, 0.9, 0.2)
        clip.append(_to_uint8(rgb))
    return np.stack(clip)


def waves_clip(frames: int, height: int, width: int) -> np.ndarray:
    """Horizontal waves travelling down a portrait frame."""
    y, x = _grid(height, width)
    clip = []
    for t in range(frames):
        wave = 0.5 + 0.5 * np.sin(12 * y - 0.5 * t + 2 * np.sin(4 * x))
        clip.append(_to_uint8(np.stack([0.1 + 0.2 * wave, 0.3 + 0.4 * wave, 0.6 + 0.4 * wave], axis=-1)))
    return np.stack(clip)


def bounce_clip(frames: int, height: int, width: int) -> np.ndarray:
    """A square bouncing left to right on a dark floor."""
    clip = []
    for t in range(frames):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[:] = (30, 30, 60)
        frame[int(height * 0.8) :] = (80, 60, 40)
        left = int((width - 32) * abs((t / (frames - 1)) * 2 - 1))
        top = int(height * 0.8) - 32 - int(40 * np.sin(np.pi * t / (frames - 1)))
        frame[top : top + 32, left : left + 32] = (220, 60, 60)
        clip.append(frame)
    return np.stack(clip)


PROMPTS = [
    ("p01", "A red fox sitting in fresh snow at sunrise, photorealistic.", 1),
    ("p02", "An isometric illustration of a tiny island with a lighthouse.", 2),
    ("p03", "A bowl of ramen with a soft-boiled egg, top-down view.", 3),
    ("p04", "A watercolor painting of a sailing boat on a calm lake.", 4),
    ("p05", "A robot reading a book in a cozy library, warm light.", 5),
    ("p06", "Three green apples on a wooden table, studio lighting.", 6),
    ("p07", "A neon sign that says OPEN in a rainy street at night.", 7),
    ("p08", "A hot air balloon drifting over a desert canyon.", 8),
]

EDITS = [
    ("e01", "images/sunset_320x240.jpg", "Add a small sailing boat on the sea."),
    ("e02", "images/tower_240x320.jpg", "Make the sky a dramatic orange sunset."),
    ("e03", "images/tiles_256x256.png", "Turn the tiles into black and white marble."),
    ("e04", "images/badge_alpha_200x200.png", "Put a gold star in the middle of the badge."),
]

QUESTIONS = [
    ("q01", "images/sunset_320x240.jpg", "What time of day does this picture show?"),
    ("q02", "images/tower_240x320.jpg", "What colours are the stripes on the tower?"),
    ("q03", "images/moon_gray_300x200.jpg", "Describe this image in detail."),
    ("q04", "images/banner_384x160.png", "Which direction do the stripes go?"),
]


def main() -> None:
    images, videos = HERE / "images", HERE / "videos"
    images.mkdir(exist_ok=True)
    videos.mkdir(exist_ok=True)

    sunset(240, 320).save(images / "sunset_320x240.jpg", quality=88)
    tower(320, 240).save(images / "tower_240x320.jpg", quality=88)
    tiles(256).save(images / "tiles_256x256.png")
    badge(200).save(images / "badge_alpha_200x200.png")
    moon(200, 300).save(images / "moon_gray_300x200.jpg", quality=88)
    banner(160, 384).save(images / "banner_384x160.png")

    for name, clip, fps in [
        ("orbit_160x128_12fps", orbit_clip(24, 128, 160), 12),
        ("waves_128x160_24fps", waves_clip(16, 160, 128), 24),
        ("bounce_176x144_25fps", bounce_clip(25, 144, 176), 25),
    ]:
        data, ext = encode_video(clip, fps, "h264", crf=28)
        (videos / f"{name}.{ext}").write_bytes(data)

    with open(HERE / "prompts.jsonl", "w") as f:
        for row_id, prompt, seed in PROMPTS:
            f.write(json.dumps({"id": row_id, "prompt": prompt, "seed": seed}) + "\n")
    with open(HERE / "edits.jsonl", "w") as f:
        for row_id, image, instruction in EDITS:
            f.write(json.dumps({"id": row_id, "image": image, "instruction": instruction}) + "\n")
    with open(HERE / "questions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "question"])
        writer.writerows(QUESTIONS)


if __name__ == "__main__":
    main()
