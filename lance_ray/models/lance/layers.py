"""Pieces shared by the language model (transformer.py) and the vision tower (vit.py).

* `RMSNorm`: the Qwen2 RMSNorm both of them use (official `modeling/qwen2/modeling_qwen2.py` and
  `modeling/vit/qwen2_5_vl_vit.py`, `Qwen2RMSNorm`): normalised in float32, cast back to the input dtype,
  then scaled by the weight.  (The VAE's channel norm is another operation and lives in vae.py.)
* `rotate_half`: the rotate-half layout of rotary embeddings, `[x1, x2] -> [-x2, x1]`.
* `SDPA_BACKENDS` / `LONG_QUERY_BACKENDS`: which attention kernels `scaled_dot_product_attention` may pick.
* `fused_on_gpu`: element-wise chains compiled into one kernel on CUDA; `compiled_kernels_in_capture` lets a
  CUDA-graph capture record the kernels already compiled instead of falling back to eager ones.
* `silu_mul`: the SwiGLU activation on a fused gate|up projection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend

# cuDNN attention rebuilds its execution plan for every new sequence length (milliseconds of CPU per
# call while decoding), so attention is restricted to the flash / memory-efficient / math kernels.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Long bidirectional queries (the denoising target, visual blocks) keep one shape for every step, so the
# plan is built once; there cuDNN is the fastest kernel on Hopper (18% off a t2v step on an H100).
LONG_QUERY_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *SDPA_BACKENDS]
LONG_QUERY = 1024  # query length from which a bidirectional query counts as long
# Keys padded and masked (rows of one denoising batch whose prompts differ in length): flash takes no mask,
# and cuDNN's mask support has had dtype bugs; the memory-efficient kernel takes an additive mask.
PADDED_KEY_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# The element-wise chains of RMSNorm and rotary embedding run as fused kernels (torch.compile) on CUDA:
# a quarter off a denoising step on an H100. LANCE_RAY_COMPILE=0 turns it off.
FUSE_ON_GPU = os.environ.get("LANCE_RAY_COMPILE", "1") != "0"
_compiled: dict = {}
_not_compilable: set = set()
_capture_uses_compiled = False
log = logging.getLogger(__name__)


def fused_on_gpu(fn):
    """`fn` compiled into one kernel when its first argument is on a GPU (eager on CPU, and for good if
    compiling it fails).  While a CUDA graph is being captured compiling is not allowed: the eager `fn`
    runs, unless the capture was opened under `compiled_kernels_in_capture()` and `fn` is already compiled
    (its warm-up ran the same shapes)."""

    def call(x: torch.Tensor, *args):
        if FUSE_ON_GPU and x.is_cuda and fn not in _not_compilable:
            if not torch.cuda.is_current_stream_capturing():
                if fn not in _compiled:
                    _compiled[fn] = torch.compile(fn, dynamic=True)
                try:
                    return _compiled[fn](x, *args)
                except Exception as exc:  # a compiler failure must not stop generation: run it eagerly
                    log.warning("compiling %s failed (%s: %s); it runs unfused", fn.__name__, type(exc).__name__, exc)
                    _not_compilable.add(fn)
                    _compiled.pop(fn, None)
            elif _capture_uses_compiled and fn in _compiled:
                return _compiled[fn](x, *args)
        return fn(x, *args)

    return call


@contextmanager
def compiled_kernels_in_capture() -> Iterator[None]:
    """Inside: a CUDA-graph capture records the compiled kernels of `fused_on_gpu` functions (the denoising
    step's graphs: without them a graph would replay the slower eager element-wise chains)."""
    global _capture_uses_compiled
    _capture_uses_compiled = True
    try:
        yield
    finally:
        _capture_uses_compiled = False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., dim], weight: [dim] (or any shape that broadcasts against x)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


rms_norm = fused_on_gpu(_rms_norm)


@fused_on_gpu
def qk_norm(qkv: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm of the query and key heads of a packed projection, values passed through.
    qkv: [n, heads, hd] with the q|k heads first; weight: [q|k heads, hd] -> [n, heads, hd]."""
    n_qk = weight.shape[0]
    return torch.cat([_rms_norm(qkv[:, :n_qk], weight, eps), qkv[:, n_qk:]], dim=1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # x: [..., d] -> [..., d]: halves (x1, x2) become (-x2, x1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


@fused_on_gpu
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [..., 2I] (gate | up of one fused matmul) -> silu(gate) * up: [..., I]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
