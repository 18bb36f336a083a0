"""Generation speed, speed modes, memory and a per-kernel profile, in one run (random weights at real shapes).

    python -m benchmarks.bench_generation --out DIR                  # one GPU, about 7 minutes on an H200
    python -m benchmarks.bench_generation --out DIR --cfg-parallel   # two GPUs: CFG-parallel vs one GPU
    python -m benchmarks.bench_generation --out DIR --tiny           # CPU, tiny shapes: checks the script

One GPU, in order (each case is skipped once `--budget-s` has passed; a failing case is recorded and the
run goes on):
  parity     the exact path on this device against the official outputs of the tiny checkpoint (fp32, bf16)
  t2i        t2i 768² exact, 30 steps, batches 1 / 4 / 16: s/image, MFU, peak memory (+ the memory model's
             prediction and the batch it would pick on a 24 GB card; the VAE decoder's bytes per pixel)
  modes      t2i 768² at batch 8, same seeds: exact, fp8, step_cache 0.05 / 0.15, fp8 + step_cache 0.15:
             s/image and max / mean abs difference from exact of the final latents and the decoded pixels
  profile    one denoising step of t2i 768² at batch 16, CUDA graphs off: top kernels by time
  edit       image_edit 768 at batch 4 and 8
  graphs     t2i 768² batch 1 with CUDA graphs on and off
  t2v        t2v 848x480, 49 frames, exact
  peaks      peak memory of t2v 121 frames (2 steps), with the memory model's prediction
  video_edit video_edit 480p, 49 frames: 5 and 10 steps, extrapolated to 30 (a full run does not fit)
  t2v_modes  t2v 49 frames with fp8, and with step_cache 0.15: time, pixel difference from exact
  mixed      t2i 768² batch 16 with 16 different prompts (padded attention) vs one prompt
  card24     on an emulated 24 GB card: t2i 768² asking for batch 4, and t2v 121 frames (2 steps)
Two GPUs (`--cfg-parallel`): t2i 768² at batch 1 and 4 and t2v 49 frames (10 steps), cfg_parallel off / on.

Writes DIR/generation.json (or generation_cfg_parallel.json), DIR/profile_step.json, and prints a summary.
MFU counts backbone matrix + attention FLOPs (bench_gpu.backbone_flops) over 30 + 26 forwards per sample
(CFG on 26 of 30 steps), against 989 TFLOP/s dense bf16.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

START = time.perf_counter()
PEAK_TFLOPS = 989.0
PROMPTS = [
    "a photo of a cat", "a red fox sitting in fresh snow, morning light",
    "two cats playing chess in a library, warm light, 35mm film, shallow depth of field",
    "a lighthouse on a cliff at dusk", "a bowl of ramen, studio lighting, top view, steam rising",
    "an astronaut riding a horse on the moon", "a watercolour of a harbour with small boats",
    "macro shot of a dew drop on a leaf", "a busy street market in the rain at night, neon signs reflected",
    "a cozy cabin in a snowy forest", "a portrait of an old fisherman, dramatic side light",
    "a bicycle leaning on a brick wall", "isometric illustration of a tiny island with a castle",
    "a glass of orange juice on a wooden table", "a tiger walking through tall grass",
    "a paper boat on a puddle",
]


class Bench:
    """Shared state of a run: the shapes (real or tiny), the pipelines, results and the time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.tiny, self.budget_s, self.out = args.tiny, args.budget_s, args.out
        self.file = "generation_cfg_parallel.json" if args.cfg_parallel else "generation.json"
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.results: dict = {"device": torch.cuda.get_device_name() if self.cuda else "cpu",
                              "gpus": torch.cuda.device_count() if self.cuda else 0,
                              "torch": torch.__version__, "tiny": self.tiny, "cases": {}}
        self.steps = 3 if self.tiny else 30
        self.image_side = 64 if self.tiny else 768
        self.video = (64, 80, 5) if self.tiny else (480, 848, 49)  # height, width, frames
        self.long_frames = 9 if self.tiny else 121
        # How edit sources are resized: the official presets at real shapes, the smallest ones when tiny.
        self.presets = {"image": "image_256res", "video": "video_192p"} if self.tiny else \
            {"image": "image_768res", "video": "video_480p"}
        self.pipes: dict = {}

    # ---- infrastructure ----------------------------------------------------------------------------------
    def case(self, name: str, fn: Callable[[], dict]) -> None:
        if time.perf_counter() - START > self.budget_s:
            self.results["cases"][name] = {"skipped": "out of time"}
            print(f"[{name}] skipped: out of time", flush=True)
            return
        started = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            result = fn()
        except Exception as exc:  # one failing case must not cost the others
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["case_s"] = round(time.perf_counter() - started, 1)
        self.results["cases"][name] = result
        print(f"[{name}] {json.dumps(result)}", flush=True)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / self.file).write_text(json.dumps(self.results, indent=2))

    def pipe(self, family: str):
        if family not in self.pipes:
            self.pipes.clear()  # one family on the GPU at a time
            if self.cuda:
                torch.cuda.empty_cache()
            self.pipes[family] = make_pipe(family, self.tiny, self.cuda)
        return self.pipes[family]

    def timed(self, fn: Callable[[], object]) -> tuple[float, object, float | None]:
        """(seconds, result, peak GB) of one call."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None
        return seconds, result, peak

    def mfu(self, seconds: float, samples: int, query_tokens: int, context_tokens: int, steps: int) -> float | None:
        if self.tiny:
            return None
        from benchmarks.bench_gpu import backbone_flops

        cfg_steps = round(steps * 26 / 30)
        flops = samples * (steps + cfg_steps) * backbone_flops(query_tokens, context_tokens)
        return round(flops / seconds / (PEAK_TFLOPS * 1e12), 3)

    # ---- helpers ------------------------------------------------------------------------------------------
    def t2i(self, batch: int, prompts: list[str] | None = None, **params) -> Callable[[], list]:
        pipe = self.pipe("image")
        prompts = prompts or [PROMPTS[0]] * batch
        params = {"height": self.image_side, "width": self.image_side, "steps": self.steps, **params}
        return lambda: pipe.t2i(prompts, seeds=list(range(batch)), **params)

    def image_tokens(self) -> int:
        return (self.image_side // 16) ** 2 + 2

    def footprint(self, task: str, target: tuple[int, int, int]):
        from lance_ray.models.lance import generate
        from lance_ray.models.lance.tasks import TASKS

        pipe = self.pipe(TASKS[task].family)
        return generate._footprint(pipe.model, pipe.vae, TASKS[task], target,
                                   TASKS[task].settings_for(steps=self.steps).sampler)

    def predicted_peak_gb(self, task: str, target: tuple[int, int, int], batch: int, resident: float) -> float:
        from lance_ray.models.lance.memory import SAFETY

        return round(resident + self.footprint(task, target).batch_bytes(batch) / SAFETY / 1e9, 2)


def make_pipe(family: str, tiny: bool, cuda: bool):
    """A LancePipeline with random weights: the real Lance-3B shapes on the GPU, or the tiny checkpoint."""
    from lance_ray.models.lance.pipeline import LancePipeline
    from lance_ray.models.lance.tiny import ensure_tiny_checkpoint

    if tiny:
        root = ensure_tiny_checkpoint(Path(tempfile.gettempdir()) / "lance-bench-tiny")
        return LancePipeline.from_pretrained(str(root), family=family, device="cpu", dtype="bfloat16")
    from benchmarks.bench_gpu import make_pipeline

    pipe = make_pipeline(family)
    pipe.vae  # noqa: B018 -- load the full-size VAE now, not inside a timed case
    return pipe


def resident_gb(bench: Bench) -> float:
    return torch.cuda.memory_allocated() / 1e9 if bench.cuda else 0.0


def difference(a, b) -> dict:
    a, b = (torch.as_tensor(np.asarray(x)).float() for x in (a, b))
    d = (a - b).abs()
    return {"max_abs": round(d.max().item(), 4), "mean_abs": round(d.mean().item(), 5)}


@contextmanager
def captured_lanes():
    """The Lanes every denoise call builds (to read the step cache's skip counts)."""
    from lance_ray.models.lance import generate

    lanes: list = []
    original = generate._lanes
    generate._lanes = lambda *a: (lambda made: lanes.extend(made) or made)(original(*a))
    try:
        yield lanes
    finally:
        generate._lanes = original


# ---------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------
GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden"


def case_parity(b: Bench) -> dict:
    """The exact path on this device (CUDA graphs, fused kernels, its attention kernels) against the
    official code's outputs on the tiny checkpoint: fp32 within the CPU tests' 1e-3, bf16 within their
    bounds (cosine > 0.9999, max relative difference < 0.03)."""
    from safetensors.torch import load_file

    from lance_ray.models.lance.generate import GenerationInput, denoise
    from lance_ray.models.lance.pipeline import LancePipeline
    from lance_ray.models.lance.tasks import TASKS
    from lance_ray.models.lance.tiny import ensure_tiny_checkpoint

    root = ensure_tiny_checkpoint(Path(tempfile.gettempdir()) / "lance-bench-tiny")
    meta = json.loads((GOLDEN / "fp32_kv" / "t2i" / "generation_meta.json").read_text())
    settings = TASKS["t2i"].settings_for().sampler
    device = "cuda" if b.cuda else "cpu"
    out = {}
    for dtype, golden_dir in (("float32", "fp32_kv"), ("bfloat16", "bf16_kv")):
        expected = load_file(GOLDEN / golden_dir / "t2i" / "generation.safetensors")["final_latent_target"]
        pipe = LancePipeline.from_pretrained(str(root), family="image", device=device, dtype=dtype)
        inp = GenerationInput(meta["prompt"], tuple(expected.shape[:3]), 42)
        latents = denoise(pipe.model, pipe.tokenizer, "t2i", [inp], settings)[0].float().cpu()
        cosine = torch.nn.functional.cosine_similarity(latents.flatten(), expected.flatten(), dim=0).item()
        max_rel = ((latents - expected).abs().max() / expected.abs().max()).item()
        ok = max_rel < 1e-3 if dtype == "float32" else (cosine > 0.9999 and max_rel < 0.03)
        out[dtype] = {"cosine": round(cosine, 6), "max_rel": round(max_rel, 6), "within_test_bounds": ok}
    return out


def case_t2i(b: Bench) -> dict:
    from lance_ray.models.lance.memory import RESERVE_BYTES, largest_batch

    rows = {}
    target = (1, b.image_side // 16, b.image_side // 16)
    resident = resident_gb(b)
    for batch in ([1, 2] if b.tiny else [1, 4, 16]):
        seconds, _, peak = b.timed(b.t2i(batch))
        rows[batch] = {"s_per_image": round(seconds / batch, 3), "seconds": round(seconds, 2), "peak_gb": peak,
                       "predicted_peak_gb": b.predicted_peak_gb("t2i", target, batch, resident),
                       "mfu": b.mfu(seconds, batch, b.image_tokens(), b.image_tokens() + 60, b.steps)}
    best = min(rows, key=lambda k: rows[k]["s_per_image"])
    budget_24 = int(24e9 - resident * 1e9 - RESERVE_BYTES)
    result = {"batches": rows, "best_batch": best, "best_s_per_image": rows[best]["s_per_image"],
              "resident_gb": round(resident, 2),
              "memory_model_batch_on_24gb": largest_batch(b.footprint("t2i", target), budget_24, 16)}
    if b.cuda:  # the decoder alone, per output pixel (the memory model counts 3 * dec_dim * 2 bytes)
        pipe = b.pipe("image")
        z = torch.randn(1, 48, *target, device=pipe.device, dtype=pipe.dtype)
        base = torch.cuda.memory_allocated()
        _, _, peak = b.timed(lambda: pipe.vae.decode_uint8(z))
        result["vae_decode_bytes_per_pixel"] = round((peak * 1e9 - base) / (16 * target[1]) ** 2)
    return result


def case_modes(b: Bench) -> dict:
    from lance_ray.models.lance import generate
    from lance_ray.models.lance.tasks import TASKS

    pipe = b.pipe("image")
    batch = 2 if b.tiny else 8
    prompts = PROMPTS[:batch]
    rows = generate.text_rows(prompts, b.image_side, b.image_side, 1, list(range(batch)))
    modes = {"exact": {}, "fp8": {"fp8": True}, "step_cache_0.05": {"step_cache": 0.05},
             "step_cache_0.15": {"step_cache": 0.15}, "fp8+step_cache_0.15": {"fp8": True, "step_cache": 0.15}}
    out, reference = {}, None
    for name, params in modes.items():
        settings = TASKS["t2i"].settings_for(steps=b.steps, **params)
        if params.get("fp8"):  # quantise the weights and compile outside the timing
            generate.generate_media(pipe.model, pipe.tokenizer, None, "t2i", rows[:1],
                                    TASKS["t2i"].settings_for(steps=2).sampler, preset="image_768res",
                                    return_latents=True, speed=settings.speed)
        with captured_lanes() as lanes:
            seconds, latents, peak = b.timed(lambda s=settings: generate.generate_media(
                pipe.model, pipe.tokenizer, None, "t2i", rows, s.sampler, preset="image_768res",
                return_latents=True, speed=s.speed))
        latents = torch.stack(latents)
        pixels = pipe.vae.decode_uint8(latents.permute(0, 4, 1, 2, 3).to(pipe.device, pipe.dtype)).cpu()
        row = {"s_per_image_without_decode": round(seconds / batch, 3), "peak_gb": peak,
               "skipped_steps": [lane.skipped_steps() for lane in lanes if lane.step_cache is not None]}
        if reference is None:
            reference = (latents, pixels)
        else:
            row["latents_vs_exact"] = difference(latents, reference[0])
            row["pixels_vs_exact"] = difference(pixels, reference[1])
            row["speedup"] = round(out["exact"]["s_per_image_without_decode"] / row["s_per_image_without_decode"], 2)
        out[name] = row
    return {"batch": batch, "modes": out}


def case_profile(b: Bench) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from lance_ray.models.lance import branches
    from lance_ray.models.lance.generate import GenerationInput, denoise
    from lance_ray.models.lance.tasks import TASKS

    pipe = b.pipe("image")
    batch, steps = (2, 2) if b.tiny else (16, 3)
    side = b.image_side // 16
    inputs = [GenerationInput(PROMPTS[0], (1, side, side), i) for i in range(batch)]
    settings = TASKS["t2i"].settings_for(steps=steps, cfg_interval=[0.0, 1.0]).sampler  # CFG on every step
    graphs, branches.CUDA_GRAPHS = branches.CUDA_GRAPHS, False
    try:
        denoise(pipe.model, pipe.tokenizer, "t2i", inputs, settings)  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
        with profile(activities=activities) as prof:
            denoise(pipe.model, pipe.tokenizer, "t2i", inputs, settings)
            if b.cuda:
                torch.cuda.synchronize()
    finally:
        branches.CUDA_GRAPHS = graphs
    kernels = []
    for evt in prof.key_averages():
        on_device = b.cuda and getattr(evt, "device_type", None) is not None and evt.device_type.name == "CUDA"
        if b.cuda and not on_device:
            continue
        us = (getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)) if b.cuda \
            else evt.self_cpu_time_total
        if us > 0:
            kernels.append({"name": evt.key[:160], "calls": evt.count, "total_ms": round(us / 1e3, 3)})
    kernels.sort(key=lambda k: -k["total_ms"])
    total_ms = sum(k["total_ms"] for k in kernels)
    for k in kernels:
        k["share"] = round(k["total_ms"] / total_ms, 4) if total_ms else 0.0
    report = {"what": f"t2i {b.image_side}² batch {batch}: prefill + {steps} CFG steps (cond + uncond rows), "
                      "CUDA graphs off; per-step figures = totals / steps",
              "device_time_ms": round(total_ms, 1), "per_step_ms": round(total_ms / steps, 1),
              "kernels": kernels[:60]}
    b.out.mkdir(parents=True, exist_ok=True)
    (b.out / "profile_step.json").write_text(json.dumps(report, indent=2))
    return {"per_step_ms": report["per_step_ms"], "top": [(k["name"][:60], k["share"]) for k in kernels[:8]]}


def case_t2v(b: Bench, **params) -> dict:
    """t2v 480p exact (no params), or a speed mode compared with the exact video of the first call."""
    pipe = b.pipe("video")
    h, w, frames = b.video
    seconds, videos, peak = b.timed(lambda: pipe.t2v([PROMPTS[1]], height=h, width=w, frames=frames, steps=b.steps,
                                                     seeds=[0], **params))
    latent = ((frames - 1) // 4 + 1) * (h // 16) * (w // 16)
    result = {"seconds": round(seconds, 2), "peak_gb": peak,
              "mfu": b.mfu(seconds, 1, latent + 2, latent + 62, b.steps)}
    if not params:
        b.t2v_exact = videos[0]
    elif getattr(b, "t2v_exact", None) is not None:
        result["pixels_vs_exact"] = difference(videos[0], b.t2v_exact)
    return result


def case_peaks(b: Bench) -> dict:
    """t2v at 121 frames, 2 steps: memory does not grow with the step count."""
    pipe = b.pipe("video")
    h, w, _ = b.video
    resident = resident_gb(b)
    seconds, _, peak = b.timed(lambda: pipe.t2v([PROMPTS[1]], height=h, width=w, frames=b.long_frames, steps=2,
                                                seeds=[0]))
    target = ((b.long_frames - 1) // 4 + 1, h // 16, w // 16)
    return {"frames": b.long_frames, "seconds": round(seconds, 1), "peak_gb": peak, "resident_gb": round(resident, 2),
            "predicted_peak_gb": b.predicted_peak_gb("t2v", target, 1, resident)}


def case_card24(b: Bench) -> dict:
    """t2i 768² asking for batch 4, and t2v 121 frames, on an emulated 24 GB card: a filler allocation leaves
    free only what such a card would have beside the resident weights; the batch size and the VAE decode's
    chunks are then chosen from that (memory.py). Reports whether each ran and its peak without the filler.
    On an H200 the other cases' peaks include decode chunks sized to its ~140 GB, not a 24 GB card's."""
    if not b.cuda:
        return {"skipped": "needs a GPU"}
    card = 24e9
    out = {}
    for name, family, run in (
        ("t2i_768_batch4", "image", lambda: b.t2i(4)()),
        (f"t2v_{b.long_frames}f", "video", lambda: b.pipe("video").t2v(
            [PROMPTS[1]], height=b.video[0], width=b.video[1], frames=b.long_frames, steps=2, seeds=[0])),
    ):
        b.pipe(family)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        used = torch.cuda.memory_reserved()
        filler = torch.empty(max(0, int(free - (card - used) - (1 << 30))), dtype=torch.uint8, device="cuda")
        try:
            torch.cuda.reset_peak_memory_stats()
            seconds, _, _ = b.timed(run)
            peak = (torch.cuda.max_memory_allocated() - filler.numel()) / 1e9
            out[name] = {"ran": True, "seconds": round(seconds, 2), "peak_gb_without_filler": round(peak, 2)}
        except torch.OutOfMemoryError as exc:
            out[name] = {"ran": False, "error": str(exc).splitlines()[0][:200]}
        finally:
            del filler
            torch.cuda.empty_cache()
    return out


def case_edit(b: Bench) -> dict:
    pipe = b.pipe("image")
    image = np.random.default_rng(2).integers(0, 256, (b.image_side, b.image_side, 3), dtype=np.uint8)
    rows = {}
    for batch in ([1, 2] if b.tiny else [4, 8]):
        seconds, _, peak = b.timed(lambda n=batch: pipe.image_edit([image] * n, PROMPTS[:n], steps=b.steps,
                                                                   preset=b.presets["image"], seeds=list(range(n))))
        source = b.image_tokens() + (b.image_side // 28) ** 2
        rows[batch] = {"s_per_edit": round(seconds / batch, 3), "peak_gb": peak,
                       "mfu": b.mfu(seconds, batch, b.image_tokens(), b.image_tokens() + source + 60, b.steps)}
    return {"batches": rows}


def case_video_edit(b: Bench) -> dict:
    pipe = b.pipe("video")
    h, w, frames = b.video
    video = np.random.default_rng(3).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    times = {}
    few, more = (1, 2) if b.tiny else (5, 10)
    for steps in (few, more):
        seconds, _, peak = b.timed(lambda n=steps: pipe.video_edit([video], ["make it snow"], steps=n, seeds=[0],
                                                                   preset=b.presets["video"]))
        times[steps] = (seconds, peak)
    per_step = (times[more][0] - times[few][0]) / (more - few)
    full = times[more][0] + (b.steps - more) * per_step
    return {"seconds_by_steps": {k: round(v[0], 2) for k, v in times.items()}, "per_step_s": round(per_step, 3),
            f"extrapolated_{b.steps}_steps_s": round(full, 1), "peak_gb": times[more][1]}


def case_mixed(b: Bench) -> dict:
    batch = 2 if b.tiny else 16
    same, _, _ = b.timed(b.t2i(batch))
    mixed, _, _ = b.timed(b.t2i(batch, prompts=PROMPTS[:batch]))
    return {"batch": batch, "same_prompt_s_per_image": round(same / batch, 3),
            "different_prompts_s_per_image": round(mixed / batch, 3)}


def case_graphs(b: Bench) -> dict:
    from lance_ray.models.lance import branches

    out = {}
    for on in (True, False):
        branches.CUDA_GRAPHS = on
        try:
            seconds, _, _ = b.timed(b.t2i(1))
        finally:
            branches.CUDA_GRAPHS = True
        out["graphs_on_s" if on else "graphs_off_s"] = round(seconds, 3)
    return out


def case_t2v_modes(b: Bench) -> dict:
    return {"fp8": case_t2v(b, fp8=True), "step_cache_0.15": case_t2v(b, step_cache=0.15)}


def case_cfg_parallel(b: Bench) -> dict:
    out = {}
    image = b.pipe("image")
    image.t2i(["warm up"], height=256, width=256, steps=2, cfg_parallel=True)  # replica on the second GPU
    for batch in ([1] if b.tiny else [1, 4]):
        one, exact, _ = b.timed(b.t2i(batch))
        two, fast, _ = b.timed(b.t2i(batch, cfg_parallel=True))
        out[f"t2i_b{batch}"] = {"one_gpu_s": round(one, 2), "cfg_parallel_s": round(two, 2),
                                "speedup": round(one / two, 2), "pixels_vs_one_gpu": difference(np.stack(fast),
                                                                                            np.stack(exact))}
    video = b.pipe("video")
    h, w, frames = b.video
    steps = 2 if b.tiny else 10
    video.t2v(["warm up"], height=256, width=256, frames=5, steps=2, cfg_parallel=True)
    run = {flag: (lambda f=flag: video.t2v([PROMPTS[1]], height=h, width=w, frames=frames, steps=steps, seeds=[0],
                                           cfg_parallel=f)) for flag in (False, True)}
    one, exact, _ = b.timed(run[False])
    two, fast, _ = b.timed(run[True])
    out[f"t2v_{frames}f_{steps}steps"] = {"one_gpu_s": round(one, 2), "cfg_parallel_s": round(two, 2),
                                          "speedup": round(one / two, 2),
                                          "pixels_vs_one_gpu": difference(fast[0], exact[0])}
    return out


# ---------------------------------------------------------------------------------------------------------
def summary(results: dict) -> str:
    lines = [f"{results['device']}  torch {results['torch']}{'  (tiny shapes, CPU)' if results['tiny'] else ''}"]
    for name, r in results["cases"].items():
        if "error" in r or "skipped" in r:
            lines.append(f"{name:<12} {r.get('error') or r.get('skipped')}")
            continue
        shown = {k: v for k, v in r.items() if k not in ("case_s", "top", "kernels")}
        lines.append(f"{name:<12} {json.dumps(shown)[:400]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoint on the CPU (checks the script)")
    parser.add_argument("--cfg-parallel", action="store_true", help="the two-GPU comparison instead")
    parser.add_argument("--only", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no case after this many seconds")
    args = parser.parse_args()
    bench = Bench(args)
    print(f"device: {bench.results['device']}", flush=True)
    if args.cfg_parallel:
        cases = {"cfg_parallel": case_cfg_parallel}
    else:
        # Image cases, then video ones (switching families rebuilds the model), the least needed last.
        cases = {"parity": case_parity, "t2i": case_t2i, "modes": case_modes, "profile": case_profile, "edit": case_edit,
                 "graphs": case_graphs, "t2v": case_t2v, "peaks": case_peaks, "video_edit": case_video_edit,
                 "t2v_modes": case_t2v_modes, "mixed": case_mixed, "card24": case_card24}
    only = set(args.only.split(",")) if args.only else set(cases)
    bench.case("warm_up", lambda: warm_up(bench))
    for name, fn in cases.items():
        if name in only:
            bench.case(name, lambda f=fn: f(bench))
    bench.results["total_s"] = round(time.perf_counter() - START, 1)
    bench.save()
    print(summary(bench.results), flush=True)


def warm_up(b: Bench) -> dict:
    """Compile the fused kernels (bf16 and fp8) at a small shape, outside every timed case."""
    pipe = b.pipe("image")
    seconds, _, _ = b.timed(lambda: (pipe.t2i(["warm up"], height=256, width=256, steps=3),
                                     pipe.t2i(["warm up"], height=256, width=256, steps=3, fp8=True)))
    return {"seconds": round(seconds, 1)}


if __name__ == "__main__":
    main()
