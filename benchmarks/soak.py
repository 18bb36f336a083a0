"""Soak: SIGKILL `lance-ray run` at random moments, run it again each time, and count what was lost or doubled.

    python -m benchmarks.soak --kills 20 --backend debug      --out results/soak_debug.json
    python -m benchmarks.soak --kills 20 --backend lance-tiny --out results/soak_tiny.json

The job: a t2i step over a JSONL of prompts (a few of them empty, so those rows fail every time) and an
x2t step reading the t2i step's images (`from_step`). Every cycle starts `lance-ray run` in a session
of its own and kills that whole session (the driver and the local Ray it started) with SIGKILL at a
random moment between the start and the time an uninterrupted run takes; every other re-run adds
`--retry-failed`, so superseded parts are replaced while runs are being killed. After each kill the
committed parts must all parse (no partial part is ever visible). At the end one run goes through,
and then: every input row exactly once in each step (read with pandas, as a user would), the failing
rows failed, a manifest per step, no temp files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {
    "debug": "{source: lance-tiny, backend: debug}",
    "lance-tiny": "{source: lance-tiny, precision: float32, device: cpu}",
}


def write_job(root: Path, backend: str, rows: int, failing: int) -> Path:
    lines = [json.dumps({"id": f"r{i:04d}", "prompt": f"prompt number {i}"}) for i in range(rows)]
    lines += [json.dumps({"id": f"bad{i}", "prompt": ""}) for i in range(failing)]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    size, steps = (64, 30) if backend == "debug" else (32, 2)
    job = root / "soak.yaml"
    job.write_text(f"""
name: soak
models: {{image: {BACKENDS[backend]}}}
output: {root / 'out'}
steps:
  - name: gen
    task: t2i
    input: {{path: prompts.jsonl, columns: {{row_id: id}}}}
    params: {{height: {size}, width: {size}, steps: {steps}}}
    resources: {{batch_size: 4}}
  - name: cap
    task: x2t_image
    input: {{from_step: gen, prompt: "Describe it."}}
    params: {{preset: image_256res, max_new_tokens: 4}}
    resources: {{batch_size: 4}}
""")
    return job


def start_run(job: Path, retry_failed: bool, env: dict[str, str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "lance_ray.cli", "run", str(job), "--no-progress"]
    if retry_failed:
        args.append("--retry-failed")
    # A session of its own: the kill takes the driver and every Ray process it started, as a crash would.
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline:  # Ray's processes of that session are gone too before the next run
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def unreadable_parts(out: Path) -> int:
    bad = 0
    for part in out.rglob("part-*.parquet"):
        try:
            pq.read_metadata(part)
        except Exception:
            bad += 1
    return bad


def check(out: Path, rows: int, failing: int) -> dict:
    expected = {f"r{i:04d}" for i in range(rows)} | {f"bad{i}" for i in range(failing)}
    result: dict = {}
    for step, ids in (("gen", expected), ("cap", {i for i in expected if i.startswith("r")})):
        if not list((out / step).glob("part-*.parquet")):
            result[step] = {"rows": 0, "lost": len(ids)}
            continue
        table = pd.read_parquet(out / step)
        seen = list(table["row_id"])
        failed = set(table.loc[table["error"].notna(), "row_id"])
        result[step] = {
            "rows": len(seen),
            "lost": len(ids - set(seen)),
            "duplicated": len(seen) - len(set(seen)),
            "unexpected": len(set(seen) - ids),
            "failed_as_expected": failed == {i for i in ids if i.startswith("bad")},
            "manifest": (out / step / "__lance_ray__" / "manifest.json").exists(),
        }
    result["temp_files"] = sum(1 for p in out.rglob("*") if ".tmp-" in p.name)
    return result


def soak(kills: int, backend: str = "debug", rows: int = 120, failing: int = 3, seed: int = 0,
         root: Path | None = None) -> dict:
    rng = random.Random(seed)
    root = root or Path(tempfile.mkdtemp(prefix=f"soak-{backend}-"))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.time()

    # An uninterrupted run first (in a scratch folder) gives the span the kills are drawn from.
    scratch = root / "scratch"
    scratch.mkdir(parents=True)
    proc = start_run(write_job(scratch, backend, rows, failing), False, env)
    t0 = time.time()
    _, err = proc.communicate(timeout=1800)
    full_run_s = time.time() - t0
    print(f"uninterrupted run: {full_run_s:.1f}s", file=sys.stderr, flush=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"the uninterrupted run failed ({proc.returncode}):\n{err[-3000:]}")

    job = write_job(root, backend, rows, failing)
    out = root / "out"
    kill_log: list[dict] = []
    finished_early: list[dict] = []
    runs = torn = 0
    while len(kill_log) < kills:
        retry = runs % 2 == 1
        delay = rng.uniform(0.0, full_run_s)
        proc = start_run(job, retry, env)
        runs += 1
        try:
            _, err = proc.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
        else:  # it ended before its kill: note how, and start over from an empty output
            finished_early.append({"exit": proc.returncode, "stderr_tail": err[-1500:] if proc.returncode > 1 else ""})
            shutil.rmtree(out, ignore_errors=True)
            continue
        committed_before = sum(1 for _ in out.rglob("part-*.parquet"))
        kill_session(proc)
        torn += unreadable_parts(out)
        kill_log.append({"after_s": round(delay, 2), "retry_failed": retry, "parts_at_kill": committed_before})
        print(f"kill {len(kill_log)}/{kills} after {delay:.1f}s ({committed_before} parts)", file=sys.stderr, flush=True)

    final_exits, err = [], ""
    for _ in range(3):  # the final run must go through; a run that fails to start Ray is tried again
        proc = start_run(job, False, env)
        _, err = proc.communicate(timeout=1800)
        final_exits.append(proc.returncode)
        if proc.returncode in (0, 1):
            break
    return {
        "backend": backend, "rows": rows + failing, "failing_rows": failing, "seed": seed,
        "uninterrupted_run_s": round(full_run_s, 1), "kills": len(kill_log), "runs_started": runs + 1,
        "runs_that_ended_before_their_kill": finished_early, "unreadable_parts_after_kills": torn,
        "final_exits": final_exits, "check": check(out, rows, failing), "wall_s": round(time.time() - started, 1),
        "kill_log": kill_log, "final_stderr_tail": err[-2000:] if final_exits[-1] not in (0, 1) else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="debug")
    parser.add_argument("--rows", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args()
    result = soak(args.kills, args.backend, args.rows, seed=args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
