"""Multi-GPU scaling of the whole pipeline: the same t2i job on 1 GPU and on N GPUs, side by side.

    python -m benchmarks.bench_scaling --gpus 2 --rows 48 --out scaling.json

Writes a random real-shape Lance_3B checkpoint (official layout), then runs `lance_ray.pipeline.runner.run_job` with
`resources.gpus` = 1 and = N on one local Ray. Steady-state throughput is counted from the output rows'
own timestamps (first batch start to last batch end), so the one-off checkpoint load is reported apart.
Target: N=2 gives ≥ 1.9× the rows/s of one GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.realshape import write_checkpoint


def steady_rows_per_s(table) -> float:
    rows = table.to_pylist()
    starts = [r["started_at"].timestamp() for r in rows]
    # elapsed_s is the row's share of its batch; a batch ends at start + share * rows of that batch
    per_batch: dict[float, list[float]] = {}
    for r, start in zip(rows, starts, strict=True):
        per_batch.setdefault(start, []).append(r["elapsed_s"])
    ends = [start + sum(shares) for start, shares in per_batch.items()]
    return len(rows) / (max(ends) - min(starts))


def main() -> None:
    import ray

    from lance_ray.pipeline.runner import run_job
    from lance_ray.pipeline.sinks import read_step_output
    from lance_ray.spec import load_job_text

    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--out", type=Path, default=Path("scaling.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lance-scaling-"))
    start = time.perf_counter()
    ckpt = write_checkpoint(work / "ckpt", "image")
    print(f"checkpoint written in {time.perf_counter() - start:.0f}s")
    ray.init(num_gpus=args.gpus, num_cpus=16, include_dashboard=False)
    prompts = ", ".join(f'{{prompt: "prompt {i}"}}' for i in range(args.rows))
    results = {"rows": args.rows, "batch": args.batch, "size": args.size, "runs": []}
    for gpus in (1, args.gpus):
        job = load_job_text(f"""
name: scaling{gpus}
models: {{image: {{source: {ckpt}}}}}
output: {work / f'out{gpus}'}
steps:
  - name: gen
    task: t2i
    input: {{rows: [{prompts}]}}
    params: {{height: {args.size}, width: {args.size}}}
    resources: {{gpus: {gpus}, batch_size: {args.batch}}}
""", f"scaling{gpus}.yaml", work)
        start = time.perf_counter()
        summary = run_job(job, progress=False)
        wall = time.perf_counter() - start
        table = read_step_output(str(work / f"out{gpus}" / "gen"))
        loads = [json.loads(p.read_text()) for p in Path(summary.events_uri).glob("load-*.json")]
        run = {"gpus": gpus, "ok": summary.steps[0].ok, "wall_s": round(wall, 1),
               "steady_rows_per_s": round(steady_rows_per_s(table), 3),
               "load_s": [round(load["load_s"], 1) for load in loads]}
        results["runs"].append(run)
        print(run)
    one, many = results["runs"]
    results["speedup"] = round(many["steady_rows_per_s"] / one["steady_rows_per_s"], 3)
    print(f"{args.gpus} GPUs vs 1: {results['speedup']}x steady-state rows/s (target >= 1.9x)")
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
