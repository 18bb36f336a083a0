"""Benchmark suites as inputs (GenEval, DPG-Bench, VBench, GEdit-Bench) from files in their own formats, run
through the real pipeline (debug backend), and `lance-ray export` laying the outputs out for each
evaluator without ever overwriting a file it did not write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lance_ray.cli import main
from lance_ray.io import media
from lance_ray.pipeline.export import RECORD_NAME, export_step, suite_step
from lance_ray.pipeline.runner import run_job
from lance_ray.pipeline.sinks import read_step_output
from lance_ray.pipeline.sources import open_source
from lance_ray.spec import load_job

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "suites"
BENCH = FIXTURES / "benchmarks"
SIDE = 64


def suite_job(tmp_path: Path) -> Path:
    job = tmp_path / "suites.yaml"
    job.write_text(f"""\
name: suites
models:
  image: {{source: lance-tiny, backend: debug}}
  video: {{source: lance-tiny, backend: debug}}
output: {tmp_path / 'out'}
steps:
  - name: geneval
    task: t2i
    input: {{suite: geneval, path: {BENCH / 'image_gen/GenEVAL/GenEVAL.jsonl'}}}
    params: {{height: {SIDE}, width: {SIDE}, seed: 42}}
  - name: dpg
    task: t2i
    input: {{suite: dpg, path: {BENCH / 'image_gen/DPG/DPG.jsonl'}}}
    params: {{height: {SIDE}, width: {SIDE}, seed: 7}}
  - name: vbench
    task: t2v
    input: {{suite: vbench, path: {BENCH / 'video_gen/Vbench/Vbench_recaption.jsonl'}, samples_per_prompt: 2}}
    params: {{height: 32, width: 48, frames: 5, seed: 42}}
  - name: gedit
    task: image_edit
    input: {{suite: gedit, path: {BENCH / 'image_gen/GEdit/GEdit_en.json'}, media_root: {FIXTURES}}}
""")
    return job


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_suite_rows_have_case_ids_prompts_and_per_sample_seeds(tmp_path: Path) -> None:
    job = load_job(suite_job(tmp_path), check_paths=True)
    geneval = list(open_source(job.step("geneval"), job).iter_rows())
    cases = lines(BENCH / "image_gen/GenEVAL/GenEVAL.jsonl")
    assert [r["row_id"] for r in geneval] == [f"{c['index']}-{n}" for c in cases for n in range(4)]
    assert [r["prompt"] for r in geneval] == [c["data"] for c in cases for _ in range(4)]
    assert [r["seed_override"] for r in geneval] == [42 + n for _ in cases for n in range(4)]  # official: seed + n

    vbench = list(open_source(job.step("vbench"), job).iter_rows())
    assert [r["row_id"] for r in vbench] == ["0-0", "0-1", "1-0", "1-1"]  # samples_per_prompt overrides the 5

    gedit = list(open_source(job.step("gedit"), job).iter_rows())
    records = json.loads((BENCH / "image_gen/GEdit/GEdit_en.json").read_text())
    assert [r["row_id"] for r in gedit] == [f"{key}-0" for key in records]  # the JSON key is the case id
    assert [r["prompt"] for r in gedit] == [rec["interleave_array"][0] for rec in records.values()]
    for row, rec in zip(gedit, records.values(), strict=True):
        assert row["image"] == str((FIXTURES / rec["interleave_array"][1]).resolve())  # relative to media_root
        assert media.decode_image(row["image"]).shape == (48, 64, 3)


def test_suites_in_the_benchmarks_own_formats(tmp_path: Path) -> None:
    """GenEval's evaluation_metadata.jsonl has no index (cases are numbered by line); VBench's
    VBench_full_info.json is a JSON array with `prompt_en`."""
    job = tmp_path / "own.yaml"
    job.write_text(f"""\
name: own
steps:
  - name: geneval
    task: t2i
    input: {{suite: geneval, path: {FIXTURES / 'own/evaluation_metadata.jsonl'}, samples_per_prompt: 1}}
  - name: vbench
    task: t2v
    input: {{suite: vbench, path: {FIXTURES / 'own/VBench_full_info.json'}, samples_per_prompt: 1}}
""")
    loaded = load_job(job, check_paths=True)
    geneval = list(open_source(loaded.step("geneval"), loaded).iter_rows())
    metadata = lines(FIXTURES / "own/evaluation_metadata.jsonl")
    assert [(r["row_id"], r["prompt"]) for r in geneval] == [(f"{i}-0", m["prompt"]) for i, m in enumerate(metadata)]
    vbench = list(open_source(loaded.step("vbench"), loaded).iter_rows())
    prompts = [case["prompt_en"] for case in json.loads((FIXTURES / "own/VBench_full_info.json").read_text())]
    assert [(r["row_id"], r["prompt"]) for r in vbench] == [(f"{i}-0", p) for i, p in enumerate(prompts)]


def test_suite_job_runs_and_exports_each_evaluators_layout(tmp_path: Path, ray_local: None) -> None:
    job_path = suite_job(tmp_path)
    job = load_job(job_path, check_paths=True)
    summary = run_job(job, progress=False)
    assert {s.name: (s.rows, s.ok, s.failed) for s in summary.steps} == {
        "geneval": (12, 12, 0), "dpg": (12, 12, 0), "vbench": (4, 4, 0), "gedit": (2, 2, 0)}

    # GenEval: <index:05d>/metadata.jsonl (the case's metadata) + samples/<n:04d>.png
    out = tmp_path / "geneval"
    assert main(["export", str(job_path), "--step", "geneval", "--to", str(out)]) == 0
    for case in lines(BENCH / "image_gen/GenEVAL/GenEVAL.jsonl"):
        folder = out / f"{case['index']:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == case["additional_info"]
        samples = sorted(p.name for p in (folder / "samples").iterdir())
        assert samples == ["0000.png", "0001.png", "0002.png", "0003.png"]
        assert media.decode_image(str(folder / "samples" / "0003.png")).shape == (SIDE, SIDE, 3)
    generated = {r["row_id"]: r for r in read_step_output(job.step("geneval").output_path(job)).to_pylist()}
    assert (out / "00001/samples/0002.png").read_bytes() == Path(generated["1-2"]["media_uri"]).read_bytes()

    # DPG-Bench: <index>.png, the 4 samples tiled 2 per row in the evaluator's crop order
    out = tmp_path / "dpg"
    assert main(["export", str(job_path), "--step", "dpg", "--to", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["0.png", "1.png", "10.png"]
    grid = media.decode_image(str(out / "10.png"))
    assert grid.shape == (2 * SIDE, 2 * SIDE, 3)
    dpg_rows = {r["row_id"]: r for r in read_step_output(job.step("dpg").output_path(job)).to_pylist()}
    crops = [(0, 0), (SIDE, 0), (0, SIDE), (SIDE, SIDE)]  # (x, y) of compute_dpg_bench.py's crop tuples
    for n, (x, y) in enumerate(crops):
        np.testing.assert_array_equal(grid[y:y + SIDE, x:x + SIDE], media.decode_image(dpg_rows[f"10-{n}"]["media_uri"]))

    # VBench: <original prompt>-<n>.mp4
    out = tmp_path / "vbench"
    assert main(["export", str(job_path), "--step", "vbench", "--to", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["In a still frame, a stop sign-0.mp4", "In a still frame, a stop sign-1.mp4",
                     "a toilet, frozen in time-0.mp4", "a toilet, frozen in time-1.mp4"]
    assert media.decode_video(str(out / names[0])).shape == (5, 32, 48, 3)

    # GEdit-Bench: fullset/<task_type>/<instruction_language>/<key>.png
    out = tmp_path / "gedit"
    assert main(["export", str(job_path), "--step", "gedit", "--to", str(out)]) == 0
    for case in json.loads((BENCH / "image_gen/GEdit/GEdit_en.json").read_text()).values():
        info = case["additional_info"]
        edited = out / "fullset" / info["task_type"] / info["instruction_language"] / f"{info['key']}.png"
        assert media.decode_image(str(edited)).shape == (48, 64, 3)  # the debug edit keeps the input's size


def test_export_never_overwrites_a_file_it_did_not_write(tmp_path: Path, ray_local: None,
                                                         capsys: pytest.CaptureFixture) -> None:
    job_path = tmp_path / "g.yaml"
    job_path.write_text(f"""\
name: g
models: {{image: {{source: lance-tiny, backend: debug}}}}
output: {tmp_path / 'out'}
steps:
  - name: geneval
    task: t2i
    input: {{suite: geneval, path: {BENCH / 'image_gen/GenEVAL/GenEVAL.jsonl'}, samples_per_prompt: 1}}
    params: {{height: 32, width: 32}}
""")
    job = load_job(job_path)
    run_job(job, progress=False)
    target = tmp_path / "layout"
    (target / "00000" / "samples").mkdir(parents=True)
    theirs = target / "00000" / "samples" / "0000.png"
    theirs.write_bytes(b"the user's own file")
    (target / "notes.txt").write_text("kept")

    assert main(["export", str(job_path), "--to", str(target)]) == 1  # some cases not exported
    out = capsys.readouterr().out
    assert "00000/samples/0000.png: exists and was not written by lance-ray export" in out
    assert theirs.read_bytes() == b"the user's own file" and (target / "notes.txt").read_text() == "kept"
    assert (target / "00001" / "samples" / "0000.png").is_file()

    report = export_step(job, suite_step(job, None), target)  # again: its own files are unchanged
    assert report.written == 0 and report.unchanged == 5 and len(report.problems) == 1

    ours = target / "00001" / "samples" / "0000.png"
    ours.write_bytes(b"edited by hand")  # changed since it was written: no longer the export's to replace
    report = export_step(job, suite_step(job, None), target)
    assert ours.read_bytes() == b"edited by hand" and len(report.problems) == 2

    recorded = json.loads((target / RECORD_NAME).read_text())["files"]
    assert "00000/samples/0000.png" not in recorded and "notes.txt" not in recorded
    shutil.rmtree(target / "00002")  # deleted by the user: written again
    assert export_step(job, suite_step(job, None), target).written == 2


def test_suite_mistakes_fail_validation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shutil.copy(BENCH / "image_gen/GenEVAL/GenEVAL.jsonl", tmp_path / "geneval.jsonl")
    job = tmp_path / "bad.yaml"
    job.write_text("""\
name: bad
steps:
  - name: wrong_task
    task: t2v
    input: {suite: geneval, path: geneval.jsonl}
  - name: inline
    task: t2i
    input: {suite: dpg, rows: [{prompt: x}]}
""")
    assert main(["validate", str(job)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{job}:5:20: steps[0].input.suite: suite geneval is a t2i benchmark; this step's task is t2v",
        f"{job}:8:13: steps[1].input.suite: suite dpg reads the benchmark's prompt file: give it as input.path (not rows)",
    ]
