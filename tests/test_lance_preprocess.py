"""Official media preprocessing (lance_ray.models.lance.preprocess) against the reference goldens.

Golden tensors come from golden/fp32_kv (the official dataset code run on inputs/): ViT and VAE input
pixels as uint8, the ViT patch matrix and grid.  Other expectations are re-derived by hand from
LANCE_FACTS §5 (bucket table, frame-sampling arithmetic, crop boxes).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lance_ray.models.lance import media_rules, presets
from lance_ray.models.lance import preprocess as P

INPUTS = Path(__file__).parent / "fixtures" / "golden" / "inputs"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(INPUTS / "preprocess_fp32_kv.safetensors")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return media_rules.image_to_rgb(Image.open(INPUTS / "img_304x224.png"))


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    with av.open(str(INPUTS / "vid_304x224_5f12.mp4")) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        fps = float(stream.average_rate)
    return frames[media_rules.sample_frame_indices(len(frames), fps)]


def cthw(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(3, 0, 1, 2)


# LANCE_FACTS §5.1 (computed there with the reference code)
BUCKETS = {
    256: "160x368 192x336 224x304 256x256 304x224 336x192",
    224: "144x336 160x288 192x256 224x224 256x192 288x160",
    512: "336x784 384x688 448x592 512x512 592x448 688x384",
    448: "288x672 336x592 384x512 448x448 512x384 592x336",
    768: "496x1152 576x1024 672x896 768x768 896x672 1024x576",
    672: "432x1008 512x912 576x768 672x672 768x576 912x512",
    480: "320x752 352x624 416x560 480x480 560x416 624x352",
    476: "304x704 352x624 416x560 480x480 560x416 624x352",
    640: "416x976 480x848 560x752 640x640 752x560 848x480",
    616: "400x928 464x832 528x704 608x608 704x528 832x464",
}


@pytest.mark.parametrize("res", sorted(BUCKETS))
def test_bucket_tables(res: int) -> None:
    expected = tuple(tuple(int(v) for v in hw.split("x")) for hw in BUCKETS[res].split())
    assert presets.buckets(res) == expected


def test_presets() -> None:
    areas = {name: (p.vae_res, p.vit_res) for name, p in presets.PRESETS.items()}
    assert areas == {
        "image_256res": (256, 224),
        "video_192p": (256, 224),
        "image_512res": (512, 448),
        "image_768res": (768, 672),
        "video_360p": (480, 476),
        "video_480p": (640, 616),
    }
    with pytest.raises(ValueError, match="unknown preset"):
        P.bucket_size(100, 100, "video_1080p", "vae")


def test_image_streams_match_golden(image: np.ndarray, golden: dict[str, torch.Tensor]) -> None:
    vae = P.resize_to_bucket(image, "image_256res", "vae")
    assert torch.equal(cthw(vae), golden["image.vae_input_u8_cthw"])
    vit = P.resize_to_bucket(image, "image_256res", "vit")
    assert vit.shape == (1, 168, 252, 3)
    assert torch.equal(cthw(P.vit_frames(vit)), golden["image.vit_input_u8_cthw"])
    patches, grid = P.vit_patches(vit)
    assert torch.equal(patches, golden["image.vit_input_patches"])  # bit-exact floats
    assert [list(grid)] == golden["image.vit_grid_thw"].tolist()


def test_video_streams_match_golden(video: np.ndarray, golden: dict[str, torch.Tensor]) -> None:
    assert video.shape[0] == 5
    vae = P.resize_to_bucket(video, "video_192p", "vae")
    assert torch.equal(cthw(vae), golden["video.vae_input_u8_cthw"])
    vit = P.resize_to_bucket(video, "video_192p", "vit")
    assert torch.equal(cthw(P.vit_frames(vit)), golden["video.vit_input_u8_cthw"])
    _, grid = P.vit_patches(vit)
    assert [list(grid)] == golden["video.vit_grid_thw"].tolist()


def test_bucket_choice_and_final_sizes() -> None:
    # 2:1 is between 21:9 (2.3) and 16:9 (1.75); 1.75 is closer
    assert P.bucket_size(200, 400, "image_256res", "vae") == (192, 336)
    assert P.stream_size(200, 400, "image_256res", "vit") == (140, 280)  # 160x288 cropped to /28
    assert P.stream_size(1080, 1920, "video_480p", "vae") == (480, 848)
    assert P.stream_size(1920, 1080, "video_480p", "vit") == (812, 448)  # 832x464 -> /28


def test_crop_fallback_other_aspect_ratio() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(200, 400, 3), dtype=np.uint8)
    out = P.resize_to_bucket(img, "image_256res", "vae")
    # bucket 192x336 (ratio 1.75 < 2): centred crop of full height, width round(200 * 1.75) = 350
    ref = Image.fromarray(img).crop((25, 0, 375, 200)).resize((336, 192), Image.Resampling.BICUBIC)
    assert np.array_equal(out[0], np.asarray(ref))

    tall = rng.integers(0, 256, size=(500, 300, 3), dtype=np.uint8)  # ratio 0.6 -> 9:16 (0.571)
    out = P.resize_to_bucket(tall, "image_256res", "vit")
    # ViT bucket 288x160 (ratio 0.556): the full-area crop would be 520 px tall, so the crop spans the
    # full height, width round(500 * 160/288) = 278, left offset (300 - 278) // 2 = 11
    crop = Image.fromarray(tall).crop((11, 0, 289, 500)).resize((160, 288), Image.Resampling.BICUBIC)
    # then DivisibleCrop(28): 288x160 -> 280x140, offsets (4, 10)
    assert np.array_equal(out[0], np.asarray(crop)[4:284, 10:150])


def test_same_ratio_other_size_and_upscaling() -> None:
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, size=(448, 608, 3), dtype=np.uint8)  # exactly 4:3 bucket ratio, 2x size
    ref = Image.fromarray(big).resize((304, 224), Image.Resampling.BICUBIC)
    assert np.array_equal(P.resize_to_bucket(big, "video_192p", "vae")[0], np.asarray(ref))
    small = rng.integers(0, 256, size=(56, 76, 3), dtype=np.uint8)  # upscaled, not kept small
    ref = Image.fromarray(small).resize((304, 224), Image.Resampling.BICUBIC)
    assert np.array_equal(P.resize_to_bucket(small, "video_192p", "vae")[0], np.asarray(ref))


def test_vae_pixels_formula() -> None:
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x = P.vae_pixels(u8)
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32
    # golden/README §10: ((u8/255) - 0.5)/0.5 in float32 equals u8/127.5 - 1 bitwise
    assert torch.equal(x, cthw(u8).float() / 127.5 - 1)


def test_vit_patch_layout() -> None:
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, size=(3, 56, 84, 3), dtype=np.uint8)
    patches, grid = P.vit_patches(frames)
    assert grid == (2, 4, 6) and patches.shape == (2 * 4 * 6, 1176)
    padded = np.concatenate([frames, frames[-1:]])  # odd count -> last frame repeated
    mean = np.array(P.CLIP_MEAN, dtype=np.float32)
    std = np.array(P.CLIP_STD, dtype=np.float32)
    norm = (padded.astype(np.float32) / np.float32(255) - mean) / std  # [T, H, W, C]
    # row = ((t * 2 + by) * 3 + bx) * 4 + dy * 2 + dx   (merge groups of 2x2 patches contiguous)
    for t, by, bx, dy, dx in [
        (0, 0, 0, 0, 0),
        (0, 0, 0, 0, 1),
        (0, 1, 2, 1, 0),
        (1, 1, 2, 1, 1),
        (1, 0, 1, 0, 1),
    ]:
        row = ((t * 2 + by) * 3 + bx) * 4 + dy * 2 + dx
        y, x = (2 * by + dy) * 14, (2 * bx + dx) * 14
        block = norm[2 * t : 2 * t + 2, y : y + 14, x : x + 14]  # [frame, y, x, C]
        expected = torch.from_numpy(block.transpose(3, 0, 1, 2).reshape(-1).copy())
        assert torch.allclose(patches[row], expected, atol=1e-6), (t, by, bx, dy, dx)


def test_vit_frames_duplication() -> None:
    img = np.zeros((1, 28, 28, 3), np.uint8)
    assert P.vit_frames(img).shape[0] == 2
    clip = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 28, 28, 3), np.uint8)
    out = P.vit_frames(clip)
    assert out.shape[0] == 6 and out[5, 0, 0, 0] == 4 and out[4, 0, 0, 0] == 4
    assert P.vit_frames(clip[:4]).shape[0] == 4


@pytest.mark.parametrize(
    ("total", "fps", "expected"),
    [
        # 5 frames at 12 fps: n = round(5/12 * 12) = 5 = 4k+1 -> every frame
        (5, 12.0, [0, 1, 2, 3, 4]),
        # 24 frames at 24 fps: n = 12 (multiple of 4) -> 9; linspace(0, 23, 9) truncated
        (24, 24.0, [0, 2, 5, 8, 11, 14, 17, 20, 23]),
        # avg 24.97 -> 25 fps; 10 frames: n = round(4.8) = 5; linspace(0, 9, 5) = 0, 2.25, 4.5, 6.75, 9
        (10, 24.97, [0, 2, 4, 6, 9]),
        # 7 frames at 12 fps: n = 7 -> 5; linspace(0, 6, 5) = 0, 1.5, 3, 4.5, 6
        (7, 12.0, [0, 1, 3, 4, 6]),
        # 12.5 rounds half-to-even to 12 fps: n = 25 -> all 25 frames (13 fps would give 21)
        (25, 12.5, list(range(25))),
        # 2 frames: n = 2 -> 1
        (2, 12.0, [0]),
        # too short for one frame at 12 fps (n = 0; the official code fails): first frame
        (1, 30.0, [0]),
    ],
)
def test_sample_frame_indices(total: int, fps: float, expected: list[int]) -> None:
    assert media_rules.sample_frame_indices(total, fps) == expected


def test_sample_frame_indices_long_video_spans_whole_clip() -> None:
    # 120 s at 29.97 fps: duration capped at 6 s -> n = 72 -> 69 frames spread over all 3596 frames
    idx = media_rules.sample_frame_indices(3596, 29.97)
    assert len(idx) == 69 and idx[0] == 0 and idx[-1] == 3595
    assert idx[1] == int(3595 / 68) and idx[34] == int(34 * 3595 / 68)
    # unknown frame rate -> 24 fps: 48 frames = 2 s -> n = 24 -> 21
    assert len(media_rules.sample_frame_indices(48, float("nan"))) == 21


def test_frames_and_output_sizes() -> None:
    assert P.latent_frames(50) == 13 and P.decoded_frames(50) == 49  # official NUM_FRAMES default
    assert P.latent_frames(121) == 31 and P.decoded_frames(121) == 121
    assert P.latent_frames(1) == 1 and P.decoded_frames(1) == 1
    assert P.output_size(768, 768) == (768, 768)
    assert P.output_size(100, 90) == (96, 80)
    with pytest.raises(ValueError):
        P.output_size(8, 64)


@pytest.mark.parametrize("stream", ["vae", "vit"])
def test_stream_size_is_the_resized_shape(stream: str) -> None:
    rng = np.random.default_rng(3)
    for height, width in [(37, 211), (300, 301), (64, 64), (500, 90), (97, 130)]:
        img = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        out = P.resize_to_bucket(img, "image_256res", stream)
        h, w = P.stream_size(height, width, "image_256res", stream)
        assert out.shape == (1, h, w, 3)
        assert h % P.DIVISOR[stream] == 0 and w % P.DIVISOR[stream] == 0
