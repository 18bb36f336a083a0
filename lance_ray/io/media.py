"""Image and video decode/encode: uint8 RGB numpy arrays in and out.

Decoding matches the official Lance loader (PIL for images, frames as RGB uint8 for videos) with
deliberate differences that only matter for inputs the official code mis-handles:
* the EXIF orientation tag of an image is applied (the official code ignores it, so a portrait
  photo stored sideways is fed sideways);
* gray+alpha images (`LA`, `PA`) are composited on white like RGBA (the official code drops their
  alpha, so transparent areas come out in whatever colour they happen to store);
* 16-bit grayscale images are scaled to 8 bits (the official conversion clips them, so anything
  brighter than 1/256 of full scale comes out white);
* the display matrix of a video (phone videos recorded upright but stored rotated) is applied to
  the decoded frames (decord, used by the official code, ignores it).
For every other input the pixels are the same.

Media are untrusted input: whatever is wrong with a file (empty, not a regular file, a FIFO that
would block, a symlink loop, truncated, a format no decoder knows, a "decompression bomb" whose
header promises more than `MAX_IMAGE_PIXELS` / `MAX_VIDEO_FRAME_PIXELS`) is a `MediaError` naming
the file, raised before any large allocation; the caller turns it into that row's error.

Videos are addressed by frame index in decode order and described by their average frame rate, as
decord does; variable-frame-rate videos therefore need no special case.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lance_ray.io.storage import filesystem_for, is_local
from lance_ray.models.lance import image_to_rgb

if TYPE_CHECKING:  # PyAV is imported where videos are handled: image-only work runs without it
    import av

MediaInput = str | bytes
VideoCodec = Literal["h264", "ffv1"]

# Pillow's own decompression-bomb warning threshold (about 9459 x 9459): larger images are refused.
MAX_IMAGE_PIXELS = 89_478_485
MAX_VIDEO_FRAME_PIXELS = 7680 * 4320  # 8K UHD; up to 73 sampled frames are decoded at full size
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N")


class MediaError(ValueError):
    """A media file that cannot be used: missing, unreadable, corrupt, truncated or unsupported."""


def _open_binary(src: MediaInput) -> BinaryIO:
    if isinstance(src, bytes | bytearray | memoryview):
        if not src:
            raise MediaError("<0 bytes>: empty file")
        return io.BytesIO(bytes(src))
    fs, path = filesystem_for(src)
    try:
        if is_local(src):
            # Checked before opening: a FIFO would block the open, a device (/dev/zero) never ends.
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
                raise MediaError(f"{src}: cannot open ({what})")
            if info.st_size == 0:
                raise MediaError(f"{src}: empty file")
        return fs.open(path, "rb")
    except FileNotFoundError as e:
        raise MediaError(f"{src}: file not found") from e
    except OSError as e:
        raise MediaError(f"{src}: cannot open ({e.strerror or e})") from e


def _name(src: MediaInput) -> str:
    return src if isinstance(src, str) else f"<{len(src)} bytes>"


# ----------------------------------------------------------------------------------------- images


def decode_image(src: MediaInput) -> np.ndarray:
    """Decode an image (path, URI or encoded bytes) to RGB uint8 `[H, W, 3]`.

    Palette images go through RGBA; images with an alpha channel are composited on white (the
    official rule); everything else (grayscale, CMYK, 16-bit) is converted to RGB.
    """
    with _open_binary(src) as f:
        try:
            with warnings.catch_warnings():  # Pillow warns about sizes that MAX_IMAGE_PIXELS refuses below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(f)
        except UnidentifiedImageError:
            raise MediaError(f"{_name(src)}: not a readable image (unknown format, or corrupt)") from None
        except Image.DecompressionBombError:  # Pillow's own check, at twice MAX_IMAGE_PIXELS
            raise MediaError(f"{_name(src)}: image is larger than {MAX_IMAGE_PIXELS:,} pixels; "
                             "downscale it first") from None
        except Exception as e:  # a hostile file can make a decoder raise anything
            raise MediaError(f"{_name(src)}: not a readable image ({_reason(e)})") from e
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise MediaError(f"{_name(src)}: image is larger than {MAX_IMAGE_PIXELS:,} pixels "
                             f"({image.width}x{image.height}); downscale it first")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except Exception as e:
            raise MediaError(f"{_name(src)}: not a readable image ({_reason(e)})") from e
    if image.mode in ("PA", "LA", "La", "RGBa"):  # alpha the official rule would drop: composite it too
        image = image.convert("RGBA")
    elif image.mode in _SIXTEEN_BIT_GRAY:  # the official rule would clip: scale 0..65535 to 0..255
        image = Image.fromarray(((np.asarray(image, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    return image_to_rgb(image)  # the official rule: palette -> RGBA, RGBA on white, else RGB


def _reason(error: BaseException) -> str:
    """What went wrong, in a few words: FFmpeg's and the OS's own wording, else the exception."""
    wording = getattr(error, "strerror", None)
    if wording:
        return str(wording)
    return str(error) if isinstance(error, OSError | ValueError) else f"{type(error).__name__}: {error}"


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of an RGB uint8 `[H, W, 3]` array."""
    _check_frames(image[None])
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- videos


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # number of frames in decode order
    fps: float  # average frame rate (frames / duration), as decord's get_avg_fps
    width: int  # display size, i.e. after `rotation` is applied
    height: int
    rotation: int  # counter-clockwise degrees (0, 90, 180, 270) applied to every decoded frame


@contextmanager
def _video_container(src: MediaInput) -> Iterator[av.container.InputContainer]:
    import av

    with _open_binary(src) as f:
        try:
            container = av.open(f, "r")
        except Exception as e:  # FFmpeg's errors, and anything a hostile file provokes in PyAV
            raise MediaError(f"{_name(src)}: not a readable video ({_reason(e)})") from e
        with container:
            if not container.streams.video:
                raise MediaError(f"{_name(src)}: no video stream")
            stream = container.streams.video[0]
            if stream.width * stream.height > MAX_VIDEO_FRAME_PIXELS:
                raise MediaError(f"{_name(src)}: video frames of {stream.width}x{stream.height} pixels are "
                                 f"larger than {MAX_VIDEO_FRAME_PIXELS:,} pixels; downscale it first")
            yield container


def _rotation_of(frame: av.VideoFrame, src: MediaInput) -> int:
    rotation = round(frame.rotation) % 360
    if rotation % 90:
        raise MediaError(f"{_name(src)}: unsupported display rotation of {frame.rotation} degrees")
    return rotation


def probe_video(src: MediaInput) -> VideoInfo:
    """Frame count, average fps, display size and rotation of a video.

    The frame count comes from the container index when it has one (MP4), else from counting the
    video packets; the first frame is decoded to read the display matrix and to prove the stream
    decodes at all.
    """
    with _video_container(src) as container:
        stream = container.streams.video[0]
        try:
            first = next(container.decode(stream))
            rotation = _rotation_of(first, src)
            count = stream.frames
            if count <= 0:
                container.seek(0)
                count = sum(1 for p in container.demux(stream) if p.size > 0)
        except StopIteration:
            raise MediaError(f"{_name(src)}: video does not decode (no frames)") from None
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(f"{_name(src)}: video does not decode ({_reason(e)})") from e
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise MediaError(f"{_name(src)}: video has no frame rate")
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        return VideoInfo(num_frames=count, fps=float(rate), width=width, height=height, rotation=rotation)


def decode_video(src: MediaInput, indices: Sequence[int] | None = None) -> np.ndarray:
    """Decode frames `indices` (decode order; repeats allowed; all frames when None) to RGB24
    uint8 `[T, H, W, 3]`, rotated upright.

    Raises `MediaError` when the file is corrupt or ends before the last requested frame.
    """
    wanted = None if indices is None else {int(i) for i in indices}
    if wanted is not None and (not wanted or min(wanted) < 0):
        raise ValueError(f"frame indices must be non-negative and non-empty, got {indices}")
    last = None if wanted is None else max(wanted)
    picked: dict[int, np.ndarray] = {}
    decoded = 0
    with _video_container(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rotation = 0
        try:
            for frame in container.decode(stream):
                if decoded == 0:
                    rotation = _rotation_of(frame, src)
                if wanted is None or decoded in wanted:
                    picked[decoded] = np.rot90(frame.to_ndarray(format="rgb24"), k=rotation // 90)
                decoded += 1
                if last is not None and decoded > last:
                    break
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(f"{_name(src)}: video is corrupt ({_reason(e)})") from e
    if decoded == 0:
        raise MediaError(f"{_name(src)}: video has no decodable frames")
    if last is not None and last >= decoded:
        raise MediaError(f"{_name(src)}: frame {last} requested but the video ends after {decoded} frames")
    order = sorted(picked) if indices is None else [int(i) for i in indices]
    return np.ascontiguousarray(np.stack([picked[i] for i in order]))


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"expected RGB uint8 [T, H, W, 3] / [H, W, 3], got {frames.dtype} {frames.shape}")


def encode_video(
    frames: np.ndarray, fps: float, codec: VideoCodec = "h264", crf: int = 18
) -> tuple[bytes, str]:
    """Encode RGB uint8 `[T, H, W, 3]` frames; returns `(bytes, extension)`.

    * `h264`: MP4, yuv420p (plays everywhere), quality set by `crf` (0–51, lower is better). 4:2:0
      needs even sides, so an odd height/width is padded by repeating the last row/column.
    * `ffv1`: lossless FFV1 (RGB, bit-exact) in Matroska (`.mkv`).
    """
    import av

    _check_frames(frames)
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    if codec == "h264":
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        container_format, extension, codec_name, pix_fmt = "mp4", "mp4", "libx264", "yuv420p"
        options = {"crf": str(crf), "preset": "medium"}
    elif codec == "ffv1":
        container_format, extension, codec_name, pix_fmt = "matroska", "mkv", "ffv1", "bgr0"
        options = {"level": "3"}
    else:
        raise ValueError(f"unknown video codec {codec!r}: expected 'h264' or 'ffv1'")
    with av.open(buf, "w", format=container_format) as container:
        stream = container.add_stream(codec_name, rate=rate, options=options)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = pix_fmt
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue(), extension
