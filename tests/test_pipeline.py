"""The Ray Data pipeline on a real local Ray, with the `debug` backend standing in for the model.

These tests isolate the pipeline's own logic (sources → prepare → actors → media → Parquet parts →
resume); test_e2e.py runs the same pipeline with the real Lance code on the tiny checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest

from lance_ray.io import media
from lance_ray.pipeline.runner import run_job
from lance_ray.pipeline.sinks import read_manifest, read_step_output
from lance_ray.spec import load_job_text
from lance_ray.spec.rows import OUTPUT_SCHEMA

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"
pytestmark = pytest.mark.usefixtures("ray_local")


def _job(tmp_path: Path, body: str, name: str = "pipe"):
    text = f"name: {name}\nmodels:\n  image: {{source: lance-tiny, backend: debug}}\n" \
           f"  video: {{source: lance-tiny, backend: debug}}\noutput: {tmp_path / 'out'}\n{body}"
    return load_job_text(text, f"{name}.yaml", tmp_path)


def _rows(tmp_path: Path, step: str) -> list[dict]:
    return read_step_output(str(tmp_path / "out" / step)).to_pylist()


def test_mixed_tasks_write_every_row_with_decodable_media(tmp_path: Path) -> None:
    job = _job(tmp_path, f"""
steps:
  - name: captions
    task: x2t_image
    input: {{path: {DATASETS / 'images'}, prompt: "Describe it."}}
  - name: gen
    task: t2i
    input: {{path: {DATASETS / 'prompts.jsonl'}, columns: {{row_id: id}}, limit: 3}}
    params: {{height: 64, width: 96}}
  - name: clips
    task: t2v
    input: {{rows: [{{prompt: "a wave"}}, {{prompt: "a bird"}}]}}
    params: {{height: 64, width: 80, frames: 9, fps: 12}}
    output: {{video_codec: ffv1}}
""")
    summary = run_job(job, progress=False)
    counts = {s.name: (s.rows, s.ok, s.failed) for s in summary.steps}
    assert counts == {"captions": (6, 6, 0), "gen": (3, 3, 0), "clips": (2, 2, 0)}

    captions = _rows(tmp_path, "captions")
    assert all(r["text"].startswith("[debug backend") and r["error"] is None for r in captions)
    assert {r["backend"] for r in captions} == {"debug"}

    generated = read_step_output(str(tmp_path / "out" / "gen"))
    assert generated.schema.names == OUTPUT_SCHEMA.names
    for row in generated.to_pylist():
        assert row["task"] == "t2i" and json.loads(row["params"])["steps"] == 30
        image = media.decode_image(row["media_uri"])
        assert image.shape == (64, 96, 3) == (row["height"], row["width"], 3)
        assert Path(row["media_uri"]).name == f"{row['row_id']}.png"
    assert sorted(r["row_id"] for r in generated.to_pylist()) == ["p01", "p02", "p03"]

    for row in _rows(tmp_path, "clips"):
        assert row["media_uri"].endswith(".mkv") and row["frames"] == 9 and row["fps"] == 12
        frames = media.decode_video(row["media_uri"])
        assert frames.shape == (9, 64, 80, 3)
    manifest = read_manifest(str(tmp_path / "out" / "clips"))
    assert manifest["task"] == "t2v" and manifest["rows"] == 2


def test_bad_rows_become_error_rows_and_the_job_goes_on(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "truncated.mp4"
    data = (DATASETS / "videos" / "orbit_160x128_12fps.mp4").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    good = DATASETS / "images" / "sunset_320x240.jpg"
    job = _job(tmp_path, f"""
steps:
  - name: captions
    task: x2t_image
    input:
      rows:
        - {{image: {good}, prompt: "ok"}}
        - {{image: {tmp_path / 'missing.png'}, prompt: "missing"}}
        - {{image: {corrupt}, prompt: "corrupt"}}
  - name: vcaps
    task: x2t_video
    input:
      rows:
        - {{video: {DATASETS / 'videos' / 'orbit_160x128_12fps.mp4'}, prompt: "ok"}}
        - {{video: {truncated}, prompt: "truncated"}}
  - name: gen
    task: t2i
    input: {{rows: [{{prompt: "fine"}}, {{prompt: "   "}}]}}
    params: {{height: 32, width: 32}}
""")
    summary = run_job(job, progress=False)
    counts = {s.name: (s.ok, s.failed) for s in summary.steps}
    assert counts == {"captions": (1, 2), "vcaps": (1, 1), "gen": (1, 1)}
    errors = {r["prompt"]: r["error"] for r in _rows(tmp_path, "captions")}
    assert errors["ok"] is None
    assert "missing.png" in errors["missing"]
    assert errors["corrupt"]
    video_errors = {r["prompt"]: r["error"] for r in _rows(tmp_path, "vcaps")}
    assert video_errors["ok"] is None and video_errors["truncated"]
    gen_errors = sorted(r["error"] is None for r in _rows(tmp_path, "gen"))
    assert gen_errors == [False, True]


def test_chain_with_turns_keeps_every_turn_and_feeds_the_next_step(tmp_path: Path) -> None:
    job = _job(tmp_path, """
steps:
  - name: gen
    task: t2i
    input: {rows: [{prompt: "a red house", id: h1}, {prompt: "a blue car", id: c1}], columns: {row_id: id}}
    params: {height: 48, width: 64}
  - name: edit
    task: image_edit
    input: {from_step: gen}
    turns: ["make it night", "add snow", "add a moon"]
  - name: describe
    task: x2t_image
    input: {from_step: edit, prompt: "What is shown?"}
""")
    summary = run_job(job, progress=False)
    assert [(s.name, s.ok, s.failed) for s in summary.steps] == [("gen", 2, 0), ("edit", 2, 0), ("describe", 2, 0)]
    edits = {r["row_id"]: r for r in _rows(tmp_path, "edit")}
    assert set(edits) == {"h1", "c1"}
    for row in edits.values():
        uris = row["turn_media_uris"]
        assert len(uris) == 3 and uris[-1] == row["media_uri"]
        turns = [media.decode_image(uri) for uri in uris]
        assert all(t.shape == (48, 64, 3) for t in turns)
        assert not np.array_equal(turns[0], turns[1])  # each turn is its own output
    described = _rows(tmp_path, "describe")
    assert sorted(r["row_id"] for r in described) == ["c1", "h1"]
    assert {r["image"] for r in described} == {r["media_uri"] for r in edits.values()}


def test_rerun_skips_committed_rows_and_overwrite_starts_clean(tmp_path: Path) -> None:
    body = """
steps:
  - name: gen
    task: t2i
    input: {rows: [{prompt: a}, {prompt: b}, {prompt: c}]}
    params: {height: 32, width: 32}
"""
    first = run_job(_job(tmp_path, body), progress=False)
    assert (first.steps[0].ok, first.steps[0].skipped) == (3, 0)
    again = run_job(_job(tmp_path, body), progress=False)
    assert (again.steps[0].ok, again.steps[0].skipped) == (0, 3)
    clean = run_job(_job(tmp_path, body), progress=False, overwrite=True)
    assert (clean.steps[0].ok, clean.steps[0].skipped) == (3, 0)
    assert len(_rows(tmp_path, "gen")) == 3


def test_failed_rows_are_retried_only_when_asked(tmp_path: Path) -> None:
    late = tmp_path / "late.png"
    body = f"""
steps:
  - name: caps
    task: x2t_image
    input: {{rows: [{{image: {DATASETS / 'images' / 'tiles_256x256.png'}}}, {{image: {late}}}]}}
"""
    first = run_job(_job(tmp_path, body), progress=False)
    assert (first.steps[0].ok, first.steps[0].failed) == (1, 1)
    shutil.copy(DATASETS / "images" / "sunset_320x240.jpg", late)  # the missing file arrives
    plain = run_job(_job(tmp_path, body), progress=False)
    assert (plain.steps[0].ok, plain.steps[0].failed, plain.steps[0].skipped) == (0, 0, 2)
    retried = run_job(_job(tmp_path, body), progress=False, retry_failed=True)
    assert (retried.steps[0].ok, retried.steps[0].failed, retried.steps[0].skipped) == (1, 0, 1)
    rows = _rows(tmp_path, "caps")
    assert len(rows) == 2 and all(r["error"] is None for r in rows)


def test_s3_input_and_output_through_a_real_s3_server(tmp_path: Path, s3_server: str) -> None:
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("lance-in")
    fs.mkdir("lance-out")
    for name in ("sunset_320x240.jpg", "tower_240x320.jpg"):
        fs.put_file(str(DATASETS / "images" / name), f"lance-in/images/{name}")
    local = tmp_path / "local-images"
    local.mkdir()
    shutil.copy(DATASETS / "images" / "tiles_256x256.png", local)
    job = load_job_text(f"""
name: s3job
models: {{image: {{source: lance-tiny, backend: debug}}}}
output: s3://lance-out/run1
steps:
  - name: captions
    task: x2t_image
    input: {{path: "s3://lance-in/images/*.jpg", prompt: "Describe."}}
  - name: edits
    task: image_edit
    input: {{path: {local}, prompt: "make it blue"}}
""", "s3job.yaml", tmp_path)
    summary = run_job(job, progress=False)
    assert [(s.name, s.ok, s.failed) for s in summary.steps] == [("captions", 2, 0), ("edits", 1, 0)]
    captions = read_step_output("s3://lance-out/run1/captions").to_pylist()
    assert sorted(Path(r["image"]).name for r in captions) == ["sunset_320x240.jpg", "tower_240x320.jpg"]
    assert all(r["image"].startswith("s3://") for r in captions)
    edits = read_step_output("s3://lance-out/run1/edits").to_pylist()
    assert edits[0]["media_uri"].startswith("s3://lance-out/run1/edits/__media__/")
    assert media.decode_image(edits[0]["media_uri"]).shape == (256, 256, 3)
    assert read_manifest("s3://lance-out/run1/captions")["rows_ok"] == 2
    assert not [p for p in fs.find("lance-out") if ".tmp" in p]  # no temp objects left behind


def test_a_failing_checkpoint_group_fails_the_run_while_its_sibling_stops(tmp_path: Path) -> None:
    """Two checkpoint groups side by side (as on a 2-GPU machine, here with CPU actors): the video group's
    checkpoint cannot be fetched (offline hub), so the run raises instead of ending 'ok' with the image
    group's rows alone."""
    from lance_ray.errors import RunError
    from lance_ray.pipeline.planner import make_plan, runs_side_by_side
    from lance_ray.pipeline.runner import JobRunner, count_rows

    rows = ", ".join(f"{{prompt: 'p{i}'}}" for i in range(64))
    text = (f"name: sides\nmodels:\n  image: {{source: lance-tiny, backend: debug}}\n"
            f"  video: {{source: nobody/no-such-lance-checkpoint}}\noutput: {tmp_path / 'out'}\nsteps:\n"
            f"  - {{name: many, task: t2i, input: {{rows: [{rows}]}}, params: {{height: 16, width: 16}},"
            f" resources: {{batch_size: 1}}}}\n"
            f"  - {{name: clip, task: t2v, input: {{rows: [{{prompt: a}}]}}}}\n")
    job = load_job_text(text, "sides.yaml", tmp_path)
    plan = make_plan(job, cluster_gpus=2, row_counts=count_rows(job))
    for group in plan.groups:
        group.gpus_per_actor = 0  # CPU actors; the plan still runs both groups at once
    assert runs_side_by_side(plan.waves[0], 2) and len(plan.waves[0].groups) == 2
    with pytest.raises(RunError, match="checkpoint group video failed"):
        JobRunner(job, progress=False).run(plan)


def test_a_hung_model_call_becomes_row_errors_not_a_hung_job(tmp_path: Path) -> None:
    """A row whose model call hangs (the debug backend told to sleep 10 minutes) passes its step's
    timeout: the watchdog records it and restarts the actor, Ray retries the batch, the row is written
    as timed out and the other rows as usual."""
    job = _job(tmp_path, """
steps:
  - name: gen
    task: t2i
    input: {rows: [{prompt: a}, {prompt: "[debug:sleep=600] hangs"}, {prompt: b}, {prompt: c}]}
    params: {height: 16, width: 16}
    resources: {batch_size: 1, timeout_s: 5}
""")
    summary = run_job(job, progress=False)
    assert [(s.ok, s.failed) for s in summary.steps] == [(3, 1)]
    rows = {r["prompt"]: r for r in _rows(tmp_path, "gen")}
    assert "timed out" in rows["[debug:sleep=600] hangs"]["error"]
    assert all(rows[p]["error"] is None for p in "abc")
    assert len(_rows(tmp_path, "gen")) == 4


def test_a_stuck_decode_becomes_a_row_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU stage gives up on a row whose decode runs past the step's timeout; the batch goes on."""
    import threading

    from lance_ray.models.lance import TASKS
    from lance_ray.pipeline import sinks, worker
    from lance_ray.spec import Params
    from lance_ray.spec.rows import PREPARED_SCHEMA, Row, rows_from_table, rows_to_table

    release = threading.Event()
    real = worker.media.decode_image

    def decode(uri: str):
        if "stuck" in uri:
            release.wait()  # a decoder stuck in a C library, until the test lets it go
        return real(uri)

    monkeypatch.setattr(worker.media, "decode_image", decode)
    task = TASKS["image_edit"]
    params = task.resolve(Params())
    ctx = worker.StepContext("edit", task, params, task.settings(params), "/unused",
                             sink=sinks.ParquetSink("/unused", "edit"), timeout_s=1.0)
    image = str(DATASETS / "images" / "tiles_256x256.png")
    rows = [Row("ok", "edit", prompt="p", image=image), Row("stuck", "edit", prompt="p", image=image + "?stuck")]
    out = rows_from_table(worker.prepare_rows(rows_to_table(rows, PREPARED_SCHEMA), {"edit": ctx}))
    assert not release.is_set()  # the batch came back while the decoder was still stuck
    release.set()
    assert out[0].error is None and out[0].pixels is not None
    assert "longer than 1s" in out[1].error


@pytest.mark.parametrize("resize", [True, False])
def test_caption_media_are_resized_in_the_cpu_stage_only_for_a_model_that_takes_them(resize: bool) -> None:
    """The Lance backend takes ViT-sized pixels from the CPU stage; the debug backend never reads pixels,
    so its rows keep the decoded size (a small input is not blown up to the 768 bucket for nothing)."""
    from lance_ray.models.lance import TASKS, resize_for_understanding
    from lance_ray.pipeline import sinks, worker
    from lance_ray.spec import Params
    from lance_ray.spec.rows import PREPARED_SCHEMA, Row, rows_from_table, rows_to_table

    task = TASKS["x2t_image"]
    params = task.resolve(Params())
    ctx = worker.StepContext("cap", task, params, task.settings(params), "/unused",
                             sink=sinks.ParquetSink("/unused", "cap"), resize_for_model=resize)
    image = DATASETS / "images" / "tiles_256x256.png"
    rows = [Row("a", "cap", image=str(image))]
    out = rows_from_table(worker.prepare_rows(rows_to_table(rows, PREPARED_SCHEMA), {"cap": ctx}))
    decoded = worker.media.decode_image(str(image))
    expected = resize_for_understanding(decoded, params.preset) if resize else decoded  # [T, h, w, 3] frames
    assert out[0].error is None and out[0].input_array().shape == expected.shape
