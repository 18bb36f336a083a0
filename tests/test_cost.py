"""The planner's cost per row: fitted to the benchmark results, growing with what a row asks for, per GPU type,
and priced by `lance-ray plan --gpu-price`."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from benchmarks.fit_costs import fit, h200_speed
from lance_ray.cli import main
from lance_ray.models.lance import GPU_SPEED, TASKS, Params
from lance_ray.models.lance.tasks import work_units
from lance_ray.pipeline.planner import make_plan
from lance_ray.spec import load_job_text


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-12)


def test_task_costs_are_the_fit_to_the_benchmarks() -> None:
    for task, (fixed, per_unit) in fit().items():
        cost = TASKS[task].cost
        assert _close(cost.fixed, fixed) and _close(cost.per_unit, per_unit), (task, cost, fixed, per_unit)
    assert _close(GPU_SPEED["h200"], h200_speed()) and GPU_SPEED["h100"] == 1.0


def test_the_fit_reproduces_the_measured_rows() -> None:
    """At each measured shape the model gives the measured seconds (both points of an affine fit)."""
    t2v, video_edit = TASKS["t2v"], TASKS["video_edit"]
    assert _close(t2v.gpu_seconds_per_row(t2v.resolve(Params(steps=30, frames=49))), 28.153)
    assert _close(t2v.gpu_seconds_per_row(t2v.resolve(Params(steps=2, frames=121))), 10.5)
    edit = video_edit.resolve(Params(steps=2))
    assert _close(video_edit.cost.seconds(work_units(video_edit, edit, input_frames=121)), 29.49)
    assert _close(TASKS["t2i"].gpu_seconds_per_row(TASKS["t2i"].resolve(Params())), 2.055)  # 768², 30 steps
    assert _close(TASKS["x2t_image"].gpu_seconds_per_row(TASKS["x2t_image"].resolve(Params(max_new_tokens=128))),
                  4.216 / 64)  # the default batch, 64


@pytest.mark.parametrize(("task", "small", "large"), [
    ("t2i", {"steps": 10, "height": 64, "width": 96}, {"steps": 30, "height": 768, "width": 768}),
    ("t2v", {"steps": 10, "frames": 17, "preset": "video_192p"}, {"steps": 30, "frames": 121}),
    ("image_edit", {"steps": 10, "preset": "image_256res"}, {"steps": 30}),
    ("x2t_image", {"max_new_tokens": 16}, {"max_new_tokens": 512}),
])
def test_cost_grows_with_steps_resolution_frames_and_tokens(task: str, small: dict, large: dict) -> None:
    spec = TASKS[task]
    cheap, dear = (spec.gpu_seconds_per_row(spec.resolve(Params(**p))) for p in (small, large))
    work_ratio = work_units(spec, spec.resolve(Params(**large))) / work_units(spec, spec.resolve(Params(**small)))
    assert work_ratio > 5
    if spec.cost.fixed == 0:  # proportional: one shape was measured
        assert _close(dear / cheap, work_ratio)
    else:  # affine: the fixed part damps the ratio
        assert 1 < dear / cheap < work_ratio
        assert _close((dear - spec.cost.fixed) / (cheap - spec.cost.fixed), work_ratio)
    for gpu, speed in GPU_SPEED.items():
        assert _close(spec.gpu_seconds_per_row(spec.resolve(Params(**large)), gpu), dear * speed)


def test_plan_prints_gpu_time_and_dollars(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: priced\nsteps:\n"
                   "  - {name: gen, task: t2i, input: {rows: [" + ", ".join(["{prompt: a}"] * 40) + "]}}\n"
                   "  - {name: vid, task: t2v, input: {rows: [{prompt: b}, {prompt: c}]}, params: {frames: 121}}\n")
    spec_job = load_job_text(job.read_text(), str(job), tmp_path)
    for gpu in ("h100", "h200"):
        assert main(["plan", str(job), "--gpus", "8", "--gpu-type", gpu, "--gpu-price", "2.5"]) == 0
        out = capsys.readouterr().out
        seconds = sum(g.estimated_gpu_s for g in make_plan(spec_job, 8, {"gen": 40, "vid": 2}, gpu_type=gpu).groups)
        hours = seconds / 3600
        line = next(line for line in out.splitlines() if line.startswith("estimated cost:"))
        assert line == f"estimated cost: {hours:.2f} GPU-hours x $2.5/GPU-hour = ${hours * 2.5:,.2f}"
        assert f"on {gpu.upper()} GPUs" in out
        assert re.search(r"step gen +t2i +rows +40", out)
    with pytest.raises(SystemExit) as exit_info:  # no figures for it: an argument error
        main(["plan", str(job), "--gpu-type", "a100"])
    assert exit_info.value.code == 2
