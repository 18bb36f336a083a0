"""The `lance-ray` command as a user runs it: exit codes, messages, and a run killed mid-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lance_ray.cli import main
from lance_ray.pipeline.runner import SUMMARY_PREFIX
from lance_ray.pipeline.sinks import committed_row_ids, read_step_output

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"


def test_validate_reports_every_problem_with_file_line_col(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps:\n  - name: a\n    task: t3i\n    input: {rows: [{prompt: x}]}\n"
                   "  - name: b\n    task: t2v\n    input: {rows: [{prompt: y}]}\n    params: {frames: 500}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"{bad}:4:11: ") and "t3i" in err[0]
    assert err[1].startswith(f"{bad}:9:22: ") and "121" in err[1]


def test_validate_and_plan_accept_every_shipped_job(capsys: pytest.CaptureFixture) -> None:
    for job in sorted((REPO / "jobs").glob("*.yaml")):
        assert main(["validate", str(job)]) == 0, job
    assert main(["plan", str(REPO / "jobs" / "quickstart.yaml"), "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "group image" in out and "group video" in out and "estimated GPU time" in out


def test_readme_job_examples_are_valid(tmp_path: Path) -> None:
    import re

    from lance_ray.spec import load_job_text

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        assert load_job_text(block, "README.md", tmp_path).steps


def test_missing_local_inputs_fail_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: missing\nsteps:\n  - name: a\n    task: t2i\n    input: {path: prompts.jsonl}\n"
                   "  - name: b\n    task: x2t_image\n    input:\n      path: [images/*.png, s3://bucket/x.png]\n")
    for command in ("validate", "plan", "run"):
        assert main([command, str(job)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith(f"{job}:5:19: ") and "no such file or directory" in err[0]
        assert err[1].startswith(f"{job}:9:14: ") and "matches no files" in err[1]
        assert len(err) == 2  # the s3:// URI is listed when the run reads it, not here


def test_missing_checkpoint_directory_fails_before_ray_starts(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: nomodel\nmodels: {image: {source: ./no/such/checkpoint}}\n"
                   "steps:\n  - {name: a, task: t2i, input: {rows: [{prompt: x}]}}\n")
    assert main(["run", str(job), "--no-progress"]) == 3
    assert "no checkpoint directory at" in capsys.readouterr().err


def test_missing_job_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def _write_job(tmp_path: Path, rows: int, extra_rows: str = "") -> Path:
    prompts = "\n".join(f'{{"id": "r{i:04d}", "prompt": "prompt number {i}"}}' for i in range(rows))
    (tmp_path / "prompts.jsonl").write_text(prompts + "\n" + extra_rows)
    job = tmp_path / "job.yaml"
    job.write_text(f"""
name: clijob
models: {{image: {{source: lance-tiny, backend: debug}}}}
output: {tmp_path / 'out'}
steps:
  - name: gen
    task: t2i
    input: {{path: prompts.jsonl, columns: {{row_id: id}}}}
    params: {{height: 256, width: 256}}
    resources: {{batch_size: 2}}
""")
    return job


def _run_cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lance_ray.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_run_exit_status_and_summary_line(tmp_path: Path) -> None:
    job = _write_job(tmp_path, 3, extra_rows='{"id": "empty", "prompt": ""}\n')
    proc = _run_cli("run", str(job), "--no-progress")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out  # one row failed
    assert "WARNING: the image steps use the DEBUG backend" in out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith(SUMMARY_PREFIX))
                         [len(SUMMARY_PREFIX):])
    assert (summary["steps"][0]["ok"], summary["steps"][0]["failed"]) == (3, 1)
    errors = {r["row_id"]: r["error"] for r in read_step_output(str(tmp_path / "out" / "gen")).to_pylist()}
    assert errors["empty"] and all(errors[f"r{i:04d}"] is None for i in range(3))


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_once(tmp_path: Path) -> None:
    rows = 400
    job = _write_job(tmp_path, rows)
    out_dir = tmp_path / "out" / "gen"
    # A new session: the kill takes the driver and the local Ray it started, as a crash would.
    proc = _run_cli("run", str(job), "--no-progress", start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out_dir.glob("part-*.parquet")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    committed_after_kill = len(committed_row_ids(str(out_dir)))
    assert 0 < committed_after_kill < rows, "the run must be killed mid-way for this test to mean anything"

    proc = _run_cli("run", str(job), "--no-progress")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    table = read_step_output(str(out_dir))
    ids = table.column("row_id").to_pylist()
    assert sorted(ids) == [f"r{i:04d}" for i in range(rows)]
    # Exactly once on disk too, not only after de-duplication: no row id is in two parts.
    import pyarrow.parquet as pq

    on_disk = [rid for part in out_dir.glob("part-*.parquet") for rid in pq.read_table(part).column("row_id").to_pylist()]
    assert len(on_disk) == rows
    media = list((out_dir / "media").glob("*.png"))
    assert len(media) == rows
    assert not list(out_dir.rglob("*.tmp*"))


@pytest.mark.usefixtures("ray_local")
def test_run_fills_run_date_and_run_id_in_output_paths(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    job = tmp_path / "job.yaml"
    job.write_text(f"""
name: dated
models: {{image: {{source: lance-tiny, backend: debug}}}}
output: "{tmp_path}/out/{{run_date}}/{{run_id}}"
steps:
  - {{name: gen, task: t2i, input: {{rows: [{{prompt: a}}]}}, params: {{height: 32, width: 32}}}}
""")
    assert main(["run", str(job), "--no-progress", "--run-id", "nightly-1"]) == 0
    today = datetime.now(timezone.utc).date().isoformat()
    rows = read_step_output(str(tmp_path / "out" / today / "nightly-1" / "gen")).to_pylist()
    assert len(rows) == 1 and rows[0]["error"] is None
