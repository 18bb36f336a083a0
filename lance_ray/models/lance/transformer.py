"""Lance's language model: a Qwen2 mixture-of-transformers (MoT) backbone with its KV cache.

API (used by understand.py and generate.py)
-------------------------------------------
Tokens of several batch rows are *packed* along one axis: `x: [N, H]`, `pos: [3, N]` (MRoPE t/h/w ids),
`gen_mask: [N] bool` (True = VAE-latent token -> "gen" expert, else "und"), and a `rows` layout that says,
for each batch row in packing order, which consecutive *splits* of its tokens this call carries and how
each split attends::

    rows = [[Split(18, causal=True), Split(56, causal=False)],   # row 0: 74 tokens
            [Split(1, causal=True)]]                            # row 1: 1 token

A split attends to everything the row already has in `cache` (if given), to the earlier splits of the
row in this call, and to itself (causally, bottom-right aligned, or fully).  Rows never see each other.

    h = lm(x, pos, rows, cache=cache, gen_mask=gen_mask, update_cache=True)   # [N, H], final-normed

Pass `routing=Routing(gen_mask)` instead of `gen_mask` to reuse the expert split across many calls.

`KVCache(cfg, batch, capacity, device, dtype)` holds per-layer keys/values `[B, nkv, capacity, hd]`
and the per-row lengths; row b of the cache is row b of `rows`.  With `update_cache=False` the call
reads the cache without extending it (the denoising query of generation).  Calls where every row has
exactly one token take a batched path (one masked SDPA over the padded cache); everything else runs
one SDPA per split (flash / memory-efficient kernels on GPU, never a dense [N, N] mask).

`LanguageModel` (this backbone + embed + lm_head) is the `llm` part of `LanceModel` (model.py).

Numerics follow the official `modeling/lance/qwen2_navit.py` (`Qwen2MoTDecoderLayer`,
`PackedAttentionMoT`) and the MRoPE of `modeling/qwen2_5_vl/modeling_qwen2_5_vl.py`
(`Qwen2_5_VLRotaryEmbedding`, `apply_multimodal_rotary_pos_emb`): pre-norm blocks, per-token expert
choice for every weight (attention projections, QK-norm, MLP, both layer norms and the final norm), QK
RMSNorm per head before RoPE, GQA, softmax scale 1/sqrt(hd), RMSNorm in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .config import LLMConfig
from .layers import LONG_QUERY, LONG_QUERY_BACKENDS, SDPA_BACKENDS, RMSNorm, fused_on_gpu, rotate_half


@dataclass(frozen=True)
class Split:
    length: int
    causal: bool


class Expert(nn.Module):
    """All weights of one expert ("und" or "gen") in one layer."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(H, cfg.num_attention_heads * hd)
        self.k_proj = nn.Linear(H, cfg.num_key_value_heads * hd)
        self.v_proj = nn.Linear(H, cfg.num_key_value_heads * hd)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.mlp_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, H, bias=False)

    def qkv(self, x: torch.Tensor, hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [n, H] (already attn-normed) -> q [n, nh, hd], k/v [n, nkv, hd]; QK-norm per head
        q = self.q_norm(self.q_proj(x).unflatten(-1, (-1, hd)))
        k = self.k_norm(self.k_proj(x).unflatten(-1, (-1, hd)))
        return q, k, self.v_proj(x).unflatten(-1, (-1, hd))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Routing:
    """Which packed tokens go to which expert; applies a per-expert function and reassembles."""

    def __init__(self, gen_mask: torch.Tensor | None) -> None:
        self.all_und = gen_mask is None or not bool(gen_mask.any())
        self.all_gen = gen_mask is not None and bool(gen_mask.all())
        if not (self.all_und or self.all_gen):
            self.und_idx = (~gen_mask).nonzero().squeeze(1)
            self.gen_idx = gen_mask.nonzero().squeeze(1)

    def apply(self, und, gen, x: torch.Tensor) -> torch.Tensor:
        if self.all_und:
            return und(x)
        if self.all_gen:
            return gen(x)
        out_u, out_g = und(x[self.und_idx]), gen(x[self.gen_idx])
        out = out_u.new_empty((x.shape[0], *out_u.shape[1:]))
        out[self.und_idx] = out_u
        out[self.gen_idx] = out_g
        return out


class KVCache:
    """Per-layer keys/values of B rows, right-padded to `capacity`; `lens[b]` tokens of row b are valid."""

    def __init__(
        self, cfg: LLMConfig, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.capacity = capacity
        # Host copy of the lengths: per-split loops need python ints, and keeping it here avoids syncs.
        self.lens = [0] * batch
        # Decoding attends over the whole capacity (masked) instead of the longest row, so every step
        # has the same shapes and can be replayed as a CUDA graph.
        self.static_decode = False
        self.lens_t = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return len(self.lens)

    def head(self, rows: int) -> KVCache:
        """A view of the first `rows` rows (no copy): decoding only the slots in use writes and reads the
        same storage. The view's host `lens` is its own list; its owner copies it back."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[:rows] for t in self.k], [t[:rows] for t in self.v]
        view.capacity, view.static_decode = self.capacity, self.static_decode
        view.lens, view.lens_t = self.lens[:rows], self.lens_t[:rows]
        return view

    def advance(self, added: list[int]) -> None:
        if any(n + a > self.capacity for n, a in zip(self.lens, added, strict=True)):
            raise ValueError(f"KV cache overflow: lens {self.lens} + {added} > capacity {self.capacity}")
        self.lens = [n + a for n, a in zip(self.lens, added, strict=True)]
        if len(set(added)) == 1:  # the decoding case: no host-to-device copy
            self.lens_t += added[0]
        else:
            self.lens_t += torch.tensor(added, dtype=torch.long).to(self.lens_t.device, non_blocking=True)


def rotary_cos_sin(
    pos: torch.Tensor, cfg: LLMConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """MRoPE tables.  pos: [3, N] -> cos, sin: [N, hd].

    Frequency slot i uses the t, h or w position according to `mrope_section` (e.g. [16, 24, 24] slots
    of hd/2 = 64), the same assignment for both halves of the rotate-half layout.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=pos.device) / hd))
    # Axis of each slot, built with device ops only (no host-to-device copy: CUDA-graph safe).
    slot = torch.arange(hd // 2, device=pos.device)
    t_end, h_end = cfg.mrope_section[0], cfg.mrope_section[0] + cfg.mrope_section[1]
    axis = (slot >= t_end).long() + (slot >= h_end).long()  # [hd/2]: 0 = t, 1 = h, 2 = w
    angles = pos.float().T[:, axis] * inv_freq  # [N, hd/2]: position of the slot's axis * its frequency
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@fused_on_gpu
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, heads, hd], cos/sin: [N, hd]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class MoTBlock(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.und = Expert(cfg)
        self.gen = Expert(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        route: Routing,
        rows: list[list[Split]],
        groups: list[RowGroup],
        cache: KVCache | None,
        update_cache: bool,
    ) -> torch.Tensor:
        hd = self.cfg.head_dim
        und, gen = self.und, self.gen

        def qkv_of(expert: Expert):
            return lambda t: torch.cat([*expert.qkv(expert.attn_norm(t), hd)], dim=1)

        nh, nkv = self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        qkv = route.apply(qkv_of(und), qkv_of(gen), x)  # [N, nh + 2*nkv, hd]
        q, k, v = qkv.split([nh, nkv, nkv], dim=1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = self._attention(q, k, v, rows, groups, cache, update_cache)  # [N, nh*hd]
        x = x + route.apply(und.o_proj, gen.o_proj, attn)
        return x + route.apply(lambda t: und.mlp(und.mlp_norm(t)), lambda t: gen.mlp(gen.mlp_norm(t)), x)

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: list[list[Split]],
        groups: list[RowGroup],
        cache: KVCache | None,
        update_cache: bool,
    ) -> torch.Tensor:
        # q: [N, nh, hd], k/v: [N, nkv, hd] packed over rows
        if cache is not None and all(len(r) == 1 and r[0].length == 1 for r in rows):
            return self._decode_attention(q, k, v, cache, update_cache)
        nh, hd = q.shape[1], q.shape[2]
        out = torch.empty_like(q)
        for g in groups:
            G, n, past = len(g.rows), g.n_tokens, g.past
            if G == 1:  # contiguous: plain views, no gather
                tok = slice(g.first, g.first + n)
                qg, kg, vg = q[tok][None], k[tok][None], v[tok][None]
            else:
                qg, kg, vg = (t[g.token_index].view(G, n, -1, hd) for t in (q, k, v))
            kg, vg = kg.transpose(1, 2), vg.transpose(1, 2)  # [G, nkv, n, hd]
            if cache is not None:
                kc, vc = cache.k[self.layer], cache.v[self.layer]
                if update_cache:
                    kc[g.row_index, :, past : past + n] = kg
                    vc[g.row_index, :, past : past + n] = vg
                    keys, values = kc[g.row_index, :, : past + n], vc[g.row_index, :, : past + n]
                else:
                    keys = torch.cat([kc[g.row_index, :, :past], kg], dim=2)
                    values = torch.cat([vc[g.row_index, :, :past], vg], dim=2)
            else:
                keys, values = kg, vg
            outs, offset = [], 0
            for split in g.splits:
                n_keys = past + offset + split.length
                qs = qg[:, offset : offset + split.length].transpose(1, 2)  # [G, nh, Lq, hd]
                outs.append(_sdpa(qs, keys[:, :, :n_keys], values[:, :, :n_keys], split.causal).transpose(1, 2))
                offset += split.length
            og = torch.cat(outs, dim=1).reshape(G * n, nh, hd)
            if G == 1:
                out[g.first : g.first + n] = og
            else:
                out[g.token_index] = og
        return out.flatten(1)

    def _decode_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, update_cache: bool
    ) -> torch.Tensor:
        """One new token per row: write it at position lens[b], attend to the row's first lens[b]+1 keys."""
        B, nh, hd = q.shape
        nkv = k.shape[1]
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        if not update_cache:  # work on a copy so the cache stays untouched
            kc, vc = kc.clone(), vc.clone()
        rows = torch.arange(B, device=q.device)
        kc[rows, :, cache.lens_t] = k
        vc[rows, :, cache.lens_t] = v
        n_keys = cache.capacity if cache.static_decode else max(cache.lens) + 1
        valid = torch.arange(n_keys, device=q.device)[None, :] <= cache.lens_t[:, None]  # [B, n_keys]
        # GQA without repeating the cache: fold the query heads of one kv head into the query axis.
        qg = q.view(B, nkv, nh // nkv, hd)
        with sdpa_kernel(SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(
                qg, kc[:, :, :n_keys], vc[:, :, :n_keys], attn_mask=valid[:, None, None]
            )
        return out.reshape(B, nh * hd)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention of one split for G rows.  q: [G, nh, Lq, hd], k/v: [G, nkv, Lk, hd]; causal is
    bottom-right aligned (query i sees keys up to Lk - Lq + i)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    Lq, Lk = q.shape[2], k.shape[2]
    backends = LONG_QUERY_BACKENDS if not causal and Lq >= LONG_QUERY else SDPA_BACKENDS
    with sdpa_kernel(backends, set_priority=True):
        if causal and Lq > 1:
            mask = causal_lower_right(Lq, Lk) if Lq != Lk else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return F.scaled_dot_product_attention(q, k, v)


@dataclass
class RowGroup:
    """Rows that carry the same splits over the same cached length: their attention runs as one batch."""

    rows: list[int]
    first: int  # packed offset of the first row's tokens (used when the group has one row)
    n_tokens: int  # per row
    past: int
    splits: tuple[Split, ...]
    row_index: torch.Tensor | slice  # [G] cache rows
    token_index: torch.Tensor | None  # [G * n_tokens] packed token positions (None for a single row)


def group_rows(rows: list[list[Split]], cache: KVCache | None, device: torch.device) -> list[RowGroup]:
    """Group rows by (cached length, splits); built once per forward, shared by all layers."""
    by_sig: dict[tuple, list[tuple[int, int]]] = {}
    start = 0
    for b, splits in enumerate(rows):
        n = sum(s.length for s in splits)
        if n:
            past = cache.lens[b] if cache is not None else 0
            by_sig.setdefault((past, tuple(splits)), []).append((b, start))
        start += n
    groups = []
    for (past, splits), members in by_sig.items():
        n = sum(s.length for s in splits)
        bs = [b for b, _ in members]
        if len(members) == 1:
            b, first = members[0]
            groups.append(RowGroup(bs, first, n, past, splits, slice(b, b + 1), None))
        else:
            token_index = torch.tensor([first + i for _, first in members for i in range(n)], device=device)
            groups.append(RowGroup(bs, members[0][1], n, past, splits, torch.tensor(bs, device=device), token_index))
    return groups


class LanguageModel(nn.Module):
    """Token embedding, MoT layers, per-expert final norm and the LM head."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm_und = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        rows: list[list[Split]],
        *,
        cache: KVCache | None = None,
        gen_mask: torch.Tensor | None = None,
        update_cache: bool = True,
        routing: Routing | None = None,
    ) -> torch.Tensor:
        """x: [N, H] input embeddings, pos: [3, N] -> final-normed hidden states [N, H].

        `routing` = `Routing(gen_mask)` built once by the caller for a layout used many times (the
        denoising loop): building it looks at the mask on the host, a sync on GPU.
        """
        if sum(s.length for r in rows for s in r) != x.shape[0]:
            raise ValueError("rows do not add up to the number of packed tokens")
        if cache is not None and len(rows) != cache.batch:
            raise ValueError(f"{len(rows)} rows for a cache of {cache.batch}")
        route = routing if routing is not None else Routing(gen_mask)
        cos, sin = rotary_cos_sin(pos, self.cfg, x.dtype)
        # (Decoding steps take the batched path and need no groups; they may run under CUDA-graph capture.)
        decoding = cache is not None and all(len(r) == 1 and r[0].length == 1 for r in rows)
        groups = [] if decoding else group_rows(rows, cache, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, route, rows, groups, cache, update_cache)
        if cache is not None and update_cache:
            cache.advance([sum(s.length for s in r) for r in rows])
        return route.apply(self.norm_und, self.norm_gen, x)
