"""FP8 matmuls for the generation expert: the opt-in `fp8` speed mode.

A weight [out, in] is quantised once to float8 e4m3 with one scale per output channel; activations are
quantised on the fly with one scale per token (row); `torch._scaled_mm` multiplies the two and rescales,
accumulating in float32 and writing bfloat16.  Hopper runs these matmuls at twice the bf16 rate.

    w8 = quantize_weight(linear.weight, linear.bias)   # once (Expert.fp8_weights)
    y = fp8_linear(x, w8)                              # x [n, in] -> [n, out] in x's dtype

`fp8_available(device)` says whether this torch runs the call on `device`: CUDA GPUs of compute capability
8.9 or newer, and (this torch) the CPU.  It is a probe -- one tiny matmul compared with its float
reference -- so an older GPU or a build without the kernel answers False instead of failing mid-run;
callers then keep the exact path and warn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .layers import fused_on_gpu

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_SCALE_FLOOR = 1e-12  # an all-zero row still gets a finite scale


@dataclass(frozen=True)
class Fp8Weight:
    """A linear layer's weight in float8: `weight[o] * scale[0, o]` approximates the original row o."""

    weight: torch.Tensor  # [out, in] float8_e4m3fn, row-major: weight.t() is the column-major operand
    scale: torch.Tensor  # [1, out] float32
    bias: torch.Tensor | None  # [out] bfloat16


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> Fp8Weight:
    """Per-output-channel float8 copy of `weight` [out, in] (and its bias in bfloat16)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_SCALE_FLOOR)  # [out, 1]
    quantized = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return Fp8Weight(quantized.contiguous(), scale.t().contiguous(),
                     None if bias is None else bias.to(torch.bfloat16))


@fused_on_gpu
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, k] -> (float8 [n, k], float32 scale [n, 1]) with x ≈ x8 * scale row by row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_SCALE_FLOOR)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """`x @ weight.T + bias` through float8 operands: x [n, in] -> [n, out] in x's dtype."""
    x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(x8, w.weight.t(), scale_a=x_scale, scale_b=w.scale, bias=w.bias,
                           out_dtype=torch.bfloat16, use_fast_accum=True)
    return out.to(x.dtype).view(*x.shape[:-1], -1)


_available: dict[str, bool] = {}


def fp8_available(device: torch.device) -> bool:
    """Whether FP8 matmuls run on `device` (probed once per device kind and index)."""
    key = str(device)
    if key not in _available:
        _available[key] = _probe(device)
    return _available[key]


def _probe(device: torch.device) -> bool:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=generator).to(device)
    weight = torch.randn(48, 64, generator=generator).to(device)
    bias = torch.randn(48, generator=generator).to(device)
    try:
        out = fp8_linear(x, quantize_weight(weight, bias)).float()
    except Exception as exc:  # no kernel for this device or build: whatever it raises, the exact path runs
        log.info("FP8 matmuls unavailable on %s: %s", device, exc)
        return False
    reference = x @ weight.T + bias
    error = ((out - reference).norm() / reference.norm()).item()
    return error < 0.1  # e4m3 keeps ~2 significant digits: a few percent, never tens
