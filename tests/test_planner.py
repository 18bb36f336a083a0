"""Planner: waves from from_step chains, checkpoint groups, actor counts, estimates."""

from __future__ import annotations

from pathlib import Path

from lance_ray.models.lance.tasks import TASKS
from lance_ray.pipeline.planner import (
    format_plan,
    make_plan,
    runs_side_by_side,
    step_levels,
)
from lance_ray.spec import load_job_text

JOB = """
name: mixed
models:
  image: {source: lance-tiny}
  video: {source: lance-tiny}
steps:
  - {name: gen, task: t2i, input: {rows: [{prompt: a}, {prompt: b}]}}
  - {name: cap, task: x2t_image, input: {rows: [{image: x.png, prompt: q}]}}
  - {name: vid, task: t2v, input: {rows: [{prompt: c}]}, resources: {gpus: 3}}
  - {name: edit, task: image_edit, input: {from_step: gen, prompt: "make it blue"}}
  - {name: cap2, task: x2t_image, input: {from_step: edit, prompt: "what is it?"}}
"""


def _job(tmp_path: Path):
    return load_job_text(JOB, "mixed.yaml", tmp_path)


def test_waves_follow_from_step_chains(tmp_path: Path) -> None:
    levels = step_levels(_job(tmp_path))
    assert levels == {"gen": 0, "cap": 0, "vid": 0, "edit": 1, "cap2": 2}


def test_groups_by_family_and_rows_flow_down_chains(tmp_path: Path) -> None:
    plan = make_plan(_job(tmp_path), cluster_gpus=8, row_counts={"gen": 200, "cap": 50, "vid": 10})
    wave0 = {g.family: g for g in plan.waves[0].groups}
    assert [p.step.name for p in wave0["image"].steps] == ["gen", "cap"]
    assert [p.step.name for p in wave0["video"].steps] == ["vid"]
    # The video group asked for 3 GPUs; the image group gets what is left.
    assert wave0["video"].actors == 3
    assert wave0["image"].actors == 5
    assert runs_side_by_side(plan.waves[0], 8)
    assert not runs_side_by_side(plan.waves[0], 4)
    # Rows of a step fed by another step are estimated from its upstream.
    assert plan.waves[2].groups[0].steps[0].rows == 200
    t2i, x2t = TASKS["t2i"], TASKS["x2t_image"]
    # defaults: t2i 768² at 30 steps; captions of 256 new tokens
    expected = 200 * t2i.cost.per_unit * 30 * 48 * 48 + 50 * x2t.cost.per_unit * 256
    assert abs(wave0["image"].estimated_gpu_s - expected) < 1e-9


def test_cost_scales_with_steps_and_size(tmp_path: Path) -> None:
    job = load_job_text(
        "name: c\nsteps:\n"
        "  - {name: big, task: t2i, input: {rows: [{prompt: a}]}}\n"
        "  - {name: small, task: t2i, input: {rows: [{prompt: a}]}, params: {steps: 10, height: 384, width: 384}}\n",
        "c.yaml", tmp_path)
    plan = make_plan(job, cluster_gpus=1, row_counts={"big": 1, "small": 1})
    big, small = plan.waves[0].groups[0].steps
    assert abs(small.estimated_gpu_s - big.estimated_gpu_s / 3 / 4) < 1e-9


def test_cpu_plan_uses_one_actor_and_never_more_actors_than_batches(tmp_path: Path) -> None:
    plan = make_plan(_job(tmp_path), cluster_gpus=0, row_counts={"gen": 2, "cap": 1, "vid": 1})
    for group in plan.groups:
        assert group.gpus_per_actor == 0
    image = plan.waves[0].groups[0]
    assert image.actors == 1
    # Asked for 3 GPUs, but one row is one batch: a second or third model copy would never get work.
    video = plan.waves[0].groups[1]
    assert video.actors == 1


def test_format_plan_mentions_every_step_and_group(tmp_path: Path) -> None:
    text = format_plan(make_plan(_job(tmp_path), cluster_gpus=2, row_counts={"gen": 2, "cap": 1, "vid": 1}))
    for name in ("gen", "cap", "vid", "edit", "cap2", "group image", "group video", "estimated GPU time"):
        assert name in text


def test_cfg_parallel_steps_get_two_gpus_per_actor(tmp_path: Path) -> None:
    text = """
name: fast
steps:
  - {name: vid, task: t2v, input: {rows: [{prompt: a}, {prompt: b}]}, params: {cfg_parallel: true},
     resources: {gpus: 4}}
  - {name: img, task: t2i, input: {rows: [{prompt: a}, {prompt: b}, {prompt: c}]}, params: {cfg_parallel: true}}
"""
    plan = make_plan(load_job_text(text, "fast.yaml", tmp_path), cluster_gpus=6, row_counts={"vid": 8, "img": 60})
    groups = {g.family: g for g in plan.groups}
    assert (groups["video"].actors, groups["video"].gpus_per_actor) == (2, 2)  # 4 GPUs asked: 2 actors
    assert (groups["image"].actors, groups["image"].gpus_per_actor) == (1, 2)  # the 2 GPUs left
    assert runs_side_by_side(plan.waves[0], 6)
