"""Scaling over GPUs of one host through `lance-ray run`: the same job on 1 GPU and on N, side by side.

    python -m benchmarks.bench_scaling --gpus 2 --out results/ [--tasks t2i,x2t] [--two-nodes] [--tiny]

Per task (t2i 768²; x2t_image captions over bench_captions' mixed set: four sizes, per-row max_new_tokens) the job runs with `resources.gpus` = 1, then = N,
each in its own `lance-ray run` (a fresh local Ray with N GPUs). Reported: steady rows/s (rows committed
between 20% and 80% of all rows: start-up, checkpoint load and the pipeline's fill and drain are left
out; bench_captions.steady_window), the ratio to one GPU, GPU busy % of every GPU during the steady window, and how long after the
command started each GPU first became busy (all GPUs should start within one checkpoint load of each other).
`--two-nodes` also starts two Ray nodes on this host (`ray start`, one GPU each) and submits the caption job
to the head with `lance-ray submit --follow`, then checks the output holds every row exactly once.
Random weights at the real Lance_3B shapes (benchmarks/realshape.py); `--tiny` is a CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_captions import mixed_sizes, steady_window, watched_run, write_images


def run_case(work: Path, name: str, job_text: str, gpus: int, address: str | None = None) -> dict:

    job = work / f"{name}.yaml"
    job.write_text(job_text)
    out = work / f"out-{name}"
    command = [sys.executable, "-m", "lance_ray.cli", "run", str(job), "--no-progress"]
    if address:
        command += ["--address", address]
    _, sampler, started, ended, times, counts = watched_run(command, out, name)
    steady, window_start, window_end = steady_window(times, counts)
    per_gpu = {}
    for index in sorted({s[1] for s in sampler.samples}):
        samples = [s for s in sampler.samples if s[1] == index]
        busy_at = next((s[0] - started for s in samples if s[2] >= 50), None)
        window = [s[2] for s in samples if window_start <= s[0] <= window_end]
        per_gpu[index] = {"busy_pct_steady": round(float(np.mean(window)), 1) if window else None,
                          "first_busy_s": round(busy_at, 1) if busy_at is not None else None}
    firsts = [g["first_busy_s"] for g in per_gpu.values() if g["first_busy_s"] is not None]
    return {"gpus": gpus, "rows": int(counts.sum()), "wall_s": round(ended - started, 1),
            "first_row_s": round(float(times[0] - started), 1), "steady_rows_per_s": round(float(steady), 3),
            "per_gpu": per_gpu, "all_gpus_busy_after_s": max(firsts) if len(firsts) == len(per_gpu) and firsts else None,
            "busy_spread_s": round(max(firsts) - min(firsts), 1) if firsts else None}


def job_text(task: str, name: str, ckpt: str, source: Path, out: Path, gpus: int, batch: int, tiny: bool) -> str:
    precision = "float32" if tiny else "bfloat16"
    size = 64 if tiny else 768
    if task == "t2i":
        step = (f"task: t2i\n    input: {{path: {source}}}\n"
                f"    params: {{height: {size}, width: {size}{', steps: 2' if tiny else ''}}}")
    else:
        step = (f"task: x2t_image\n    input: {{path: {source}, prompt: \"Describe this in detail.\"}}\n"
                f"    params: {{max_new_tokens: {8 if tiny else 128}{', preset: image_256res' if tiny else ''}}}")
    return f"""name: {name}
models:
  image: {{source: {ckpt}, precision: {precision}}}
output: {out}
steps:
  - name: rows
    {step}
    resources: {{gpus: {gpus}, batch_size: {batch}}}
"""


def two_nodes(work: Path, ckpt: str, images: Path, tiny: bool) -> dict:
    """Two Ray nodes on this host, one GPU each (`ray start --block` in their own process groups, stopped by
    killing those groups: `ray stop` would stop every Ray on the machine), and the caption job submitted to
    the head through the Jobs API."""
    import signal

    import pyarrow.dataset as pads

    ray = str(Path(sys.executable).parent / "ray")
    temp = Path("/tmp/lr2n")
    temp.mkdir(exist_ok=True)
    # The submitted job runs `lance-ray run`: where lance-ray is importable but not installed, put a launcher
    # on the nodes' PATH.
    launcher = work / "bin" / "lance-ray"
    launcher.parent.mkdir(exist_ok=True)
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} -m lance_ray.cli \"$@\"\n")
    launcher.chmod(0o755)
    path = f"{launcher.parent}:{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(temp), "PATH": path}
    def ports() -> list[str]:  # each node's agent and metrics ports, free ones (other Rays may be running)
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]

    common = ["--block", "--num-gpus=1", "--num-cpus=8", "--disable-usage-stats"]
    nodes = [
        subprocess.Popen([ray, "start", "--head", "--port=6390", f"--temp-dir={temp}", "--include-dashboard=true",
                          "--dashboard-host=127.0.0.1", "--dashboard-port=8290",
                          f"--ray-client-server-port={_free_port()}", *ports(), *common],
                         env={**env, "CUDA_VISIBLE_DEVICES": "0"}, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        _wait_http("http://127.0.0.1:8290/api/version", 120)
        nodes.append(subprocess.Popen([ray, "start", "--address=127.0.0.1:6390", "--node-manager-port=6391",
                                       "--object-manager-port=6392", "--min-worker-port=21000",
                                       "--max-worker-port=21999", *ports(), *common],
                                      env={**env, "CUDA_VISIBLE_DEVICES": "1"}, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # logs: the session dir
        _wait_nodes(2, 120)
        out = work / "out-two-nodes"
        job = work / "twonodes.yaml"
        job.write_text(job_text("x2t", "twonodes", ckpt, images, out, 2, 8 if tiny else 64, tiny))
        started = time.time()
        for _ in range(30):  # the head's job agent comes up a little after its dashboard
            proc = subprocess.run([sys.executable, "-m", "lance_ray.cli", "submit", str(job), "--address",
                                   "http://127.0.0.1:8290", "--follow"], capture_output=True, text=True, env=env)
            if "No available agent" not in proc.stdout + proc.stderr:
                break
            time.sleep(2)
        tail = proc.stdout[-600:] + proc.stderr[-600:]
        if not (out / "rows").exists():
            return {"exit": proc.returncode, "rows": 0, "tail": tail}
        table = pads.dataset(str(out / "rows"), format="parquet").to_table(columns=["row_id", "error"])
        ids = table.column("row_id").to_pylist()
        return {"exit": proc.returncode, "wall_s": round(time.time() - started, 1), "rows": len(ids),
                "unique_rows": len(set(ids)), "errors": sum(e is not None for e in table.column("error").to_pylist()),
                "tail": tail}
    finally:
        for node in reversed(nodes):
            try:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(node.pid, signal.SIGKILL)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def _wait_nodes(count: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", "--address", "127.0.0.1:6390"],
                             capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        if out.stdout.count("node_") >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"{count} Ray nodes did not join in {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--tasks", default="t2i,x2t")
    parser.add_argument("--t2i-rows", type=int, default=64)
    parser.add_argument("--t2i-batch", type=int, default=4, help="t2i batch size (4: enough batches per GPU)")
    parser.add_argument("--x2t-rows", type=int, default=2560)
    parser.add_argument("--two-nodes", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-scaling"))
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        ckpt = "lance-tiny"
    else:
        from benchmarks.realshape import write_checkpoint

        root = work / "ckpt-image"
        if not (root / "Lance_3B" / "llm_config.json").exists():
            t0 = time.perf_counter()
            write_checkpoint(root, "image", with_vae=True, weights_dtype="bfloat16")
            print(f"checkpoint written in {time.perf_counter() - t0:.0f}s", flush=True)
        ckpt = str(root)
    results: dict = {"gpus": args.gpus, "cases": {}}
    for task in args.tasks.split(","):
        rows = (8 if args.tiny else args.t2i_rows) if task == "t2i" else (32 if args.tiny else args.x2t_rows)
        if task == "t2i":
            source = work / "prompts.jsonl"
            source.write_text("".join(json.dumps({"prompt": f"a photo of thing {i}"}) + "\n" for i in range(rows)))
            batch = 2 if args.tiny else args.t2i_batch
        else:
            # The mixed set of bench_captions: four sizes and aspect ratios, each row with its own
            # max_new_tokens (16..256; 2..8 tiny), so captions end at different lengths as real ones do.
            paths = write_images(work / "images-mixed", mixed_sizes(rows, args.tiny))
            rng = np.random.default_rng(0)
            lengths = rng.integers(2, 9, rows) if args.tiny else rng.integers(16, 257, rows)
            source = work / "mixed.jsonl"
            source.write_text("".join(json.dumps({"image": str(p), "max_new_tokens": int(n)}) + "\n"
                                      for p, n in zip(paths, lengths, strict=True)))
            batch = 8 if args.tiny else 64
        runs = []
        for gpus in (1, args.gpus):
            name = f"{task}-{gpus}gpu"
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
            run = run_case(work, name, job_text(task, name, ckpt, source, work / f"out-{name}", gpus, batch,
                                                args.tiny), gpus)
            runs.append(run)
            print(task, run, flush=True)
        one, many = runs
        results["cases"][task] = {"runs": runs, "speedup": round(many["steady_rows_per_s"] / one["steady_rows_per_s"], 3)}
        print(f"{task}: {args.gpus} GPUs = {results['cases'][task]['speedup']}x one GPU", flush=True)
    if args.two_nodes:
        try:
            images = work / "images-mixed"  # the x2t case's images (written here when it did not run)
            write_images(images, mixed_sizes(32 if args.tiny else args.x2t_rows, args.tiny))
            results["two_nodes"] = two_nodes(work, ckpt, images, args.tiny)
        except (TimeoutError, OSError, subprocess.SubprocessError) as exc:  # keep the scaling figures
            results["two_nodes"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("two nodes", results["two_nodes"], flush=True)
    (args.out / "scaling.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
