"""Hostile media files, written with the real codecs: each with what decoding it must give.

`write_hostile_media(folder)` writes every kind into `folder` and returns one `MediaCase` each. A
case either decodes (`pixels` checks the result) or fails with a `MediaError` whose message contains
`error`. Used by test_hostile_media.py (decode, and a whole job over them on the tiny model).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

Check = Callable[[np.ndarray], None]


@dataclass(frozen=True)
class MediaCase:
    name: str  # file name, also the case id
    kind: str  # image | video
    error: str | None  # a fragment of the MediaError message; None: decodes
    pixels: Check | None = None  # checks the decoded uint8 array (a video: all its frames)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of `width` x `height` black pixels: a few KB on disk."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def png_rgb48(pixels16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = pixels16.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels16)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _video(frames: np.ndarray, codec: str = "libx264", pix_fmt: str = "yuv420p", fmt: str = "mp4",
           rate: int = 12) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], pix_fmt
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


def _audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        samples = (np.sin(np.arange(16000) / 8)[None, :] * 0.3).astype(np.float32)
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.time_base = 16000, Fraction(1, 16000)
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def _exact(expected: np.ndarray) -> Check:
    def check(decoded: np.ndarray) -> None:
        np.testing.assert_array_equal(decoded, expected)

    return check


def _close(expected: np.ndarray, tolerance: int, shape: tuple[int, ...] | None = None) -> Check:
    def check(decoded: np.ndarray) -> None:
        if shape is not None:
            assert decoded.shape == shape, decoded.shape
        difference = np.abs(decoded.astype(int) - expected.astype(int))
        assert difference.max() <= tolerance, difference.max()

    return check


def _shape(shape: tuple[int, ...]) -> Check:
    def check(decoded: np.ndarray) -> None:
        assert decoded.shape == shape and decoded.dtype == np.uint8, (decoded.shape, decoded.dtype)

    return check


def write_hostile_media(folder: Path) -> list[MediaCase]:
    """Writes every hostile kind into `folder` (created if needed); returns the cases."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12)
    cases: list[MediaCase] = []

    def image(name: str, data: bytes, error: str | None, pixels: Check | None = None) -> None:
        (folder / name).write_bytes(data)
        cases.append(MediaCase(name, "image", error, pixels))

    def video(name: str, data: bytes, error: str | None, pixels: Check | None = None) -> None:
        (folder / name).write_bytes(data)
        cases.append(MediaCase(name, "video", error, pixels))

    unreadable = "not a readable image"
    image("zero_byte.png", b"", "empty file")
    image("one_pixel.png", _encoded(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG"),
          None, _exact(np.array([[[200, 10, 30]]], np.uint8)))
    image("bomb_20000x20000.png", png_bomb(20000, 20000), "pixels")
    image("text_named.png", b"this is not an image, just text with a .png name\n", unreadable)
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    image("cmyk.jpg", _encoded(cmyk, "JPEG", quality=95), None,
          _close(np.full((8, 16, 3), (255, 0, 0), np.uint8), 8))
    frames = [Image.new("P", (12, 10), i) for i in range(3)]
    for i, frame in enumerate(frames):
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
        frames[i] = frame
    image("animated.gif", _encoded(frames[1], "GIF", save_all=True, append_images=[frames[2], frames[0]],
                                   duration=100, loop=0),
          None, _exact(np.full((10, 12, 3), (255, 0, 0), np.uint8)))  # the first frame
    webp = rng.integers(0, 256, (9, 14, 3), dtype=np.uint8)
    image("lossless.webp", _encoded(Image.fromarray(webp), "WEBP", lossless=True), None, _exact(webp))
    gray16 = np.array([[0, 257 * 128, 65535]], np.uint16)
    image("gray16.png", _encoded(Image.fromarray(gray16), "PNG"), None,
          _exact(np.repeat(np.array([[0, 128, 255]], np.uint8)[..., None], 3, axis=2)))
    rgb16 = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    image("rgb48.png", png_rgb48(rgb16), None, _close((rgb16 // 257).astype(np.uint8), 1))
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: a 60 KB EXIF block, near the JPEG segment limit
    exif[0x0112] = 6  # orientation: rotate
    upright = np.zeros((8, 16, 3), np.uint8)
    upright[:, :8] = 255
    image("huge_exif.jpg", _encoded(Image.fromarray(np.rot90(upright, k=1)), "JPEG", quality=100,
                                    exif=exif.tobytes()),
          None, _close(upright, 24, (8, 16, 3)))
    text_chunk = zlib.compress(b"a" * 200_000_000)  # a 200 MB zTXt chunk in 200 KB
    bombed = _encoded(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG")
    ztxt = _png_chunk(b"zTXt", b"Comment\x00\x00" + text_chunk)
    image("text_chunk_bomb.png", bombed[:33] + ztxt + bombed[33:], "too large")
    jpeg = _encoded(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    image("truncated.jpg", jpeg[:400], unreadable)
    png = bytearray(_encoded(Image.new("RGB", (8, 8), (9, 9, 9)), "PNG"))
    png[40] ^= 0xFF  # inside the IDAT data: its CRC no longer matches
    image("bad_crc.png", bytes(png), unreadable)
    image("jpeg_named.png", _encoded(Image.new("RGB", (6, 4), (0, 0, 255)), "JPEG", quality=100), None,
          _close(np.full((4, 6, 3), (0, 0, 255), np.uint8), 4))
    tall = np.full((3000, 1, 3), 77, np.uint8)
    image("tall_1x3000.png", _encoded(Image.fromarray(tall), "PNG"), None, _exact(tall))

    (folder / "folder.png").mkdir()
    cases.append(MediaCase("folder.png", "image", "cannot open"))
    os.symlink("loop_b.png", folder / "loop_a.png")
    os.symlink("loop_a.png", folder / "loop_b.png")
    cases.append(MediaCase("loop_a.png", "image", "cannot open"))
    os.mkfifo(folder / "fifo.png")  # opening it would wait forever for a writer
    cases.append(MediaCase("fifo.png", "image", "not a regular file"))

    clip = np.clip(np.arange(64)[None, :, None, None] * 3 + np.arange(7)[:, None, None, None] * 20,
                   0, 255).astype(np.uint8).repeat(48, axis=2).repeat(3, axis=3).transpose(0, 2, 1, 3)
    clip = np.ascontiguousarray(clip[:, :, :48])  # 7 frames of 48x48 ramps
    video("zero_byte.mp4", b"", "empty file")
    video("audio_only.mp4", _audio_only(), "no video stream")
    video("one_frame.mp4", _video(clip[:1]), None, _close(clip[:1], 12, (1, 48, 48, 3)))
    video("ten_bit.mp4", _video(clip, pix_fmt="yuv420p10le"), None, _close(clip, 12, (7, 48, 48, 3)))
    whole = _video(clip)
    video("truncated.mp4", whole[: len(whole) // 2], "not a readable video")
    video("text_named.mp4", b"not a video at all\n" * 50, "not a readable video")
    odd = rng.integers(0, 256, (3, 1, 1, 3), dtype=np.uint8)
    video("one_pixel.mkv", _video(odd, "ffv1", "bgr0", "matroska"), None, _exact(odd))
    video("vp9.webm", _video(clip, "libvpx-vp9", "yuv420p", "webm"), None, _shape((7, 48, 48, 3)))
    os.mkfifo(folder / "fifo.mp4")
    cases.append(MediaCase("fifo.mp4", "video", "not a regular file"))
    return cases
