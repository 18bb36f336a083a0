"""Rows through one driver: `lance-ray run` over a large JSONL caption job, on CPU, with the debug backend.

Writes an N-row JSONL (`{"image": "img/<k>.jpg", "question": "... <i>?"}`: every row distinct, the
images a small set of distinct tiny JPEGs), a job file (task x2t_image, `backend: debug`), runs the
real command (`python -m lance_ray.cli run`) as a child process and samples, every `--every` seconds:
the driver's resident memory (/proc/<pid>/status VmRSS of the command's process) and the rows
committed so far (row counts of the step's Parquet parts, read from their footers).

Per row the pipeline does real work: the source parses the line, derives the row's content id and
checks it is unique, the prepare stage opens and decodes the row's JPEG (32×32, Pillow), the debug
backend hashes the row into a labelled text, the finish stage writes the Parquet parts. The images
repeat (8 files), so the page cache, not the disk, serves them: this measures the pipeline, not IO.

Reported: time to the first committed row (from the command's start, Ray start-up included), rows/s
over the run and over its last half ("steady"), peak driver RSS and the driver's CPU per row, and the
machine's 1-minute load average before and after (other work on a shared machine takes CPU from the
run). `--stop-after S` interrupts the run (SIGINT, as Ctrl-C) after S seconds, for inputs too large
to finish (10 M rows).

`--stage-cpu N` instead runs the same job over N rows in this process (`run_job`) and reports each
pipeline stage's CPU time per row, from Ray Data's own per-operator statistics: what the stages cost
whatever else the machine is doing.

    python -m benchmarks.bench_rows --rows 1000 100000 1000000 --out benchmarks/results/rows_cpu.json
    python -m benchmarks.bench_rows --rows 10000000 --stop-after 600 --out benchmarks/results/rows_10m.json
    python -m benchmarks.bench_rows --stage-cpu 20000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DISTINCT_IMAGES = 8


def write_inputs(workdir: Path, rows: int, batch_size: int) -> Path:
    """The JSONL, its images and the job file; returns the job file."""
    images = workdir / "img"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(DISTINCT_IMAGES):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{k}.jpg", quality=85)
    table = workdir / f"rows_{rows}.jsonl"
    if not table.exists():
        with open(table.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            chunk = 100_000
            for start in range(0, rows, chunk):
                f.write("".join(
                    f'{{"image": "img/{i % DISTINCT_IMAGES}.jpg", "question": "What is in picture {i}?"}}\n'
                    for i in range(start, min(start + chunk, rows))
                ))
        table.with_suffix(".tmp").rename(table)
    job = workdir / f"job_{rows}.yaml"
    job.write_text(
        f"name: bench-rows\nmodels:\n  image: {{source: lance-tiny, backend: debug}}\noutput: {workdir / 'out'}\n"
        f"steps:\n  - name: caption\n    task: x2t_image\n    input: {{path: {table.name}}}\n"
        f"    resources: {{batch_size: {batch_size}}}\n"
    )
    return job


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class CommittedRows:
    """Rows committed to a step's output so far (each part's footer read once)."""

    def __init__(self, step_dir: Path) -> None:
        self.step_dir = step_dir
        self.counts: dict[str, int] = {}

    def __call__(self) -> int:
        if self.step_dir.is_dir():
            for entry in os.scandir(self.step_dir):
                if entry.name.startswith("part-") and entry.name.endswith(".parquet") and entry.name not in self.counts:
                    self.counts[entry.name] = pq.read_metadata(entry.path).num_rows
        return sum(self.counts.values())


def run_once(workdir: Path, rows: int, batch_size: int, every: float, stop_after: float | None) -> dict:
    job = write_inputs(workdir, rows, batch_size)
    shutil.rmtree(workdir / "out", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lance_ray.cli", "run", str(job), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    committed = CommittedRows(workdir / "out" / "caption")
    samples: list[tuple[float, int, float | None]] = []  # (seconds since start, rows committed, driver RSS MB)
    driver_cpu = None
    first_row_s = None
    interrupted = False
    while proc.poll() is None:
        time.sleep(every)
        now = time.monotonic() - started
        done = committed()
        samples.append((round(now, 2), done, _rss_mb(proc.pid)))
        driver_cpu = _cpu_s(proc.pid) or driver_cpu
        if first_row_s is None and done:
            first_row_s = round(now, 2)
        if stop_after is not None and now > stop_after and not interrupted:
            proc.send_signal(signal.SIGINT)
            interrupted = True
    output = proc.stdout.read() if proc.stdout else ""
    wall = time.monotonic() - started
    total = committed()
    samples.append((round(wall, 2), total, None))
    rss = [r for _, _, r in samples if r is not None]
    moving = [(t, n) for t, n, _ in samples if n]
    half = moving[len(moving) // 2:]
    steady = (half[-1][1] - half[0][1]) / (half[-1][0] - half[0][0]) if len(half) > 1 and half[-1][0] > half[0][0] else None
    return {
        "rows": rows, "committed": total, "finished": not interrupted and proc.returncode == 0,
        "exit_code": proc.returncode, "wall_s": round(wall, 1), "first_row_s": first_row_s,
        "rows_per_s": round(total / (wall - (first_row_s or 0)), 1) if total else 0.0,
        "steady_rows_per_s": None if steady is None else round(steady, 1),
        "peak_driver_rss_mb": round(max(rss), 1) if rss else None,
        "driver_cpu_us_per_row": round(driver_cpu / total * 1e6, 1) if driver_cpu and total else None,
        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # other work on the machine
        "samples": samples, "tail": output[-1500:],
    }


_OPERATOR = re.compile(r"^Operator \d+ (.+?):", re.M)
_CPU_TOTAL = re.compile(r"Remote cpu time: .*?, ([\d.]+)(us|ms|s) total")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def stage_cpu(workdir: Path, rows: int, batch_size: int) -> dict[str, float]:
    """CPU µs per row of each pipeline operator, from `Dataset.stats()` of an in-process run."""
    from lance_ray.pipeline import runner
    from lance_ray.spec import load_job

    job = load_job(write_inputs(workdir, rows, batch_size))
    shutil.rmtree(workdir / "out", ignore_errors=True)
    stats: list[str] = []
    drain = runner.JobRunner._drain

    def drain_and_keep_stats(self, ds, summaries, label):  # type: ignore[no-untyped-def]
        done = drain(self, ds, summaries, label)
        stats.append(ds.stats())
        return done

    runner.JobRunner._drain = drain_and_keep_stats
    runner.run_job(job, progress=False)
    text = stats[0]
    per_row = {}
    starts = [m.start() for m in _OPERATOR.finditer(text)] + [len(text)]
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        section = text[start:end]
        name = _OPERATOR.match(section).group(1)  # type: ignore[union-attr]
        cpu = _CPU_TOTAL.search(section)
        if cpu:
            per_row[name] = round(float(cpu.group(1)) * _UNIT[cpu.group(2)] / rows * 1e6, 1)
    return per_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--batch", type=int, default=256, help="resources.batch_size of the job (default 256)")
    parser.add_argument("--every", type=float, default=2.0, help="sampling interval, seconds")
    parser.add_argument("--stop-after", type=float, help="interrupt each run after this many seconds")
    parser.add_argument("--workdir", type=Path, help="where inputs and outputs go (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--stage-cpu", type=int, metavar="N", help="report each stage's CPU per row over N rows")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_rows_"))
    if args.stage_cpu:
        print(json.dumps({"rows": args.stage_cpu, "cpu_us_per_row": stage_cpu(workdir, args.stage_cpu, args.batch)}))
        return
    results = []
    for rows in args.rows:
        result = run_once(workdir, rows, args.batch, args.every, args.stop_after)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "tail")}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "batch_size": args.batch,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
