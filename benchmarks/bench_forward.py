"""Where does a denoising step's time go? Times one step of t2i (batch 16, 768²) and t2v (49f, 480p) under
attention-backend and kernel-fusion variants, side by side in one process.

    python -m benchmarks.bench_forward [--variants baseline,cudnn,cudnn+fused]

A step's time is (T(steps=n2) - T(steps=n1)) / (n2 - n1) with CFG on every step (cfg_interval 0..1),
so prompt prefill, VAE decode and warm-up cancel out.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.bench_gpu import make_pipeline
from lance_ray.models.lance import transformer

VARIANTS = ("baseline", "cudnn", "cudnn+fused")


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def use_variant(name: str) -> None:
    base = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    transformer.SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *base] if "cudnn" in name else base
    # The list's order is a priority only with set_priority (else the dispatcher's own order applies).
    transformer.sdpa_kernel = functools.partial(sdpa_kernel, set_priority=True)
    if "fused" in name:
        rms = torch.compile(_rms, dynamic=True)
        transformer.RMSNorm.forward = lambda self, x: rms(x, self.weight, self.eps)
        transformer.apply_rotary = torch.compile(transformer.apply_rotary, dynamic=True)


def step_seconds(run, n1: int = 2, n2: int = 6) -> float:
    run(n1)  # warm-up (and compilation)
    times = {}
    for n in (n1, n2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(n)
        torch.cuda.synchronize()
        times[n] = time.perf_counter() - start
    return (times[n2] - times[n1]) / (n2 - n1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="bench_forward.json")
    args = parser.parse_args()
    image = make_pipeline("image")
    video = make_pipeline("video")
    cfg = {"cfg_interval": (0.0, 1.0)}
    cases = {
        "t2i_768_b16": lambda n: image.t2i(["a cat"] * 16, height=768, width=768, steps=n, seeds=list(range(16)), **cfg),
        "t2v_480p_49f": lambda n: video.t2v(["a dog"], height=480, width=848, frames=49, steps=n, seeds=[0], **cfg),
    }
    results = {}
    for variant in args.variants.split(","):
        use_variant(variant)
        for case, run in cases.items():
            seconds = step_seconds(run)
            results[f"{variant}/{case}"] = round(seconds, 4)
            print(f"{variant:>12} {case:>14}: {seconds * 1000:.0f} ms per CFG step (cond+uncond)")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
