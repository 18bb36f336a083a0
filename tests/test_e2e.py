"""End to end with the real Lance code on the tiny checkpoint, on a real local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lance_ray.io import media
from lance_ray.pipeline.runner import SUMMARY_PREFIX, run_job
from lance_ray.pipeline.sinks import read_manifest, read_step_output
from lance_ray.spec import load_job_text
from lance_ray.spec.rows import OUTPUT_SCHEMA

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"


@pytest.mark.slow
def test_quickstart_from_the_command_line(tmp_path: Path) -> None:
    """The README's quickstart command, with outputs redirected; every output row is checked."""
    proc = subprocess.run(
        [sys.executable, "-m", "lance_ray.cli", "run", "jobs/quickstart.yaml", "--no-progress",
         "--output", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith(SUMMARY_PREFIX))
                         [len(SUMMARY_PREFIX):])
    images = sorted(p for p in (DATASETS / "images").iterdir())
    videos = sorted(p for p in (DATASETS / "videos").iterdir())
    edits = (DATASETS / "edits.jsonl").read_text().strip().splitlines()
    expected = {"caption_images": len(images), "caption_videos": len(videos), "generate_images": 3,
                "edit_images": len(edits)}
    assert {s["name"]: (s["ok"], s["failed"]) for s in summary["steps"]} == {k: (v, 0) for k, v in expected.items()}

    for step, count in expected.items():
        table = read_step_output(str(tmp_path / step))
        assert table.schema.names == OUTPUT_SCHEMA.names
        rows = table.to_pylist()
        assert len(rows) == count == len({r["row_id"] for r in rows})
        manifest = read_manifest(str(tmp_path / step))
        assert manifest["step"] == step
        for row in rows:
            assert row["error"] is None and row["backend"] == "lance" and row["model_id"] == "lance-tiny"
            assert row["seed"] is not None and row["elapsed_s"] > 0
            if step.startswith("caption"):
                assert isinstance(row["text"], str) and row["media_uri"] is None
                assert len(json.loads(row["params"])) > 0
            else:
                pixels = media.decode_image(row["media_uri"])
                assert pixels.shape == (row["height"], row["width"], 3)
    generated = read_step_output(str(tmp_path / "generate_images")).to_pylist()
    assert {(r["height"], r["width"]) for r in generated} == {(64, 96)}
    # Edits keep the source's aspect: the 320x240 source lands in the 4:3 bucket of image_256res.
    sizes = {Path(r["image"]).name: (r["width"], r["height"]) for r in read_step_output(
        str(tmp_path / "edit_images")).to_pylist()}
    assert sizes["sunset_320x240.jpg"] == (304, 224)


@pytest.mark.usefixtures("ray_local")
def test_one_checkpoint_load_per_actor_across_tasks(tmp_path: Path, tiny_ckpt: Path) -> None:
    """t2i + image_edit + x2t_image on 2 actors: the image checkpoint loads exactly twice, counted."""
    image = DATASETS / "images" / "tiles_256x256.png"
    prompts = ", ".join(f'{{prompt: "p{i}"}}' for i in range(4))
    edits = ", ".join(f'{{image: {image}, prompt: "e{i}"}}' for i in range(4))
    job = load_job_text(f"""
name: grouping
models: {{image: {{source: {tiny_ckpt}, precision: float32}}}}
output: {tmp_path / 'out'}
steps:
  - {{name: gen, task: t2i, input: {{rows: [{prompts}]}}, params: {{height: 32, width: 32, steps: 2}},
     resources: {{gpus: 2, batch_size: 1}}}}
  - {{name: edit, task: image_edit, input: {{rows: [{edits}]}}, params: {{preset: image_256res, steps: 2}},
     resources: {{batch_size: 1}}}}
  - {{name: cap, task: x2t_image, input: {{rows: [{edits}]}}, params: {{preset: image_256res, max_new_tokens: 4}},
     resources: {{batch_size: 2}}}}
""", "grouping.yaml", tmp_path)
    summary = run_job(job, progress=False)
    assert [(s.name, s.ok, s.failed) for s in summary.steps] == [("gen", 4, 0), ("edit", 4, 0), ("cap", 4, 0)]
    loads = [json.loads(p.read_text()) for p in Path(summary.events_uri).glob("load-*.json")]
    assert len(loads) == 2
    assert {load["family"] for load in loads} == {"image"} and len({load["pid"] for load in loads}) == 2
    assert all(load["backend"] == "lance" and load["load_s"] > 0 for load in loads)
    served_by = {r["model_id"] for step in ("gen", "edit", "cap")
                 for r in read_step_output(str(tmp_path / "out" / step)).to_pylist()}
    assert served_by == {str(tiny_ckpt)}


@pytest.mark.usefixtures("ray_local")
def test_video_generation_jobs_write_playable_videos(tmp_path: Path, tiny_ckpt: Path) -> None:
    """t2v and i2v through a job file with the real Lance code: MP4/MKV outputs of the official frame counts."""
    image = DATASETS / "images" / "sunset_320x240.jpg"
    job = load_job_text(f"""
name: videos
models: {{video: {{source: {tiny_ckpt}, precision: float32}}}}
output: {tmp_path / 'out'}
steps:
  - {{name: t2v, task: t2v, input: {{rows: [{{prompt: "waves"}}, {{prompt: "a bird"}}]}},
     params: {{height: 64, width: 80, frames: 7, steps: 2, fps: 12}}}}
  - {{name: i2v, task: i2v, input: {{rows: [{{image: {image}, prompt: "it moves"}}]}},
     params: {{preset: video_192p, frames: 5, steps: 2}}, output: {{video_codec: ffv1}}}}
""", "videos.yaml", tmp_path)
    summary = run_job(job, progress=False)
    assert [(s.name, s.ok, s.failed) for s in summary.steps] == [("t2v", 2, 0), ("i2v", 1, 0)]
    for row in read_step_output(str(tmp_path / "out" / "t2v")).to_pylist():
        frames = media.decode_video(row["media_uri"])
        # 7 requested frames -> (7 - 1)//4 + 1 = 2 latent frames -> 4·(2 - 1) + 1 = 5 decoded frames
        assert frames.shape == (5, 64, 80, 3) == (row["frames"], row["height"], row["width"], 3)
        assert row["fps"] == 12 and row["media_uri"].endswith(".mp4")
    (i2v,) = read_step_output(str(tmp_path / "out" / "i2v")).to_pylist()
    frames = media.decode_video(i2v["media_uri"])
    # The first frame's size follows the image's 4:3 bucket of the preset (224x304 for 256² area).
    assert frames.shape == (5, 224, 304, 3) and i2v["media_uri"].endswith(".mkv")


@pytest.mark.usefixtures("ray_local")
def test_caption_rows_end_at_their_own_max_new_tokens(tmp_path: Path, tiny_ckpt: Path) -> None:
    """A `max_new_tokens` input column caps each caption row on its own (the real model, continuous
    batching): the row's params record the cap it was decoded with, the rest use the step's."""
    from lance_ray.models.lance import LancePipeline

    image = DATASETS / "images" / "tiles_256x256.png"
    caps = {"a": 2, "b": 7, "c": None, "d": 1}
    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"id": key, "image": str(image), **({"max_new_tokens": cap} if cap else {})}) + "\n"
        for key, cap in caps.items()))
    job = load_job_text(f"""
name: caps
models: {{image: {{source: {tiny_ckpt}, precision: float32}}}}
output: {tmp_path / 'out'}
steps:
  - {{name: cap, task: x2t_image, input: {{path: rows.jsonl, columns: {{row_id: id}}, prompt: "What is it?"}},
     params: {{preset: image_256res, max_new_tokens: 4}}}}
""", "caps.yaml", tmp_path)
    summary = run_job(job, progress=False)
    assert (summary.steps[0].ok, summary.steps[0].failed) == (4, 0)
    rows = {r["row_id"]: r for r in read_step_output(str(tmp_path / "out" / "cap")).to_pylist()}
    pipe = LancePipeline.from_pretrained(str(tiny_ckpt), family="image", device="cpu", dtype="float32",
                                         understanding_only=True)
    for key, cap in caps.items():
        used = cap or 4
        assert json.loads(rows[key]["params"])["max_new_tokens"] == used
        alone = pipe.x2t_image([media.decode_image(str(image))], ["What is it?"], preset="image_256res",
                               max_new_tokens=used, seeds=[rows[key]["seed"]])[0]
        assert rows[key]["text"] == alone  # the same answer as decoding the row alone with its cap
