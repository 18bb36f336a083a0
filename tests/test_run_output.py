"""What `lance-ray run` shows a person: no Ray log lines unless -v, progress in committed rows with an ETA
(one plain line per update off a terminal), a summary in job file order with each step's own time and a
few error messages, and a Ray start-up failure retried once, then explained."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from lance_ray.cli.quiet import _LineFilter, is_ray_line, ray_lines_hidden
from lance_ray.errors import ClusterError, RunError
from lance_ray.pipeline.progress import StepProgress
from lance_ray.pipeline.runner import RunSummary, StepSummary, format_summary, init_ray

# Lines as Ray 2.60 printed them in a run before they were filtered (and one Ray forwards from a worker).
RAY_LINES = [
    "2026-11-30 13:24:22,728\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for "
    "this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026-11-30 13:24:34,508\tINFO worker.py:2038 -- Started a local Ray instance.",
    "[2026-11-30 13:24:36,883 E 25350 25350] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(LanceWorker))' has constructor arguments in the object store and max_restarts > 0.",
    "2026-11-30 13:24:36,884\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "(MapWorker(MapBatches(LanceWorker)) pid=4242) some output of an actor",
    "(raylet) [2026-11-30 13:24:40,001 W 1 1] memory_monitor.cc:197: memory usage is high",
]
OURS = [
    "WARNING: the image steps use the DEBUG backend: outputs are synthetic",
    "[0:00:08] gen: 2/6 rows committed, 0.2 rows/s, ETA 0:00:17",
    "lance-ray run: failed: RunError: checkpoint group image failed",
    "Traceback (most recent call last):",
    "2026-11-30 is a date our own text may start with",
]


def test_ray_lines_are_recognised_and_ours_are_not() -> None:
    assert all(is_ray_line(line) for line in RAY_LINES)
    assert not any(is_ray_line(line) for line in OURS)


def test_line_filter_drops_ray_lines_however_the_bytes_arrive() -> None:
    out = io.BytesIO()
    line_filter = _LineFilter(out.write)
    stream = "".join(line + "\n" for pair in zip(OURS, RAY_LINES, strict=False) for line in pair).encode()
    for start in range(0, len(stream), 7):  # in small pieces: a line's start is decided across reads
        line_filter.feed(stream[start : start + 7])
    # A progress bar redrawn with \r, with a C++ line written into the middle of it.
    line_filter.feed(b"\rgen:  33%|##  | 2/6\rgen:  50%|###  | 3/6[2026-11-30 13:24:36,883 E 1 1] core_worker.cc:1: x\n")
    line_filter.flush()
    text = out.getvalue().decode()
    assert text.splitlines()[: len(OURS)] == OURS
    assert not any(ray in text for ray in ("Token authentication", "Started a local Ray", "core_worker",
                                           "Progress bars disabled", "pid=4242"))
    assert text.endswith("\rgen:  33%|##  | 2/6\rgen:  50%|###  | 3/6")


def test_ray_lines_hidden_filters_what_reaches_fd_2(capfd: pytest.CaptureFixture) -> None:
    with ray_lines_hidden():
        os.write(2, (RAY_LINES[2] + "\n").encode())  # as Ray's C++ core worker writes: to fd 2 directly
        print(OURS[0], file=sys.stderr)
        os.write(2, (RAY_LINES[0] + "\n" + OURS[2] + "\n").encode())
    assert capfd.readouterr().err.splitlines() == [OURS[0], OURS[2]]
    with ray_lines_hidden(enabled=False):
        os.write(2, (RAY_LINES[1] + "\n").encode())
    assert capfd.readouterr().err.splitlines() == [RAY_LINES[1]]


def test_progress_off_a_terminal_is_one_line_per_update() -> None:
    stream = io.StringIO()  # not a terminal
    progress = StepProgress({"caption": 10, "draw": 4}, stream=stream, line_interval_s=3600)
    progress.add("caption", 2, 0)  # first update: a line
    progress.add("caption", 3, 1)  # within the interval: none
    progress.add("draw", 4, 0)  # the step is done: always a line
    progress.add("caption", 4, 0)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3
    assert re.fullmatch(r"\[0:00:\d\d\] caption: 2/10 rows committed, [\d.]+ rows/s, ETA (\d+:\d\d:\d\d|\?)",
                        lines[0])
    assert re.fullmatch(r"\[0:00:\d\d\] draw: 4/4 rows committed, [\d.]+ rows/s, done", lines[1])
    assert re.fullmatch(r"\[0:00:\d\d\] caption: 10/10 rows committed \(1 failed\), [\d.]+ rows/s, done", lines[2])


def test_summary_is_in_file_order_with_each_steps_time_and_sample_errors() -> None:
    summary = RunSummary("job", "run-1", elapsed_s=12.0)
    video = StepSummary("watch", "x2t_video", "out/watch", rows=2, ok=2, elapsed_s=4.0)
    image = StepSummary("draw", "t2i", "out/draw", rows=6, ok=1, elapsed_s=10.0)
    for index, error in enumerate(["MediaError: broken.png", "MediaError: broken.png", "ValueError: bad",
                                   "KeyError: x", "OSError: disk"]):
        image.failed += 1
        image.add_error(f"row-{index}", error)
    summary.steps = [image, video]  # groups finish in any order
    summary.order_steps(["watch", "draw"])
    text = format_summary(summary).splitlines()
    assert [line.split()[0] for line in text[2:4]] == ["watch", "draw"]
    assert text[2].split()[-2:] == ["0.50", "4.0s"] and text[3].split()[-2:] == ["0.60", "10.0s"]
    assert text[5:] == ["draw: 5 row(s) failed, for example:", "  row-0: MediaError: broken.png",
                        "  row-2: ValueError: bad", "  row-3: KeyError: x"]


def test_ray_start_failure_is_retried_once_then_explained(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import ray
    from ray.data import DataContext

    context, data_log = DataContext.get_current(), logging.getLogger("ray.data")
    for name in ("enable_progress_bars", "print_on_execution_start"):  # init_ray sets them: restore after
        monkeypatch.setattr(context, name, getattr(context, name))
    monkeypatch.setattr(data_log, "level", data_log.level)
    calls = []

    def flaky_init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1 or fail_always:
            raise Exception("The current node timed out during startup.")  # what Ray raises

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", flaky_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fail_always = False
    with caplog.at_level(logging.WARNING):
        init_ray(None)
    assert len(calls) == 2 and "trying once more" in caplog.text
    assert calls[0]["logging_level"] == logging.ERROR and calls[0]["log_to_driver"] is False

    fail_always, calls[:] = True, []
    with pytest.raises(RunError, match="could not start a local Ray, twice.*timed out during startup.*-v run"):
        init_ray(None, metrics_port=9100)
    assert len(calls) == 2 and calls[0]["_metrics_export_port"] == 9100

    def refused(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("connection refused")

    calls[:] = []
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ClusterError, match="cannot connect to the Ray cluster at ray://head:10001"):
        init_ray("ray://head:10001", verbose=True)
    assert len(calls) == 2 and calls[0]["log_to_driver"] is True and calls[0]["logging_level"] == logging.INFO


def _two_family_job(tmp_path: Path) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"""
name: watched
models:
  image: {{source: lance-tiny, backend: debug}}
  video: {{source: lance-tiny, backend: debug}}
output: {tmp_path / 'out'}
steps:
  - name: draw
    task: t2i
    input: {{rows: [{{prompt: a}}, {{prompt: ""}}, {{prompt: b}}]}}
    params: {{height: 32, width: 32}}
    resources: {{batch_size: 1}}
  - name: watch
    task: x2t_video
    input: {{path: {REPO_ROOT / 'datasets' / 'videos'}, limit: 1}}
  - name: caption
    task: x2t_image
    input: {{rows: [{{prompt: q, image: {REPO_ROOT / 'datasets' / 'images' / 'tiles_256x256.png'}}},
                    {{prompt: q, image: {tmp_path / 'missing.png'}}}]}}
""")
    return job


@pytest.mark.slow
def test_a_run_shows_our_lines_only_and_verbose_shows_rays(tmp_path: Path) -> None:
    job = _two_family_job(tmp_path)
    quiet = subprocess.run([sys.executable, "-m", "lance_ray.cli", "run", str(job)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=900)
    assert quiet.returncode == 1, quiet.stderr[-3000:]
    err = quiet.stderr.splitlines()
    assert not [line for line in err if is_ray_line(line)], quiet.stderr
    for ray_text in ("Started a local Ray", "Token authentication", "Progress bars disabled", "core_worker",
                     "experimental"):
        assert ray_text not in quiet.stderr
    progress = [line for line in err if " rows committed" in line]
    assert {line.split("] ")[1].split(":")[0] for line in progress} == {"draw", "watch", "caption"}
    assert all(line.endswith(", done") or " ETA " in line for line in progress)
    assert "\r" not in quiet.stderr  # not a terminal: one line per update

    table = quiet.stdout.splitlines()
    steps = [line.split()[0] for line in table[2:5]]
    assert steps == ["draw", "watch", "caption"]  # file order, though draw and caption share a group
    assert "draw: 1 row(s) failed:" in table and "caption: 1 row(s) failed:" in table
    # inline rows have content-derived ids: the sample errors are found by their text
    assert any(line.startswith("  ") and ": task t2i needs a non-empty prompt" in line for line in table)
    assert any(line.startswith("  ") and ": MediaError:" in line and "missing.png" in line for line in table)

    verbose = subprocess.run([sys.executable, "-m", "lance_ray.cli", "-v", "run", str(job), "--overwrite",
                              "--no-progress"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert verbose.returncode == 1, verbose.stderr[-3000:]
    assert "Started a local Ray instance" in verbose.stderr
    assert any(is_ray_line(line) for line in verbose.stderr.splitlines())
