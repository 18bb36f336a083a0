"""The task registry: one TaskSpec per task, read by the job spec and by the Python API alike."""

from __future__ import annotations

import numpy as np
import pytest

from lance_ray.models.lance.pipeline import LancePipeline
from lance_ray.models.lance.tasks import TASKS, floor_to_multiple
from lance_ray.spec import load_job_text


def _job_settings(name: str, params: str = "{}"):
    text = (f"name: d\nsteps:\n  - {{name: s, task: {name}, params: {params}, "
            "input: {rows: [{prompt: p, image: i.png, video: v.mp4}]}}\n")
    job = load_job_text(text, "d.yaml", "/jobs")
    step = job.steps[0]
    return step.spec.settings(step.params_for(job)), step.params_for(job)


class _Recorder(LancePipeline):
    """A LancePipeline without a model: records what the friendly methods hand to `run`."""

    def __init__(self) -> None:  # no checkpoint: only the methods' argument handling is under test
        self.calls: list[dict] = []

    def run(self, task, media, prompts, *, seeds, settings, max_batch_size=None):
        self.calls.append({"task": task.name, "seeds": seeds, "settings": settings})
        return []


def _call(pipe: LancePipeline, name: str, **params):
    media = {"image": [np.zeros((32, 32, 3), np.uint8)], "video": [np.zeros((5, 32, 32, 3), np.uint8)]}
    task = TASKS[name]
    args = (media[task.input_media],) if task.input_media else ()
    return getattr(pipe, name)(*args, ["a prompt"], **params)


@pytest.mark.parametrize("name", list(TASKS))
def test_job_file_and_python_api_use_identical_settings(name: str) -> None:
    pipe = _Recorder()
    _call(pipe, name)  # no keyword arguments at all
    job_settings, job_params = _job_settings(name)  # no params at all
    assert pipe.calls[0]["settings"] == job_settings
    # The Python API gives every row the step seed, as the official script does (seed_mode: official).
    assert pipe.calls[0]["seeds"] == [job_params.seed]


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_has_its_pipeline_method(name: str) -> None:
    assert callable(getattr(LancePipeline, name))


def test_python_params_are_validated_once_and_resolved_like_a_job() -> None:
    pipe = _Recorder()
    _call(pipe, "t2i", steps=8, height=70, width=100, cfg_interval=(0.5, 1.0))
    job_settings, _ = _job_settings("t2i", "{steps: 8, height: 70, width: 100, cfg_interval: [0.5, 1.0]}")
    assert pipe.calls[0]["settings"] == job_settings
    assert (job_settings.height, job_settings.width) == (64, 96)  # floored like the official script
    with pytest.raises(TypeError, match="t2i does not read frames"):
        _call(pipe, "t2i", frames=5)
    with pytest.raises(ValueError, match="steps"):
        _call(pipe, "t2i", steps=0)


def test_defaults_follow_the_official_script() -> None:
    t2v, _ = _job_settings("t2v")
    assert (t2v.height, t2v.width, t2v.frames) == (480, 848, 49)  # video_480p's 16:9 bucket, NUM_FRAMES 50 -> 49
    assert (t2v.sampler.steps, t2v.sampler.shift, t2v.sampler.cfg_scale) == (30, 3.5, 4.0)
    caption, params = _job_settings("x2t_image")
    assert (caption.max_new_tokens, caption.temperature, params.seed) == (256, 0.0, 42)
    assert floor_to_multiple(1023) == 1008


def test_what_rows_carry_for_from_step_readers() -> None:
    assert TASKS["x2t_image"].carries == {"image"}  # a caption row still points at its image
    assert TASKS["i2v"].carries == {"image", "video"}
    assert TASKS["t2i"].carries == {"image"}

