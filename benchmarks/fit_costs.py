"""Fits the planner's per-task cost models (lance_ray/models/lance/tasks.py, `CostModel`) to the benchmark
results in results/, and prints them in the form tasks.py writes them.

    python -m benchmarks.fit_costs

Per task, GPU seconds per row = fixed + per_unit * work, where work is what `work_units` counts (denoising
steps x latent tokens for generation, new tokens for understanding). Where two shapes of a task were
measured (t2v and video_edit: 49 frames at 30 steps, 121 frames at 2 steps) the fit is affine: the fixed
part is what does not grow with the work (VAE, ViT, text). Where one shape was measured it is proportional
(fixed = 0), a guide that is exact at that shape. i2v was not measured and borrows t2v's model; x2t_video
was measured at batch 1 and 49 frames. The H200's speed relative to the H100 comes from the one workload
measured on both: t2i 768² at batch 8 (the H200 figure is the steady rate of the whole pipeline).
tests/test_cost.py checks that tasks.py holds what this prints.
"""

from __future__ import annotations

import json
from pathlib import Path

from lance_ray.models.lance import TASKS, Params
from lance_ray.models.lance.tasks import work_units

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _batch(entries: list[dict], batch: int) -> dict:
    return next(entry for entry in entries if entry["batch"] == batch)


def _work(task: str, input_frames: int | None = None, **params) -> float:
    spec = TASKS[task]
    return work_units(spec, spec.resolve(Params(**params)), input_frames)


def _proportional(seconds: float, work: float) -> tuple[float, float]:
    return 0.0, seconds / work


def _affine(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """(fixed, per_unit) of the line through (work, seconds) points a and b."""
    (work_a, seconds_a), (work_b, seconds_b) = a, b
    per_unit = (seconds_a - seconds_b) / (work_a - work_b)
    return seconds_a - per_unit * work_a, per_unit


def fit() -> dict[str, tuple[float, float]]:
    """task -> (fixed seconds, seconds per work unit) per row on an H100, at the task's default batch size."""
    image, video = _load("h100_image.json"), _load("h100_video.json")
    t2v = _affine(
        (_work("t2v", steps=30, frames=49, preset="video_480p"), _batch(video["t2v_480p_49f"], 1)["s_per_item"]),
        (_work("t2v", steps=2, frames=121, preset="video_480p"), video["t2v_480p_121f_2steps"]["seconds"]),
    )
    captions = _batch(image["x2t_image"], TASKS["x2t_image"].batch_size)
    video_captions = next(entry for entry in video["x2t_video"] if entry["frames"] == 49)
    return {
        "t2i": _proportional(_batch(image["t2i_768"], TASKS["t2i"].batch_size)["s_per_item"],
                             _work("t2i", steps=30, height=768, width=768)),
        "image_edit": _proportional(_batch(image["image_edit_768"], TASKS["image_edit"].batch_size)["s_per_item"],
                                    _work("image_edit", steps=30, preset="image_768res")),
        "x2t_image": _proportional(captions["seconds"] / captions["batch"], _work("x2t_image", max_new_tokens=128)),
        "t2v": t2v,
        "i2v": t2v,
        "video_edit": _affine(
            (_work("video_edit", 49, steps=30), _batch(video["video_edit_480p_49f"], 1)["s_per_item"]),
            (_work("video_edit", 121, steps=2), video["video_edit_480p_121f_2steps"]["seconds"]),
        ),
        "x2t_video": _proportional(video_captions["seconds"], _work("x2t_video", max_new_tokens=128)),
    }


def h200_speed() -> float:
    """H200 seconds per H100 second, from t2i 768² at batch 8 on both."""
    h100 = _batch(_load("h100_image.json")["t2i_768"], 8)["s_per_item"]
    run = next(r for r in _load("h200x2_scaling_48rows.json")["runs"] if r["gpus"] == 1)
    return (1 / run["steady_rows_per_s"]) / h100


if __name__ == "__main__":
    for task, (fixed, per_unit) in fit().items():
        print(f"{task:<11} CostModel({fixed:.4g}, {per_unit:.4g})")
    print(f"h200 speed {h200_speed():.4g}")
