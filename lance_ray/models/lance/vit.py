"""The Qwen2.5-VL vision tower used by Lance, with per-window batched attention.

Numerics follow the official `modeling/vit/qwen2_5_vl_vit.py`
(`Qwen2_5_VisionTransformerPretrainedModel`, `Qwen2_5_VLVisionBlock`, `Qwen2_5_VLPatchMerger`).

Input: patch rows `[N, C*Tp*P*P]` (1176 for the real config) of one or more visuals, each in the
official order (t', h/2, w/2, dy, dx) -- i.e. every 2x2 group of patches that the merger fuses is
contiguous -- and each visual's patch grid `(t, h, w)` = (frames/2, H/14, W/14).
Output: `[N/4, out_hidden]` merged tokens, raster (t', h/2, w/2) order, visuals concatenated.

Attention never crosses a temporal patch slice: window blocks attend inside 112-px windows (4x4 merged
tokens) of one slice, the `fullatt_block_indexes` blocks inside the whole slice.  Instead of the dense
[N, N] mask of the reference we gather equal-length segments into a batch and run one SDPA per distinct
segment length, so memory stays linear in N (x2t_video at 480p/121 frames).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from .config import ViTConfig
from .layers import SDPA_BACKENDS, RMSNorm, fused_on_gpu, rotate_half


class VisionBlock(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.norm1 = RMSNorm(D, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(D, cfg.rms_norm_eps)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.gate_proj = nn.Linear(D, cfg.intermediate_size)
        self.up_proj = nn.Linear(D, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, D)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segments]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).view(n, 3, self.num_heads, -1).unbind(1)  # each [n, heads, hd]
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        x = x + self.proj(_segment_attention(q, k, v, segments).flatten(1))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


@fused_on_gpu
def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Computed in float32 as the reference does, whatever the activation dtype.  x: [n, heads, hd]
    xf = x.float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


@dataclass(frozen=True)
class Segments:
    """Equal-length attention segments: `starts` [S] offsets of segments of `length` tokens. `tiled`: they
    are all the segments, back to back from 0 (every image of a batch the same size), so the tokens are
    already a [S, length] batch and need no gather."""

    starts: torch.Tensor
    length: int
    tiled: bool


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: list[Segments]) -> torch.Tensor:
    """Bidirectional attention inside contiguous segments; one SDPA per distinct segment length."""
    if len(segments) == 1 and segments[0].tiled:  # [S*length, heads, hd] is [S, length, heads, hd] as it stands
        return _attend(q, k, v, segments[0].length)
    out = torch.empty_like(q)
    for seg in segments:
        idx = (seg.starts[:, None] + torch.arange(seg.length, device=q.device)).reshape(-1)
        out[idx] = _attend(q[idx], k[idx], v[idx], seg.length)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    """q, k, v: [S*length, heads, hd] of S segments back to back -> attention within each segment, same shape."""
    qs, ks, vs = (t.view(-1, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))  # [S, heads, length, hd]
    with sdpa_kernel(SDPA_BACKENDS):
        attn = F.scaled_dot_product_attention(qs, ks, vs)
    return attn.transpose(1, 2).reshape(q.shape)


def _group_by_length(lengths: list[int], device: torch.device) -> list[Segments]:
    """Contiguous segments of the given lengths -> one `Segments` per distinct length."""
    starts: dict[int, list[int]] = {}
    offset = 0
    for n in lengths:
        if n:
            starts.setdefault(n, []).append(offset)
        offset += n
    tiled = len(starts) == 1 and all(n > 0 for n in lengths)
    return [Segments(torch.tensor(s, device=device), n, tiled) for n, s in starts.items()]


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, merged = cfg.hidden_size, cfg.hidden_size * cfg.spatial_merge_size**2
        # The reference's Conv3d with stride == kernel is a linear map of each flattened patch row.
        self.patch_embed = nn.Linear(cfg.patch_dim, D, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.merger_fc1 = nn.Linear(merged, merged)
        self.merger_fc2 = nn.Linear(merged, cfg.out_hidden_size)

    def _layout(self, grids: list[tuple[int, int, int]], device: torch.device):
        """Window permutation (merged-token units), rotary angles and attention segments for the grids."""
        m = self.cfg.spatial_merge_size
        ws = self.cfg.window_size // m // self.cfg.patch_size  # window side in merged tokens
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (
            10000 ** (torch.arange(0, hd // 2, 2, dtype=torch.float32, device=device) / (hd // 2))
        )
        order, angles, window_lens, slice_lens = [], [], [], []
        base = 0
        for t, h, w in grids:
            mh, mw = h // m, w // m
            # Patch (row, col) in the official (t', h/2, w/2, dy, dx) row order.
            rr = torch.arange(h, device=device).view(mh, m, 1, 1).expand(mh, m, mw, m).permute(0, 2, 1, 3)
            cc = torch.arange(w, device=device).view(1, 1, mw, m).expand(mh, m, mw, m).permute(0, 2, 1, 3)
            rc = torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=-1).repeat(t, 1)  # [t*h*w, 2]
            angles.append((rc[..., None].float() * inv_freq).flatten(1))  # [n, hd/2]: rows, then cols
            # Windows tile each slice (padded at bottom/right); enumerate merged tokens window by window.
            ph, pw = -mh % ws, -mw % ws
            grid = F.pad(torch.arange(t * mh * mw, device=device).view(t, mh, mw), (0, pw, 0, ph), value=-1)
            grid = grid.view(t, (mh + ph) // ws, ws, (mw + pw) // ws, ws).permute(0, 1, 3, 2, 4)
            grid = grid.reshape(t, -1, ws * ws)
            window_lens += ((grid >= 0).sum(-1) * m * m).reshape(-1).tolist()
            flat = grid.reshape(-1)
            order.append(flat[flat >= 0] + base)
            slice_lens += [h * w] * t
            base += t * mh * mw
        order_t = torch.cat(order)
        return (
            order_t,
            torch.cat(angles),
            _group_by_length(window_lens, device),
            _group_by_length(slice_lens, device),
        )

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """patches: [N, patch_dim], grids: per visual (t, h, w) in patches -> [N/4, out_hidden]."""
        unit = self.cfg.spatial_merge_size**2
        if patches.shape[0] != sum(t * h * w for t, h, w in grids):
            raise ValueError("patch rows do not match the grids")
        order, angles, windows, slices = self._layout(grids, patches.device)
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))
        n = x.shape[0]
        # Reorder merged groups (4 patch rows each) into window order; rotary angles move with them.
        x = x.view(n // unit, unit, -1)[order].reshape(n, -1)
        angles = angles.view(n // unit, unit, -1)[order].reshape(n, -1)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, slices if i in self.cfg.fullatt_block_indexes else windows)
        x = self.merger_fc2(F.gelu(self.merger_fc1(self.merger_norm(x).view(n // unit, -1))))
        return x[torch.argsort(order)]
