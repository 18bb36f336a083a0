"""Captions per second: the model alone and the whole pipeline through `lance-ray run`, side by side.

    python -m benchmarks.bench_captions --out results/ [--only engine,pipeline,video] [--tiny]

Cases (issue 10), all at real Lance_3B shapes with random weights (written once by benchmarks/realshape.py):
* `uniform`: 512 JPEGs of 768x768, every caption 128 tokens;
* `mixed`: 512 JPEGs, equal parts 512x512, 768x768, 1024x768 and 640x480, each row with its own
  `max_new_tokens` drawn uniformly from 16..256 (an input column: random weights almost never emit
  <|im_end|>, so the per-row cap is what makes captions end at different lengths, as real ones do);
* `video`: 480p (848x480) clips of 49 frames at 12 fps, 128-token captions.

`engine` runs the model alone in this process: requests prepared beforehand (decode, resize, tokenise done),
then answered by one DecodeEngine (continuous batching, slots sized from free memory), and, for
comparison, in static batches of 64 (each batch decodes until its longest row ends). `pipeline` runs
`lance-ray run` on a job file as a user would, samples `nvidia-smi` (GPU busy %, memory) every 100 ms and
watches the output folder for committed parts: captions/s steady (20%..80% of rows, see steady_window), per GPU-hour, time
to the first committed caption, peak GPU memory. JSON per case under --out, a table on stdout.
`--tiny` runs everything on the tiny checkpoint at toy sizes (CPU smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CAPTION_TOKENS = 128


# ----------------------------------------------------------------------------------------- inputs
def _image(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth random picture (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """JPEGs of the given sizes (kept when an earlier run of this script wrote them)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"img{i:05d}.jpg"
        if not path.exists():
            Image.fromarray(_image(i, h, w)).save(path, quality=90)
        paths.append(path)
    return paths


def write_videos(folder: Path, n: int, height: int, width: int, frames: int, fps: int = 12) -> list[Path]:
    from lance_ray.io.media import encode_video

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"clip{i:04d}.mp4"
        if not path.exists():
            base = _image(1000 + i, height, width)
            clip = np.stack([np.roll(base, 4 * t, axis=1) for t in range(frames)])  # a slow pan
            data, _ = encode_video(clip, fps, "h264")
            path.write_bytes(data)
        paths.append(path)
    return paths


def mixed_sizes(n: int, tiny: bool) -> list[tuple[int, int]]:
    kinds = [(64, 64), (96, 96), (96, 128), (72, 96)] if tiny else [(512, 512), (768, 768), (768, 1024), (480, 640)]
    return [kinds[i % 4] for i in range(n)]


# ----------------------------------------------------------------------------------------- engine
def bench_engine(ckpt: str, family: str, media: list[np.ndarray], lengths: list[int], preset: str,
                 device: str, reuse_check: bool = False) -> dict:
    import torch

    from lance_ray.models.lance import TASKS, LancePipeline
    from lance_ray.models.lance.understand import DecodeEngine, answer_all, capacity_for

    task = TASKS["x2t_image" if family == "image" else "x2t_video"]
    pipe = LancePipeline.from_pretrained(ckpt, family=family, device=device, understanding_only=True)
    settings = task.settings_for(preset=preset)
    requests = [pipe.understanding_request(m, "Describe this in detail.", kind=task.input_media, settings=settings,
                                           seed=i, max_new_tokens=n) for i, (m, n) in enumerate(zip(media, lengths,
                                                                                                    strict=True))]
    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def run(engine: DecodeEngine, reqs: list) -> float:
        engine.eos_id = -1  # random weights: decode every row to its own cap, as real captions end at theirs
        sync()
        start = time.perf_counter()
        answer_all(engine, reqs)
        sync()
        return time.perf_counter() - start

    run(pipe.new_engine(requests[:4], max_slots=4), requests[:4])  # warm-up: kernels, graph capture paths
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engine = pipe.new_engine(requests)
    continuous = run(engine, requests)
    out = {"rows": len(requests), "slots": len(engine.slots), "slot_tokens": engine.capacity,
           "continuous_s": round(continuous, 3), "continuous_rows_per_s": round(len(requests) / continuous, 2),
           "tokens_generated": sum(lengths), "tokens_per_s": round(sum(lengths) / continuous, 1),
           "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
           "weights_gb": round(sum(p.numel() * p.element_size() for p in pipe.model.parameters()
                                   if not p.is_meta) / 1e9, 2)}
    del engine
    if reuse_check:  # the same rows, every prompt prefilled in full
        engine = pipe.new_engine(requests)
        engine.reuse_prefix = False
        out["no_prefix_reuse_s"] = round(run(engine, requests), 3)
        del engine
    static = 0.0
    for start in range(0, len(requests), 64):  # the old way: a batch decodes until its longest row ends
        chunk = requests[start:start + 64]
        static += run(DecodeEngine(pipe.model, eos_id=-1, vocab_limit=len(pipe.tokenizer), slots=len(chunk),
                                   capacity=capacity_for(chunk)), chunk)
    out["static64_s"] = round(static, 3)
    out["static64_rows_per_s"] = round(len(requests) / static, 2)
    if cuda and reuse_check:
        print("engine", out, flush=True)
        out["time_split"] = _time_split(pipe, requests)
        out["profile_top_kernels"] = _profile(pipe, requests[:128])
        try:
            out["card_16gb"] = _on_a_smaller_card(pipe, requests[:64], 16e9, run)
        except torch.cuda.OutOfMemoryError as exc:
            out["card_16gb"] = {"error": str(exc)[:300]}
            torch.cuda.empty_cache()
    return out


def _time_split(pipe, requests: list) -> dict:
    """Where the engine's time goes: admissions (ViT + prefill) vs decode windows (synchronised timers)."""
    import torch

    from lance_ray.models.lance.understand import admissible

    engine = pipe.new_engine(requests)
    engine.eos_id = -1
    pending, split = list(requests), {"admit_s": 0.0, "decode_s": 0.0, "admissions": 0, "windows": 0}
    while pending or engine.active:
        n = admissible(engine, pending)
        if n:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.admit(pending[:n])
            torch.cuda.synchronize()
            split["admit_s"] += time.perf_counter() - t0
            split["admissions"] += 1
            pending = pending[n:]
        t0 = time.perf_counter()
        engine.run()  # ends with a host sync
        split["decode_s"] += time.perf_counter() - t0
        split["windows"] += 1
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in split.items()}


def _profile(pipe, requests: list) -> list[dict]:
    """Top CUDA kernels by time over answering `requests` (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lance_ray.models.lance.understand import answer_all

    engine = pipe.new_engine(requests)
    engine.eos_id = -1
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        answer_all(engine, requests)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:30]
    total = sum(e.device_time_total for e in prof.key_averages())
    return [{"kernel": e.key[:120], "calls": e.count, "ms": round(e.device_time_total / 1000, 2),
             "share": round(e.device_time_total / max(total, 1), 3)} for e in events]


def _on_a_smaller_card(pipe, requests: list, card_bytes: float, run) -> dict:
    """The same captions on a card of `card_bytes`: a filler allocation leaves only what such a card would
    have free, the engine sizes its slots from what is free, and the peak is counted without the filler."""
    import torch

    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    used = torch.cuda.memory_allocated()
    filler = torch.empty(int(free - (card_bytes - used) - (1 << 30)), dtype=torch.uint8, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    engine = pipe.new_engine(requests)
    seconds = run(engine, requests)
    peak = torch.cuda.max_memory_allocated() - filler.numel()
    result = {"card_gb": card_bytes / 1e9, "slots": len(engine.slots), "rows_per_s": round(len(requests) / seconds, 2),
              "peak_gb_without_filler": round(peak / 1e9, 2)}
    del engine, filler
    torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------------------- pipeline
def steady_window(times: np.ndarray, counts: np.ndarray, low: float = 0.2, high: float = 0.8) -> tuple[float, float, float]:
    """Rows/s between the parts that complete `low` and `high` of all rows, and that window's bounds.

    Rows commit a whole batch at a time and several batches are in flight per actor (continuous batching), so
    the first part lands only once the pipeline is full and the last ones land together as it drains: a rate
    from the first part to the last counts work done before the first part and overstates the speed (it showed
    one GPU above the model alone and two GPUs at 2.9x one). The middle of the run is the steady state that a
    run of millions of rows lives in; runs need enough batches (>= 5 per actor's in-flight depth) for it.
    """
    cumulative = np.cumsum(counts)
    total = float(cumulative[-1])
    a = int(np.searchsorted(cumulative, low * total))
    b = int(np.searchsorted(cumulative, high * total))
    if b <= a or times[b] <= times[a]:  # too few parts for a middle (toy runs): first part to last
        span = float(times[-1] - times[0])
        rate = (total - counts[0]) / span if span > 0 else float("nan")
        return float(rate), float(times[0]), float(times[-1])
    return float((cumulative[b] - cumulative[a]) / (times[b] - times[a])), float(times[a]), float(times[b])


class GpuSampler(threading.Thread):
    """nvidia-smi every 100 ms: utilisation % and memory used (MiB); and when output parts appear."""

    def __init__(self, watch: Path) -> None:
        super().__init__(daemon=True)
        self.watch, self.samples, self.parts = watch, [], {}
        self.stop = threading.Event()
        self.smi = shutil.which("nvidia-smi")

    def run(self) -> None:
        proc = None
        if self.smi:
            proc = subprocess.Popen([self.smi, "--query-gpu=index,utilization.gpu,memory.used",
                                     "--format=csv,noheader,nounits", "-lms", "100"],
                                    stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        while not self.stop.is_set():
            if self.watch.exists():
                for part in self.watch.rglob("part-*.parquet"):
                    self.parts.setdefault(part.name, time.time())
            time.sleep(0.1)
        if proc:
            proc.terminate()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 3:
                self.samples.append((time.time(), int(fields[0]), float(fields[1]), float(fields[2])))


def watched_run(command: list[str], out: Path, name: str):
    """Run `lance-ray run ...` while a GpuSampler watches the GPUs and `out`; returns (the process, the sampler,
    start and end times, and the committed parts' appearance times and row counts, oldest first)."""
    import pyarrow.parquet as pq

    sampler = GpuSampler(out)
    sampler.start()
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    ended = time.time()
    time.sleep(0.3)
    sampler.stop.set()
    sampler.join()
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{name}: lance-ray run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    parts = sorted((sampler.parts.get(p.name, ended), pq.ParquetFile(p).metadata.num_rows)
                   for p in out.rglob("part-*.parquet"))
    return proc, sampler, started, ended, np.array([t for t, _ in parts]), np.array([n for _, n in parts])


def bench_pipeline(work: Path, name: str, job_text: str, expected_rows: int) -> dict:

    job = work / f"{name}.yaml"
    job.write_text(job_text)
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh output: a resumed run would skip rows
    proc, sampler, started, ended, times, counts = watched_run(
        [sys.executable, "-m", "lance_ray.cli", "run", str(job), "--no-progress"], out, name)
    total = int(counts.sum())
    # Steady state: the middle of the run (start-up, checkpoint load, the pipeline's fill and drain left out;
    # the first of them is `first_caption_s`).
    steady, window_start, window_end = steady_window(times, counts)
    window = [s for s in sampler.samples if window_start <= s[0] <= window_end]
    busy = [s[2] for s in window]
    result = {"rows": total, "expected_rows": expected_rows, "exit": proc.returncode,
              "wall_s": round(ended - started, 1),
              "first_caption_s": round(float(times[0] - started), 1),
              "steady_captions_per_s": round(float(steady), 2),
              "captions_per_gpu_hour": int(steady * 3600) if np.isfinite(steady) else None,
              "gpu_busy_pct_steady": round(float(np.mean(busy)), 1) if busy else None,
              "peak_gpu_mem_gb": round(max(s[3] for s in sampler.samples) / 1024, 1) if sampler.samples else None,
              "summary_line": next((line for line in proc.stdout.splitlines() if line.startswith("run ")), "")}
    return result


def job_yaml(name: str, ckpt: str, family: str, task: str, input_path: Path, out: Path, batch: int,
             precision: str, extra_params: str = "") -> str:
    return f"""name: {name}
models:
  {family}: {{source: {ckpt}, precision: {precision}}}
output: {out}
steps:
  - name: captions
    task: {task}
    input: {{path: {input_path}, prompt: "Describe this in detail."}}
    params: {{max_new_tokens: {CAPTION_TOKENS}{extra_params}}}
    resources: {{batch_size: {batch}}}
"""


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="engine,pipeline,video")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoint, toy sizes (CPU smoke test)")
    parser.add_argument("--cases", default="uniform,mixed", help="image cases to run")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-captions"))
    args = parser.parse_args()
    only = set(args.only.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rows = 16 if args.tiny else args.rows
    n_videos = 4 if args.tiny else args.videos
    device = "cpu" if args.tiny else "cuda"
    precision = "float32" if args.tiny else "bfloat16"
    image_preset, video_preset = ("image_256res", "video_192p") if args.tiny else ("image_768res", "video_480p")
    if args.tiny:
        ckpt = {"image": "lance-tiny", "video": "lance-tiny"}
    else:
        from benchmarks.realshape import write_checkpoint

        ckpt = {}
        for family in ("image", "video") if "video" in only else ("image",):
            root = work / f"ckpt-{family}"
            if not (root / ("Lance_3B" if family == "image" else "Lance_3B_Video") / "llm_config.json").exists():
                t0 = time.perf_counter()
                write_checkpoint(root, family, with_vae=False, weights_dtype="bfloat16")
                print(f"{family} checkpoint written in {time.perf_counter() - t0:.0f}s", flush=True)
            ckpt[family] = str(root)
    rng = np.random.default_rng(0)
    uniform_size = (96, 96) if args.tiny else (768, 768)
    cases = {"uniform": ([uniform_size] * rows, [CAPTION_TOKENS] * rows),
             "mixed": (mixed_sizes(rows, args.tiny), [int(n) for n in rng.integers(16, 257, rows)])}
    if args.tiny:
        cases["mixed"] = (cases["mixed"][0], [int(n) for n in rng.integers(2, 9, rows)])
    results: dict = {"device": device}
    table = []
    cases = {name: case for name, case in cases.items() if name in args.cases.split(",")}
    for case, (sizes, lengths) in cases.items():
        if "engine" in only:
            media = [_image(i, h, w) for i, (h, w) in enumerate(sizes)]
            r = bench_engine(ckpt["image"], "image", media, lengths, image_preset, device, case == "uniform")
            results[f"engine_{case}"] = r
            table.append((f"model alone, {case}", r["continuous_rows_per_s"], f"static-64 {r['static64_rows_per_s']}"))
            print(case, "engine", r, flush=True)
        if "pipeline" in only:
            folder = work / f"images-{case}"
            paths = write_images(folder, sizes)
            table_path = work / f"{case}.jsonl"
            table_path.write_text("".join(json.dumps({"image": str(p), "max_new_tokens": n}) + "\n"
                                          for p, n in zip(paths, lengths, strict=True)))
            text = job_yaml(f"captions-{case}", ckpt["image"], "image", "x2t_image", table_path,
                            work / f"out-{case}", 8 if args.tiny else 64, precision,
                            f", preset: {image_preset}")
            r = bench_pipeline(work, case, text, rows)
            results[f"pipeline_{case}"] = r
            table.append((f"lance-ray run, {case}", r["steady_captions_per_s"],
                          f"busy {r['gpu_busy_pct_steady']}% first {r['first_caption_s']}s"))
            print(case, "pipeline", r, flush=True)
    if "video" in only:
        h, w, frames = (64, 112, 9) if args.tiny else (480, 848, 49)
        paths = write_videos(work / "videos", n_videos, h, w, frames)
        if "engine" in only:
            from lance_ray.io.media import decode_video, probe_video
            from lance_ray.models.lance import sample_frame_indices

            clips = []
            for p in paths:
                info = probe_video(str(p))
                clips.append(decode_video(str(p), sample_frame_indices(info.num_frames, info.fps)))
            r = bench_engine(ckpt["video"], "video", clips, [CAPTION_TOKENS] * len(clips), video_preset, device)
            results["engine_video"] = r
            table.append(("model alone, video", r["continuous_rows_per_s"], f"static {r['static64_rows_per_s']}"))
            print("video engine", r, flush=True)
        if "pipeline" in only:
            text = job_yaml("captions-video", ckpt["video"], "video", "x2t_video", work / "videos",
                            work / "out-video", 2 if args.tiny else 8, precision, f", preset: {video_preset}")
            r = bench_pipeline(work, "video", text, n_videos)
            results["pipeline_video"] = r
            table.append(("lance-ray run, video", r["steady_captions_per_s"],
                          f"busy {r['gpu_busy_pct_steady']}% first {r['first_caption_s']}s"))
            print("video pipeline", r, flush=True)
    (args.out / "captions.json").write_text(json.dumps(results, indent=2))
    print("\n".join(f"{name:<32} {rate:>8} captions/s   {note}" for name, rate, note in table))


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
