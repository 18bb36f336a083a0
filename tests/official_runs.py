"""The `official_runs` fixtures (tests/fixtures/golden/official_runs/, README there): whole runs of the official
inference code over several rows, and how the tests read and compare them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lance_ray.io import media
from lance_ray.models.lance import preprocess

ROOT = Path(__file__).parent / "fixtures" / "golden" / "official_runs"
NAMES = sorted(p.name for p in ROOT.iterdir() if (p / "meta.json").exists())
UNDERSTANDING = [name for name in NAMES if name.startswith("x2t")]
GENERATION = [name for name in NAMES if name not in UNDERSTANDING]


@dataclass(frozen=True)
class OfficialRow:
    media: str | None  # input file under ROOT/inputs (None for t2i/t2v)
    prompt: str | None  # None: an x2t caption (no question)
    pixels: np.ndarray | None  # the official output: an image [H, W, 3], or a video's frames `frames_kept`
    output_shape: tuple[int, ...] | None  # the whole official output
    frames_kept: list[int] | None
    meta: dict  # the row's meta.json entry (x2t: `generated_text`)

    def compare(self, actual: np.ndarray) -> np.ndarray:
        """Our output cut to what the fixture keeps (whole shapes must agree)."""
        assert actual.shape == self.output_shape, (actual.shape, self.output_shape)
        return actual if actual.ndim == 3 else actual[self.frames_kept]


@dataclass(frozen=True)
class OfficialRun:
    name: str
    settings: dict  # task, family, resolution, seed, cfg, steps, num_frames, ...
    rows: list[OfficialRow]
    arrays: dict[str, np.ndarray]

    @property
    def params(self) -> dict:
        """The run's flags as lance-ray params (a job step's `params`, the Python API's keyword arguments)."""
        s = self.settings
        if s["task"].startswith("x2t"):
            return {"preset": s["resolution"], "seed": s["seed"], "seed_mode": "official",
                    "max_new_tokens": s["max_new_tokens"]}
        params = {"preset": s["resolution"], "seed": s["seed"], "seed_mode": "official", "steps": s["steps"],
                  "cfg_scale": s["cfg"], "shift": 3.5}
        if s["task"] in ("t2i", "t2v"):
            params.update(height=s["height"], width=s["width"])
        if s["task"] in ("t2v", "i2v"):
            params["frames"] = s["num_frames"]
        return params


def load(name: str) -> OfficialRun:
    meta = json.loads((ROOT / name / "meta.json").read_text())
    arrays = dict(np.load(ROOT / name / "rows.npz")) if (ROOT / name / "rows.npz").exists() else {}
    rows = []
    for k, r in enumerate(meta["rows"]):
        pixels = arrays.get(f"pixels_{k}")
        shape = None
        if pixels is not None:
            shape = tuple(r["output_shape"][1:] if pixels.ndim == 3 else r["output_shape"])  # an image: [H, W, 3]
        rows.append(OfficialRow(r["media"], r["prompt"], pixels, shape, r.get("frames_kept"), r))
    return OfficialRun(name, meta["settings"], rows, arrays)


def input_path(name: str) -> Path:
    return ROOT / "inputs" / name


def load_input(name: str) -> np.ndarray:
    """An input as the job worker decodes it: an image [H, W, 3], or a video frame-sampled the official way."""
    path = str(input_path(name))
    if name.endswith(".png"):
        return media.decode_image(path)
    info = media.probe_video(path)
    return media.decode_video(path, preprocess.sample_frame_indices(info.num_frames, info.fps))


def assert_official_pixels(actual: np.ndarray, expected: np.ndarray, identical: float) -> None:
    """Within 1 LSB everywhere AND at least `identical` of the values equal: a difference the decoder damps
    below 1 LSB (a wrong ε in an edit) still moves many values by one, so the fraction shows it."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == np.uint8
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    same = float((diff == 0).mean())
    assert diff.max() <= 1 and same >= identical, f"max diff {diff.max()}, {same:.5%} identical"
    assert expected.std() > 5  # not a flat picture, where anything would pass
