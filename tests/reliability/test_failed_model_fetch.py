"""A job whose model cannot be fetched: one clear line and exit 3, not Ray's actor tracebacks; -v keeps them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from lance_ray.cli.exit_codes import describe_failure, error_message
from lance_ray.errors import RunError
from lance_ray.pipeline.runner import run_job
from lance_ray.spec import load_job_text

IMAGES = REPO_ROOT / "datasets" / "images"
MESSAGE = "failed: a Lance model worker could not load its checkpoint: LocalEntryNotFoundError: "


def _job(folder: Path) -> Path:
    job = folder / "offline.yaml"
    job.write_text(f"name: offline\nmodels: {{image: someone/not-downloaded}}\noutput: {folder / 'out'}\n"
                   f"steps:\n  - {{name: s, task: x2t_image, input: {{path: {IMAGES}, prompt: Describe.}}}}\n")
    return job


@pytest.mark.usefixtures("ray_local")
def test_an_actor_that_cannot_load_its_checkpoint_is_described_in_one_line(tmp_path: Path) -> None:
    job = load_job_text(_job(tmp_path).read_text(), "offline.yaml", tmp_path)
    with pytest.raises(Exception) as failure:  # Ray's ActorDiedError, carrying the remote traceback
        run_job(job, progress=False)
    assert len(str(failure.value).splitlines()) > 20  # the remote traceback: what -v prints
    line = error_message("run", failure.value)
    assert line.startswith(f"lance-ray run: {MESSAGE}Cannot find an appropriate cached snapshot")
    assert "\n" not in line and "\x1b" not in line
    wrapped = RunError(f"checkpoint group image failed: {type(failure.value).__name__}: {failure.value}")
    wrapped.__cause__ = failure.value
    assert describe_failure(wrapped).startswith(f"RunError: checkpoint group image failed: {MESSAGE[8:]}")


@pytest.mark.slow
def test_lance_ray_run_prints_one_line_for_it(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "lance_ray.cli", "run", str(_job(tmp_path)), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output[-3000:]
    assert proc.stderr.splitlines()[-1].startswith(f"lance-ray run: {MESSAGE}")
    assert "Traceback" not in output and "ActorDiedError" not in output
    assert len(output.splitlines()) <= 5, output  # Ray's own start-up lines, and ours (was ~500 lines)
