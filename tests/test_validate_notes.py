"""`lance-ray validate`: notes on a valid job file (sizes the run floors, hub ids named like local folders) and
local model directories checked at the right level, each at the `file:line:col` of the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lance_ray.cli import main
from lance_ray.spec import load_job_text

T2I_JOB = """\
name: sizes
defaults:
  width: 330
steps:
  - name: square
    task: t2i
    input: {rows: [{prompt: a fox}]}
    params: {height: 500, width: 512}
  - name: wide
    task: t2v
    input: {rows: [{prompt: a fox}]}
"""


def test_validate_notes_every_size_the_run_floors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(T2I_JOB)
    assert main(["validate", str(job)]) == 0
    captured = capsys.readouterr()
    assert f"{job}: ok" in captured.out
    # The step's own height, and the job default width that both steps take (noted once, where it is written).
    assert captured.err.splitlines() == [
        f"{job}:3:10: note: width 330 is floored to 320 (multiple of 16), as the official script does",
        f"{job}:8:22: note: height 500 is floored to 496 (multiple of 16), as the official script does",
    ]
    # ... and the run uses (and records) the floored sizes.
    parsed = load_job_text(T2I_JOB, "job.yaml", tmp_path)
    assert [(s.params_for(parsed).height, s.params_for(parsed).width) for s in parsed.steps] == [(496, 512),
                                                                                                  (480, 320)]


def _model_job(tmp_path: Path, source: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text("name: models\nmodels:\n  image: {source: " + json.dumps(source) + "}\n"
                   "steps:\n  - name: a\n    task: t2i\n    input: {rows: [{prompt: a fox}]}\n")
    return job


@pytest.mark.parametrize(("where", "hint"), [("Lance_3B", "this is Lance_3B/ itself, inside the checkpoint: use {root}"),
                                             ("Qwen2.5-VL-ViT", "beside Lance_3B/, inside the checkpoint: use {root}"),
                                             ("..", "it holds the checkpoint one level down ({name}/Lance_3B/): "
                                                    "use {root}")])
def test_validate_rejects_a_model_directory_at_the_wrong_level(
        where: str, hint: str, tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    source = (tiny_ckpt / where).resolve()
    job = _model_job(tmp_path, str(source))
    assert main(["validate", str(job)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{job}:3:19: models.image.source: not a Lance checkpoint directory: no Lance_3B/")
    assert line.endswith(hint.format(root=tiny_ckpt, name=tiny_ckpt.name))
    assert main(["validate", str(_model_job(tmp_path, str(tiny_ckpt)))]) == 0  # the root itself is fine


def test_validate_leaves_a_directory_it_cannot_see_to_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A job submitted to a cluster may name a checkpoint directory that exists only there."""
    assert main(["validate", str(_model_job(tmp_path, "/models/on/the/cluster"))]) == 0
    assert capsys.readouterr().err == ""


def test_validate_warns_when_a_hub_id_is_also_a_local_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "acme" / "lance").mkdir(parents=True)
    job = _model_job(tmp_path, "acme/lance")
    assert main(["validate", str(job)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"{job}:3:19: warning: acme/lance is read as a Hugging Face repo id, but there is a folder of that name "
        "here; write ./acme/lance for the folder"]
