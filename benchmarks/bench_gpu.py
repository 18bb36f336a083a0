"""GPU benchmarks of our Lance implementation at the real Lance_3B / Lance_3B_Video shapes (random weights).

    python -m benchmarks.bench_gpu --out results.json [--only load,x2t,x2t_video,t2i,t2v,edit]

Each case prints one line and lands in the JSON: seconds per item, throughput, peak GPU memory, and for
generation the model FLOPs utilisation (counted FLOPs of the backbone forwards / time / the GPU's dense
bf16 peak). The official code's figures on an H100 (../shared/lance/BASELINE.md) are printed beside ours:
t2i 768² 8.41 s/image (≈16% of peak), x2t_image 14.6 tokens/s at batch 1, t2v 49f@480p 46.4 s,
x2t_video 49f@480p out of memory, load 58.6 s with a 28.4 GB peak.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.realshape import configs, random_model, write_checkpoint

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM)
START = time.perf_counter()
TIME_BUDGET_S = 480.0  # stop starting new cases after this (one device call may run 600 s)
_TINY_ROOT: Path | None = None
OFFICIAL = {"load_s": 58.6, "t2i_s_per_image": 8.41, "x2t_tokens_per_s_b1": 14.6, "t2v_s_per_video": 46.4}


def gpu_peak_tflops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), 989.0)


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """Median wall seconds of `fn` (synchronised); warm-ups are the caller's (cheap ones, per case)."""
    result = None
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9


def backbone_flops(query_tokens: int, context_tokens: int) -> float:
    """FLOPs of one backbone forward of `query_tokens` attending to `context_tokens` (incl. themselves)."""
    llm, _ = configs()
    h, i, kv = llm.hidden_size, llm.intermediate_size, llm.num_key_value_heads * llm.head_dim
    linear = 2 * (h * h + 2 * h * kv + h * h + 3 * h * i) * query_tokens
    attention = 4 * query_tokens * context_tokens * h
    return llm.num_hidden_layers * (linear + attention)


def make_pipeline(family: str, root: Path | None = None):
    """A LancePipeline on the GPU with random real-shape weights (no checkpoint file unless `root`)."""
    from lance_ray.models.lance.pipeline import LancePipeline

    if root is not None:
        return LancePipeline.from_pretrained(str(root), family=family, device="cuda", dtype="bfloat16")
    global _TINY_ROOT
    if _TINY_ROOT is None:  # written once per process (the full-size VAE is 2.8 GB)
        from lance_ray.models.lance.tiny import write_tiny_checkpoint

        # The tiny checkpoint provides the tokenizer and a full-size random VAE; the model is swapped for
        # one at the real shapes.
        _TINY_ROOT = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", vae="full")
    pipe = LancePipeline.from_pretrained(str(_TINY_ROOT), family=family, device="cuda", dtype="bfloat16")
    pipe.model = random_model("cuda", torch.bfloat16)
    return pipe


def decode_without_eos() -> None:
    """Random weights may emit <|im_end|> at any step: decode every caption to its full length instead."""
    from lance_ray.models.lance import pipeline

    original = pipeline.generate_text

    def generate_text(*args, **kwargs):
        kwargs["eos_id"] = -1
        return original(*args, **kwargs)

    pipeline.generate_text = generate_text


def bench_load(results: dict, workdir: Path) -> None:
    from lance_ray.models.lance.pipeline import LancePipeline

    start = time.perf_counter()
    root = write_checkpoint(workdir / "ckpt", "image", with_vae=True)
    results["write_checkpoint_s"] = round(time.perf_counter() - start, 1)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe = LancePipeline.from_pretrained(str(root), family="image", device="cuda", dtype="bfloat16")
    load_s = time.perf_counter() - start
    results["load"] = {"seconds": round(load_s, 2), "peak_gpu_gb": round(pipe.load_stats.peak_gpu_bytes / 1e9, 2),
                       "resident_gpu_gb": round(torch.cuda.memory_allocated() / 1e9, 2),
                       "peak_rss_gb": round(pipe.load_stats.peak_rss_bytes / 1e9, 2),
                       "official_s": OFFICIAL["load_s"]}
    print(f"load: {load_s:.1f}s (official {OFFICIAL['load_s']}s), peak GPU {results['load']['peak_gpu_gb']} GB")
    results["_pipe_root"] = str(root)


def bench_x2t(results: dict, pipe, batches: list[int], new_tokens: int = 128) -> None:
    image = np.random.default_rng(0).integers(0, 256, (768, 768, 3), dtype=np.uint8)
    rows = []
    pipe.x2t_image([image], ["warm up"], preset="image_768res", max_new_tokens=4)
    for batch in batches:
        torch.cuda.reset_peak_memory_stats()
        seconds, _ = timed(lambda b=batch: pipe.x2t_image([image] * b, ["Describe the image."] * b,
                                                          preset="image_768res", max_new_tokens=new_tokens))
        row = {"batch": batch, "seconds": round(seconds, 3), "captions_per_s": round(batch / seconds, 2),
               "tokens_per_s": round(batch * new_tokens / seconds, 1), "peak_gpu_gb": round(peak_gb(), 2)}
        row["x_official_rate"] = round(row["tokens_per_s"] / OFFICIAL["x2t_tokens_per_s_b1"], 1)
        rows.append(row)
        print(f"x2t_image b={batch}: {row['captions_per_s']} captions/s, {row['tokens_per_s']} tok/s "
              f"({row['x_official_rate']}x official), peak {row['peak_gpu_gb']} GB")
    results["x2t_image"] = rows


def bench_x2t_video(results: dict, pipe, frame_counts: list[int]) -> None:
    rows = []
    for frames in frame_counts:
        video = np.random.default_rng(1).integers(0, 256, (frames, 480, 848, 3), dtype=np.uint8)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        seconds, _ = timed(lambda v=video: pipe.x2t_video([v], ["Describe the video."], preset="video_480p",
                                                          max_new_tokens=64))
        rows.append({"frames": frames, "seconds": round(seconds, 2), "peak_gpu_gb": round(peak_gb(), 2)})
        print(f"x2t_video 480p {frames} frames: {seconds:.2f}s, peak {peak_gb():.1f} GB (target <= 24 GB)")
    results["x2t_video"] = rows


def bench_generation(results: dict, name: str, run: Callable[[int], object], batches: list[int],
                     tokens: Callable[[int], tuple[int, int, int]], steps: int, cfg_steps: int) -> None:
    """`tokens(batch)` -> (query tokens, context tokens per query, samples); a forward per step and branch."""
    rows = []
    for batch in batches:
        if time.perf_counter() - START > TIME_BUDGET_S:
            print(f"{name} b={batch}: skipped, out of time")
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        seconds, _ = timed(lambda b=batch: run(b))
        query, context, samples = tokens(batch)
        flops = samples * (steps + cfg_steps) * backbone_flops(query, context)
        mfu = flops / seconds / (gpu_peak_tflops() * 1e12)
        rows.append({"batch": batch, "seconds": round(seconds, 2), "s_per_item": round(seconds / batch, 3),
                     "mfu": round(mfu, 3), "peak_gpu_gb": round(peak_gb(), 2)})
        print(f"{name} b={batch}: {seconds / batch:.2f} s/item, MFU {mfu:.1%}, peak {peak_gb():.1f} GB")
    results[name] = rows


def bench_peak(results: dict, name: str, run: Callable[[], object]) -> None:
    """Peak memory of one call (run with few steps: memory does not grow with the step count)."""
    if time.perf_counter() - START > TIME_BUDGET_S:
        print(f"{name}: skipped, out of time")
        return
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds, _ = timed(run)
    results[name] = {"seconds": round(seconds, 2), "peak_gpu_gb": round(peak_gb(), 2)}
    print(f"{name}: {seconds:.1f}s, peak {peak_gb():.1f} GB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    parser.add_argument("--only", default="load,x2t,t2i,edit",
                        help="any of load,x2t,t2i,edit (image family) and x2t_video,t2v,video_edit,peaks (video family)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lance-bench")
    args = parser.parse_args()
    only = set(args.only.split(","))
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"GPU: {results['gpu']}")

    def save() -> None:
        args.out.write_text(json.dumps({k: v for k, v in results.items() if not k.startswith("_")}, indent=2))

    if "load" in only:
        bench_load(results, args.workdir)
        save()
    steps, cfg_steps = 30, 26  # CFG runs on 26 of 30 steps with the default interval
    decode_without_eos()
    if only & {"x2t", "t2i", "edit"}:
        pipe = make_pipeline("image")
        pipe.t2i(["warm up"], height=256, width=256, steps=2)
        if "x2t" in only:
            bench_x2t(results, pipe, [1, 8, 32, 64])
            save()
        if "t2i" in only:
            text = 60  # template + prompt tokens of a short prompt
            bench_generation(results, "t2i_768", lambda b: pipe.t2i(["a photo of a cat"] * b, height=768, width=768,
                                                                    seeds=list(range(b))),
                             [1, 4, 8, 16], lambda b: (2306, 2306 + text, b), steps, cfg_steps)
            save()
        if "edit" in only:
            image = np.random.default_rng(2).integers(0, 256, (768, 768, 3), dtype=np.uint8)
            src = 2306 + 1766  # VAE latent + ViT tokens of a 768² source
            bench_generation(results, "image_edit_768",
                             lambda b: pipe.image_edit([image] * b, ["make it blue"] * b, preset="image_768res",
                                                       seeds=list(range(b))),
                             [1, 4], lambda b: (2306, 2306 + src + 60, b), steps, cfg_steps)
            save()
        del pipe
        torch.cuda.empty_cache()
    if only & {"x2t_video", "t2v", "video_edit", "peaks"}:
        pipe = make_pipeline("video")
        pipe.t2v(["warm up"], height=256, width=256, frames=5, steps=2)
        if "x2t_video" in only:
            bench_x2t_video(results, pipe, [49, 121])
            save()
        if "t2v" in only:
            latent = 13 * 30 * 53  # 49 frames at 480x848
            bench_generation(results, "t2v_480p_49f",
                             lambda b: pipe.t2v(["a dog runs on the beach"] * b, height=480, width=848, frames=49,
                                                seeds=list(range(b))),
                             [1], lambda b: (latent + 2, latent + 62, b), steps, cfg_steps)
            save()
        if "video_edit" in only:
            video = np.random.default_rng(3).integers(0, 256, (49, 480, 848, 3), dtype=np.uint8)
            latent = 13 * 30 * 53
            vit = 25 * (464 // 28) * (832 // 28)  # ViT merged tokens: 50 frames / 2, 464x832 bucket / 28
            bench_generation(results, "video_edit_480p_49f",
                             lambda b: pipe.video_edit([video] * b, ["make it snow"] * b, preset="video_480p",
                                                       seeds=list(range(b))),
                             [1], lambda b: (latent + 2, 2 * latent + vit + 62, b), steps, cfg_steps)
            save()
        if "peaks" in only:  # 121 frames at 480p: memory only, two denoising steps
            long_video = np.random.default_rng(4).integers(0, 256, (121, 480, 848, 3), dtype=np.uint8)
            bench_peak(results, "t2v_480p_121f_2steps", lambda: pipe.t2v(["a dog"], height=480, width=848,
                                                                          frames=121, steps=2, seeds=[0]))
            bench_peak(results, "video_edit_480p_121f_2steps",
                       lambda: pipe.video_edit([long_video], ["make it snow"], preset="video_480p", steps=2,
                                               seeds=[0]))
            save()
    save()
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("_")}, indent=2))


if __name__ == "__main__":
    main()
