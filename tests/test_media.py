"""Image/video decode and encode with the real codecs (Pillow, PyAV's FFmpeg)."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from lance_ray.io.media import MediaError, decode_image, decode_video, encode_png, encode_video, probe_video

DATASETS = Path(__file__).resolve().parent.parent / "datasets"


def smooth_clip(frames: int, height: int, width: int) -> np.ndarray:
    """Low-frequency colour ramps that move over time: easy for H.264, so PSNR bounds are meaningful."""
    t = np.arange(frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    r = 128 + 100 * np.sin(2 * np.pi * (x / width + t / frames))
    g = 128 + 100 * np.cos(2 * np.pi * (y / height - t / frames))
    b = 64 + 0.5 * (x + y) + 0 * t
    return np.clip(np.stack(np.broadcast_arrays(r, g, b), axis=-1), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_kwargs)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- images


def test_decode_rgb_png_is_exact_and_png_roundtrips(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(rgb))
    for src in (str(path), f"file://{path}", path.read_bytes()):
        out = decode_image(src)
        assert out.dtype == np.uint8 and out.shape == (37, 53, 3)
        np.testing.assert_array_equal(out, rgb)


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(60 * 40, dtype=np.uint32).reshape(40, 60).astype(np.uint8)
    out = decode_image(png_bytes(Image.fromarray(gray, mode="L")))
    assert out.shape == (40, 60, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_is_composited_on_white():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (16, 24), dtype=np.uint8)
    alpha[0, :] = 0
    alpha[1, :] = 255
    out = decode_image(png_bytes(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")))
    a = alpha[..., None].astype(np.float64) / 255
    expected = rgb * a + 255 * (1 - a)  # "over" on a white background
    assert np.abs(out - expected).max() <= 1.0  # PIL rounds the blend in integer arithmetic
    np.testing.assert_array_equal(out[0], 255)  # fully transparent: white
    np.testing.assert_array_equal(out[1], rgb[1])  # opaque: untouched


def test_gray_with_alpha_is_composited_on_white():
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0] = 40
    la[:4, :, 1] = 255  # top half opaque dark gray, bottom half transparent
    out = decode_image(png_bytes(Image.fromarray(la, mode="LA")))
    np.testing.assert_array_equal(out[:4], 40)
    np.testing.assert_array_equal(out[4:], 255)


def test_palette_transparency_becomes_white():
    image = Image.new("P", (10, 6))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    pixels = np.zeros((6, 10), np.uint8)
    pixels[:, 5:] = 1
    image.putdata(pixels.ravel().tolist())
    out = decode_image(png_bytes(image, transparency=1))  # palette index 1 (blue) is transparent
    np.testing.assert_array_equal(out[:, :5], np.broadcast_to([255, 0, 0], (6, 5, 3)))
    np.testing.assert_array_equal(out[:, 5:], 255)


def test_exif_orientation_is_applied():
    # Orientation 6 (EXIF spec): the stored image must be turned 90 degrees clockwise for display.
    stored = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(png_bytes(Image.fromarray(stored), exif=exif.tobytes()))
    assert out.shape == (30, 20, 3)
    np.testing.assert_array_equal(out, np.rot90(stored, k=-1))


def test_bad_images_raise_media_error(tmp_path):
    good = png_bytes(Image.fromarray(np.full((64, 64, 3), 7, np.uint8)))
    with pytest.raises(MediaError, match="not a readable image"):
        decode_image(b"this is not an image")
    with pytest.raises(MediaError, match="not a readable image"):
        decode_image(good[: len(good) // 2])  # truncated PNG
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    with pytest.raises(MediaError):
        decode_image(jpeg.getvalue()[:300])  # truncated JPEG
    with pytest.raises(MediaError, match="not found"):
        decode_image(str(tmp_path / "missing.png"))


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    """Pillow refuses past twice its limit but only warns below that: our limit applies in between too."""
    import struct
    import zlib

    def png_header_only(width: int, height: int) -> bytes:
        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
        header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")

    for width, height in ((10_000, 9_000), (20_000, 20_000)):  # 90 MP (Pillow: a warning), 400 MP
        with pytest.raises(MediaError, match="larger than 89,478,485 pixels"):
            decode_image(png_header_only(width, height))


def test_16_bit_grayscale_is_scaled_not_clipped():
    gray = np.array([[0, 257, 32896, 65535]], np.uint16)
    decoded = decode_image(png_bytes(Image.fromarray(gray)))
    np.testing.assert_array_equal(decoded[..., 0], [[0, 1, 128, 255]])
    assert (decoded == decoded[..., :1]).all()


def test_empty_and_non_regular_files_fail_without_opening(tmp_path):
    import os

    (tmp_path / "empty.png").write_bytes(b"")
    os.mkfifo(tmp_path / "pipe.mp4")  # opening it would block until a writer came
    with pytest.raises(MediaError, match="empty file"):
        decode_image(str(tmp_path / "empty.png"))
    with pytest.raises(MediaError, match="not a regular file"):
        probe_video(str(tmp_path / "pipe.mp4"))
    with pytest.raises(MediaError, match="a directory"):
        decode_image(str(tmp_path))


# ----------------------------------------------------------------------------------------- videos


def test_ffv1_roundtrip_is_bit_exact_even_with_odd_sizes():
    clip = np.random.default_rng(4).integers(0, 256, (7, 33, 45, 3), dtype=np.uint8)
    data, ext = encode_video(clip, 12, "ffv1")
    assert ext == "mkv"
    info = probe_video(data)
    assert (info.num_frames, info.width, info.height, info.rotation) == (7, 45, 33, 0)
    assert info.fps == pytest.approx(12)
    np.testing.assert_array_equal(decode_video(data), clip)


def test_h264_roundtrip_within_psnr_bound(tmp_path):
    clip = smooth_clip(13, 96, 128)
    data, ext = encode_video(clip, 25, "h264", crf=18)
    assert ext == "mp4"
    path = tmp_path / f"clip.{ext}"
    path.write_bytes(data)
    info = probe_video(str(path))
    assert (info.num_frames, info.width, info.height) == (13, 128, 96)
    assert info.fps == pytest.approx(25)
    with av.open(str(path)) as container:  # what players see: H.264 in yuv420p
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
    decoded = decode_video(str(path))
    assert decoded.shape == clip.shape
    assert psnr(decoded, clip) > 35


def test_h264_pads_odd_sizes_by_repeating_edges():
    clip = smooth_clip(5, 31, 47)
    decoded = decode_video(encode_video(clip, 12, "h264")[0])
    assert decoded.shape == (5, 32, 48, 3)
    assert psnr(decoded[:, :31, :47], clip) > 30  # a tiny frame: relatively more edge blocks
    assert psnr(decoded[:, 31, :47], clip[:, 30]) > 30  # the added row repeats the last one


def test_decode_selected_indices_in_request_order():
    clip = np.random.default_rng(5).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    data, _ = encode_video(clip, 12, "ffv1")
    np.testing.assert_array_equal(decode_video(data, [7, 0, 7, 3]), clip[[7, 0, 7, 3]])
    with pytest.raises(MediaError, match="ends after 10 frames"):
        decode_video(data, [2, 10])
    with pytest.raises(ValueError):
        decode_video(data, [])


def test_ntsc_frame_rate_is_kept():
    data, _ = encode_video(smooth_clip(6, 32, 32), 30000 / 1001, "h264")
    assert probe_video(data).fps == pytest.approx(30000 / 1001, rel=1e-6)


def _encode_with_pts(clip: np.ndarray, pts_ms: list[int]) -> bytes:
    """Lossless clip with explicit (irregular) timestamps: a variable-frame-rate video."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = clip.shape[2], clip.shape[1], "bgr0"
        stream.codec_context.time_base = Fraction(1, 1000)
        for frame_pixels, pts in zip(clip, pts_ms, strict=True):
            frame = av.VideoFrame.from_ndarray(frame_pixels, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def test_variable_frame_rate_frames_are_addressed_in_decode_order():
    clip = np.random.default_rng(6).integers(0, 256, (8, 16, 24, 3), dtype=np.uint8)
    data = _encode_with_pts(clip, [0, 40, 50, 200, 210, 400, 500, 520])
    info = probe_video(data)
    assert info.num_frames == 8
    assert info.fps > 0
    np.testing.assert_array_equal(decode_video(data), clip)
    np.testing.assert_array_equal(decode_video(data, [6, 2]), clip[[6, 2]])


def test_display_rotation_is_applied():
    clip = np.zeros((3, 48, 64, 3), np.uint8)
    clip[:, :16, :16] = 255  # a white block in the stored top-left corner
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=12, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        stream.set_display_rotation(90)  # PyAV: counter-clockwise degrees, as VideoFrame.rotation reads back
        for pixels in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    info = probe_video(buf.getvalue())
    assert (info.rotation, info.width, info.height) == (90, 48, 64)
    decoded = decode_video(buf.getvalue())
    assert decoded.shape == (3, 64, 48, 3)
    # Turned 90 degrees counter-clockwise, the top-left block ends up bottom-left.
    assert psnr(decoded, np.rot90(clip, k=1, axes=(1, 2))) > 40


def test_truncated_and_corrupt_videos_raise_media_error(tmp_path):
    clip = smooth_clip(12, 64, 64)
    data, _ = encode_video(clip, 12, "h264")
    with pytest.raises(MediaError):  # the index (moov) sits at the end: a cut file does not open
        probe_video(data[: len(data) // 2])
    with pytest.raises(MediaError):
        decode_video(data[: len(data) // 2], [0])

    faststart = tmp_path / "faststart.mp4"  # index first: a cut file opens but runs out of frames
    with av.open(str(faststart), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for pixels in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    whole = faststart.read_bytes()
    cut = whole[: int(len(whole) * 0.9)]
    assert probe_video(cut).num_frames == 12  # the index still promises 12 frames
    with pytest.raises(MediaError):
        decode_video(cut, [11])

    with pytest.raises(MediaError, match="not a readable video"):
        probe_video(b"\x00" * 1000)
    with pytest.raises(MediaError, match="not found"):
        decode_video(str(tmp_path / "missing.mp4"), [0])
    image = tmp_path / "still.png"
    image.write_bytes(encode_png(clip[0]))
    assert probe_video(str(image)).num_frames == 1  # FFmpeg reads a PNG as a one-frame video


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_video(np.zeros((2, 8, 8, 3), np.float32), 12)
    with pytest.raises(ValueError):
        encode_video(np.zeros((2, 8, 8, 3), np.uint8), 12, "vp9")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_png(np.zeros((8, 8), np.uint8))


# ----------------------------------------------------------------------------------------- samples


def test_sample_media_decode():
    sizes = {p.name: decode_image(str(p)).shape for p in sorted((DATASETS / "images").iterdir())}
    assert len(sizes) == 6
    for name, shape in sizes.items():
        width, height = (int(v) for v in name.rsplit("_", 1)[1].split(".")[0].split("x"))
        assert shape == (height, width, 3), name
    for path in sorted((DATASETS / "videos").glob("*.mp4")):
        _, size, rate = path.stem.rsplit("_", 2)
        info = probe_video(str(path))
        assert f"{info.width}x{info.height}" == size
        assert info.fps == pytest.approx(float(rate.removesuffix("fps")))
        frames = decode_video(str(path))
        assert frames.shape == (info.num_frames, info.height, info.width, 3)
        assert 12 <= info.num_frames <= 25
