"""Hostile media: each kind decodes correctly or fails with a clear MediaError, alone and inside a job.

The job runs the real Lance code on the tiny checkpoint over a folder holding every kind at once
(FIFOs and a symlink loop included): every file must come back as one output row, ok or with a
one-line error, and the run must finish.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile_media import MediaCase, write_hostile_media

from lance_ray.io.media import MediaError, decode_image, decode_video, probe_video
from lance_ray.models.lance import sample_frame_indices
from lance_ray.pipeline.runner import run_job
from lance_ray.pipeline.sinks import read_step_output
from lance_ray.spec import load_job_text


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[MediaCase]]:
    folder = tmp_path_factory.mktemp("hostile") / "media"
    return folder, write_hostile_media(folder)


def _decode(case: MediaCase, path: Path):
    if case.kind == "image":
        return decode_image(str(path))
    info = probe_video(str(path))
    decode_video(str(path), sample_frame_indices(info.num_frames, info.fps))  # what the worker decodes
    return decode_video(str(path))


def _outcome(case: MediaCase, path: Path) -> str | None:
    """None when the case behaves as it must, else what went wrong."""
    try:
        decoded = _decode(case, path)
    except MediaError as error:
        message = str(error)
        if case.error is None:
            return f"should decode, got MediaError: {message}"
        if case.error not in message or str(path) not in message or "\n" in message:
            return f"expected a one-line error naming the file with {case.error!r}, got: {message}"
        return None
    if case.error is not None:
        return f"should fail with {case.error!r}, decoded {decoded.shape}"
    try:
        if case.pixels is not None:
            case.pixels(decoded)
    except AssertionError as error:
        return f"decoded wrongly: {error}"
    return None


def test_each_hostile_kind_decodes_correctly_or_fails_clearly(hostile_folder) -> None:
    folder, cases = hostile_folder
    assert len(cases) >= 15 and {c.kind for c in cases} == {"image", "video"}
    problems = {c.name: _outcome(c, folder / c.name) for c in cases}
    assert {name: p for name, p in problems.items() if p} == {}


@pytest.mark.usefixtures("ray_local")
def test_a_job_over_a_folder_of_hostile_media_writes_every_row(hostile_folder, tiny_ckpt, tmp_path) -> None:
    folder, cases = hostile_folder
    job = load_job_text(f"""
name: hostile-media
models:
  image: {{source: {tiny_ckpt}, precision: float32}}
  video: {{source: {tiny_ckpt}, precision: float32}}
output: {tmp_path / 'out'}
steps:
  - {{name: images, task: x2t_image, input: {{path: {folder}, format: images}},
     params: {{preset: image_256res, max_new_tokens: 2}}, resources: {{batch_size: 4}}}}
  - {{name: videos, task: x2t_video, input: {{path: {folder}, format: videos}},
     params: {{preset: video_192p, max_new_tokens: 2}}, resources: {{batch_size: 2}}}}
""", "hostile.yaml", tmp_path)
    summary = run_job(job, progress=False)

    expected = {c.name: c for c in cases}
    # Listing a folder keeps regular files only (io/tables.py): the FIFO and the symlink loop are not
    # inputs at all (a row that names one gets an error: test_each_hostile_kind_... and test_bounded_rows).
    not_files = {"folder.png", "fifo.png", "fifo.mp4", "loop_a.png"}
    listed = {"images": {n for n, c in expected.items() if c.kind == "image" and n not in not_files},
              "videos": {n for n, c in expected.items() if c.kind == "video" and n not in not_files}}
    for step in summary.steps:
        rows = read_step_output(str(tmp_path / "out" / step.name)).to_pylist()
        by_file = {Path(r["image"] or r["video"]).name: r for r in rows}
        assert set(by_file) == listed[step.name] and len(rows) == len(by_file)
        for name, row in by_file.items():
            error = expected[name].error
            if error is None:
                assert row["error"] is None, (name, row["error"])
                assert isinstance(row["text"], str)
            else:
                assert row["error"] is not None and error in row["error"], (name, row["error"])
                assert "Traceback" not in row["error"] and "\n" not in row["error"]
            json.loads(row["params"])
        assert step.ok + step.failed == len(rows)
