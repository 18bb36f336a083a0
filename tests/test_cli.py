"""The `lance-ray` command as a user runs it: exit codes, messages, and a run killed mid-way."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import READY_TIMEOUT_S

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


def test_validate_and_plan_accept_every_shipped_job(capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite jobs read the Lance repository's benchmark files; tests have small ones in their formats.
    monkeypatch.setenv("LANCE_BENCHMARKS", str(REPO / "tests" / "fixtures" / "suites" / "benchmarks"))
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


def test_missing_checkpoint_directory_fails_before_ray_starts(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: nomodel\nmodels: {image: {source: ./no/such/checkpoint}}\n"
                   "steps:\n  - {name: a, task: t2i, input: {rows: [{prompt: x}]}}\n")
    # A subprocess, as a user runs it: pytest's own log handlers would swallow the -v traceback.
    quiet = subprocess.run([sys.executable, "-m", "lance_ray.cli", "run", str(job), "--no-progress"],
                           cwd=REPO, capture_output=True, text=True, timeout=READY_TIMEOUT_S)
    assert quiet.returncode == 3
    (line,) = [line for line in quiet.stderr.splitlines() if "no checkpoint directory at" in line]
    assert line.startswith("lance-ray run: failed: ")
    assert "Traceback" not in quiet.stderr
    verbose = subprocess.run([sys.executable, "-m", "lance_ray.cli", "-v", "run", str(job), "--no-progress"],
                             cwd=REPO, capture_output=True, text=True, timeout=READY_TIMEOUT_S)
    assert verbose.returncode == 3 and "Traceback" in verbose.stderr


def test_missing_job_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


BAD_JOB = "name: bad\nsteps:\n  - name: a\n    task: t3i\n    input: {rows: [{prompt: x}]}\n"


@pytest.mark.parametrize("command", [
    ["validate"], ["plan"], ["run"],
    # Nothing listens at port 9: a bad job file must fail before any network, with 2, not 4.
    ["submit", "--address", "http://127.0.0.1:9"],
    ["schedule", "--once", "--address", "http://127.0.0.1:9"],
])
def test_bad_job_file_exits_2_in_every_command(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               command: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_JOB)
    history = tmp_path / "history.sqlite"
    argv = [command[0], str(bad), *command[1:]]
    if command[0] == "schedule":
        argv += ["--history", str(history)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{bad}:4:11: ") and "t3i" in err[0]
    assert not history.exists()


def test_help_describes_lance_ray_every_command_and_every_exit_code(capsys: pytest.CaptureFixture) -> None:
    from lance_ray.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    assert "ByteDance's Lance model" in top
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    commands = {"validate", "plan", "run", "export", "report", "tiny-checkpoint", "submit", "status", "logs", "stop", "list",
                "schedule"}
    assert set(subparsers.choices) == commands
    for line in ("0    success", "1    the run finished but some rows failed", "2    bad job file",
                 "3    the run itself failed", "4    a Ray cluster", "130  interrupted"):
        assert line in top
    one_line_helps = {action.dest: action.help for action in subparsers._choices_actions}
    for name, parser in subparsers.choices.items():
        assert one_line_helps[name] and "\n" not in one_line_helps[name], name
        assert f"{name} {one_line_helps[name]}" in " ".join(top.split())  # listed in the top-level help
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        shown = capsys.readouterr().out
        description = " ".join(parser.description.split())
        assert len(description) > len(one_line_helps[name]), name  # says more than the one-liner
        assert description in " ".join(shown.split()), name
        assert "exit status:" in shown, name  # every command says how it exits
        if name in ("run", "submit"):
            assert "130  interrupted" in shown, name


def test_errors_map_to_exit_codes_in_one_table(capsys: pytest.CaptureFixture) -> None:
    from lance_ray.cli.exit_codes import run_command
    from lance_ray.errors import ClusterError, InputError, JobFileError, LanceRayError, RunError

    def failing(error: BaseException):
        def command(args: argparse.Namespace) -> int:
            raise error
        return command

    cases = [
        (JobFileError("job.yaml:3:7: no such task"), 2, "job.yaml:3:7: no such task"),
        (InputError("job.yaml: nothing matched"), 2, "job.yaml: nothing matched"),
        (ClusterError("cannot reach http://h:8265"), 4, "lance-ray demo: cannot reach http://h:8265"),
        (RunError("group image died"), 3, "lance-ray demo: failed: RunError: group image died"),
        (LanceRayError("odd"), 3, "lance-ray demo: failed: LanceRayError: odd"),
        (ZeroDivisionError("division by zero"), 3,
         "lance-ray demo: failed: ZeroDivisionError: division by zero"),
        (KeyboardInterrupt(), 130, "lance-ray demo: interrupted; rows committed so far are kept"),
        (KeyboardInterrupt("the run goes on"), 130, "lance-ray demo: interrupted; the run goes on"),
    ]
    for error, code, message in cases:
        assert run_command("demo", failing(error), argparse.Namespace()) == code, error
        assert capsys.readouterr().err.splitlines() == [message]
    assert run_command("demo", lambda args: 1, argparse.Namespace()) == 1  # rows failed: returned, not raised


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
    out, _ = proc.communicate(timeout=READY_TIMEOUT_S)
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
    deadline = time.time() + READY_TIMEOUT_S
    while time.time() < deadline and not list(out_dir.glob("part-*.parquet")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=READY_TIMEOUT_S)
    committed_after_kill = len(committed_row_ids(str(out_dir)))
    assert 0 < committed_after_kill < rows, "the run must be killed mid-way for this test to mean anything"

    proc = _run_cli("run", str(job), "--no-progress")
    out, _ = proc.communicate(timeout=READY_TIMEOUT_S)
    assert proc.returncode == 0, out
    table = read_step_output(str(out_dir))
    ids = table.column("row_id").to_pylist()
    assert sorted(ids) == [f"r{i:04d}" for i in range(rows)]
    # Exactly once on disk too, not only after de-duplication: no row id is in two parts.
    import pyarrow.parquet as pq

    on_disk = [rid for part in out_dir.glob("part-*.parquet") for rid in pq.read_table(part).column("row_id").to_pylist()]
    assert len(on_disk) == rows
    media = list((out_dir / "__media__").glob("*.png"))
    assert len(media) == rows
    assert not list(out_dir.rglob("*.tmp*"))


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_keeps_committed_rows(tmp_path: Path) -> None:
    job = _write_job(tmp_path, 400)
    out_dir = tmp_path / "out" / "gen"
    # Ctrl-C in a terminal signals the whole foreground process group (the driver and the local Ray
    # it started); a session of its own gives the run such a group, apart from pytest's.
    proc = subprocess.Popen([sys.executable, "-m", "lance_ray.cli", "run", str(job), "--no-progress"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + READY_TIMEOUT_S
        while time.time() < deadline and proc.poll() is None and not list(out_dir.glob("part-*.parquet")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=READY_TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of the local Ray outlived the driver
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        "lance-ray run: interrupted; rows committed so far are kept"
    ]
    assert SUMMARY_PREFIX not in out  # it stopped; no summary of a finished run
    assert 0 < len(committed_row_ids(str(out_dir))) < 400


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
