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

Pass `routing=Routing(gen_mask)` instead of `gen_mask` to reuse the expert split across many calls, or
`plan=lm.plan(pos, rows, ...)` to reuse the whole layout (`ForwardPlan`: rotary tables, routing,
attention batches) -- the denoising query has the same layout at every step.  `run_layers` and
`final_norm` run parts of a forward (the step cache runs the first layer alone).

`KVCache(cfg, batch, capacity, device, dtype)` holds per-layer keys/values `[B, nkv, capacity, hd]`
and the per-row lengths; row b of the cache is row b of `rows`.  With `update_cache=False` the call
reads the cache without extending it (the denoising query of generation).  Calls where every row has
exactly one token take a batched path (one masked SDPA over the padded cache); everything else runs
one SDPA per split for each group of rows with the same layout and cached length (flash / cuDNN /
memory-efficient kernels on GPU, never a dense [N, N] mask); a bidirectional query over the cache batches
rows of different cached lengths too, padding their keys and masking the padding (`group_rows`).

The experts are built in the checkpoint's layout and fused once after loading (`fuse_projections`: one
q|k|v and one gate|up matmul each).  Routing avoids gathers where one expert has nearly all tokens
(`Routing`), and the gen expert's matmuls can run in FP8 (`ForwardPlan.gen_fp8`, fp8.py).

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
from .fp8 import Fp8Weight, fp8_linear, quantize_weight
from .layers import (
    LONG_QUERY,
    LONG_QUERY_BACKENDS,
    PADDED_KEY_BACKENDS,
    SDPA_BACKENDS,
    RMSNorm,
    fused_on_gpu,
    qk_norm,
    rotate_half,
    silu_mul,
)


@dataclass(frozen=True)
class Split:
    length: int
    causal: bool


# Tokens per MLP call: the MLP's intermediate activations ([tokens, 3 * intermediate]) are the largest
# tensors of a forward; past this many tokens (t2v, big batches) the MLP runs chunk by chunk, which
# bounds them at ~0.6 GB (bf16, Lance-3B) while each matmul still has thousands of rows.
MLP_CHUNK_TOKENS = 8192


class Expert(nn.Module):
    """All weights of one expert ("und" or "gen") in one layer.

    Built in the checkpoint's layout (q/k/v and gate/up projections apart: the loader fills them by name);
    `fuse_projections()`, called once after loading, joins q|k|v into `qkv_proj` and gate|up into
    `gate_up_proj` so that each runs as one matmul.  `fp8_weights()` holds the float8 copies of the four
    matmul weights that the opt-in `fp8` mode uses (made on first use).
    """

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.n_q, self.n_kv, self.head_dim, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, hd, cfg.rms_norm_eps
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
        self._fp8: dict[str, Fp8Weight] | None = None

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """q|k|v -> `qkv_proj`, gate|up -> `gate_up_proj` (the separate modules are dropped), and the q/k
        norm weights laid out per head for `qk_norm`."""
        self.qkv_proj = _joined(self.q_proj, self.k_proj, self.v_proj)
        self.gate_up_proj = _joined(self.gate_proj, self.up_proj)
        del self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.up_proj
        hd = self.head_dim
        weight = torch.cat([self.q_norm.weight.expand(self.n_q, hd), self.k_norm.weight.expand(self.n_kv, hd)])
        self.register_buffer("qk_norm_weight", weight, persistent=False)

    def fp8_weights(self) -> dict[str, Fp8Weight]:
        if self._fp8 is None:
            self._fp8 = {name: quantize_weight(layer.weight, layer.bias) for name, layer in (
                ("qkv_proj", self.qkv_proj), ("o_proj", self.o_proj), ("gate_up_proj", self.gate_up_proj),
                ("down_proj", self.down_proj))}
        return self._fp8

    def linear(self, name: str, x: torch.Tensor, fp8: bool = False) -> torch.Tensor:
        return fp8_linear(x, self.fp8_weights()[name]) if fp8 else getattr(self, name)(x)

    def qkv_heads(self, x: torch.Tensor, fp8: bool = False) -> torch.Tensor:
        """x [n, H] (already attn-normed) -> [n, nh + 2·nkv, hd]: q | k | v heads, q and k RMS-normed per head."""
        qkv = self.linear("qkv_proj", x, fp8).unflatten(-1, (-1, self.head_dim))
        return qk_norm(qkv, self.qk_norm_weight, self.eps)

    def qkv(self, x: torch.Tensor, hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [n, nh, hd], k [n, nkv, hd], v [n, nkv, hd]): views of `qkv_heads`."""
        return self.qkv_heads(x).split([self.n_q, self.n_kv, self.n_kv], dim=1)

    def mlp(self, x: torch.Tensor, fp8: bool = False) -> torch.Tensor:
        """SwiGLU MLP of x [n, H], in chunks of `MLP_CHUNK_TOKENS` tokens."""
        if x.shape[0] <= MLP_CHUNK_TOKENS:
            return self.linear("down_proj", silu_mul(self.linear("gate_up_proj", x, fp8)), fp8)
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], MLP_CHUNK_TOKENS):
            out[start : start + MLP_CHUNK_TOKENS] = self.mlp(x[start : start + MLP_CHUNK_TOKENS], fp8)
        return out


def _joined(*layers: nn.Linear) -> nn.Linear:
    """One Linear whose output is the outputs of `layers` side by side."""
    weight = torch.cat([layer.weight for layer in layers])
    joined = nn.Linear(weight.shape[1], weight.shape[0], bias=layers[0].bias is not None, device="meta")
    joined.weight = nn.Parameter(weight, requires_grad=False)
    if joined.bias is not None:
        joined.bias = nn.Parameter(torch.cat([layer.bias for layer in layers]), requires_grad=False)
    return joined


class Routing:
    """Which packed tokens go to which expert, and how `apply` runs the two experts over them.

    * every token with one expert: that expert on `x` as it is;
    * a few tokens of one expert among many of the other (the denoising query: 2 und tokens per row of
      thousands of latents): the majority expert runs on ALL tokens -- no gather of its input, no scatter
      of its output -- and the minority's outputs overwrite their rows.  The wasted rows cost at most
      `MAJORITY_ROUTING_SHARE` more matmul work, less than moving every activation through index copies;
    * otherwise (the prefill of edits: text, ViT and latent spans) each expert gets its tokens gathered
      and its outputs scattered back.
    Building it reads the mask on the host (a sync on GPU): build it once per layout.
    """

    MAJORITY_ROUTING_SHARE = 1 / 32

    def __init__(self, gen_mask: torch.Tensor | None) -> None:
        n = 0 if gen_mask is None else gen_mask.numel()
        n_gen = 0 if gen_mask is None else int(gen_mask.sum())
        self.majority: str | None = "gen" if n and n_gen * 2 > n else "und"
        self.minority_index: torch.Tensor | None = None
        n_minority = min(n_gen, n - n_gen)
        if n_minority == 0:
            return
        if n_minority <= n * self.MAJORITY_ROUTING_SHARE:
            self.minority_index = (gen_mask if self.majority == "und" else ~gen_mask).nonzero().squeeze(1)
            return
        self.majority = None
        self.und_index = (~gen_mask).nonzero().squeeze(1)
        self.gen_index = gen_mask.nonzero().squeeze(1)

    def apply(self, und, gen, x: torch.Tensor) -> torch.Tensor:
        if self.majority is not None:
            major, minor = (und, gen) if self.majority == "und" else (gen, und)
            out = major(x)
            if self.minority_index is not None:
                out[self.minority_index] = minor(x[self.minority_index])
            return out
        out_u, out_g = und(x[self.und_index]), gen(x[self.gen_index])
        out = out_u.new_empty((x.shape[0], *out_u.shape[1:]))
        out[self.und_index] = out_u
        out[self.gen_index] = out_g
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

    def forward(self, x: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        und, gen, route, fp8 = self.und, self.gen, plan.route, plan.gen_fp8
        nh, nkv = self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        qkv = route.apply(lambda t: und.qkv_heads(und.attn_norm(t)),
                          lambda t: gen.qkv_heads(gen.attn_norm(t), fp8), x)  # [N, nh + 2*nkv, hd]
        qk = apply_rotary(qkv[:, : nh + nkv], plan.cos, plan.sin)  # q and k heads in one pass
        attn = self._attention(qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :], plan)  # [N, nh*hd]
        x = x + route.apply(und.o_proj, lambda t: gen.linear("o_proj", t, fp8), attn)
        return x + route.apply(lambda t: und.mlp(und.mlp_norm(t)), lambda t: gen.mlp(gen.mlp_norm(t), fp8), x)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        # q: [N, nh, hd], k/v: [N, nkv, hd] packed over rows
        cache, update_cache = plan.cache, plan.update_cache
        if plan.decoding:
            return self._decode_attention(q, k, v, cache, update_cache)
        nh, hd = q.shape[1], q.shape[2]
        out = None
        for g in plan.groups:
            G, n = len(g.rows), g.n_tokens
            qg, kg, vg = (t[g.token_index].view(G, n, -1, hd) for t in (q, k, v))  # views when consecutive
            kg, vg = kg.transpose(1, 2), vg.transpose(1, 2)  # [G, nkv, n, hd]
            past = max(g.pasts)  # cached keys in front of this call's (padded and masked when they differ)
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
                mask = None if g.key_mask is None else g.key_mask[..., :n_keys]
                outs.append(_sdpa(qs, keys[:, :, :n_keys], values[:, :, :n_keys], split.causal, mask).transpose(1, 2))
                offset += split.length
            og = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).reshape(G * n, nh, hd)
            if len(plan.groups) == 1 and isinstance(g.token_index, slice) and g.token_index == slice(0, q.shape[0]):
                return og.flatten(1)  # one group of every token in order: no copy
            if out is None:
                out = torch.empty_like(q)
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


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
          key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one split for G rows.  q: [G, nh, Lq, hd], k/v: [G, nkv, Lk, hd]; causal is
    bottom-right aligned (query i sees keys up to Lk - Lq + i); key_mask: additive [G, 1, 1, Lk] (padding)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    Lq, Lk = q.shape[2], k.shape[2]
    if key_mask is not None:
        with sdpa_kernel(PADDED_KEY_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    backends = LONG_QUERY_BACKENDS if not causal and Lq >= LONG_QUERY else SDPA_BACKENDS
    with sdpa_kernel(backends, set_priority=True):
        if causal and Lq > 1:
            mask = causal_lower_right(Lq, Lk) if Lq != Lk else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return F.scaled_dot_product_attention(q, k, v)


@dataclass
class RowGroup:
    """Rows whose attention runs as one batch: the same splits over the same cached length -- or, for a
    query that reads the cache without extending it and attends bidirectionally (the denoising target),
    over cached lengths that differ: the cached keys are then padded to the longest and masked."""

    rows: list[int]
    n_tokens: int  # per row
    pasts: tuple[int, ...]  # cached length of each row
    splits: tuple[Split, ...]
    row_index: torch.Tensor | slice  # [G] cache rows (a slice when consecutive)
    token_index: torch.Tensor | slice  # [G * n_tokens] packed tokens (a slice when the rows are adjacent)
    key_mask: torch.Tensor | None  # additive [G, 1, 1, max(pasts) + n_tokens] when the pasts differ


# Distinct cached lengths among rows of one bidirectional query layout up to which each length keeps its
# own attention call (exact shapes: flash/cuDNN kernels); past it, the rows alone at their length share one
# padded, masked call (the memory-efficient kernel) -- e.g. the conditional rows of a batch of different
# prompts, while the unconditional rows (one shared prefix) stay one unmasked call.
MAX_UNPADDED_LENGTHS = 4


def group_rows(rows: list[list[Split]], cache: KVCache | None, device: torch.device,
               dtype: torch.dtype = torch.float32, pad_cached: bool = False) -> list[RowGroup]:
    """Group rows by splits and cached length; with `pad_cached` (a query that reads the cache without
    extending it), bidirectional rows alone at their cached length are padded into one group when there
    are more than `MAX_UNPADDED_LENGTHS` lengths.  Built once per layout, shared by all layers."""
    by_sig: dict[tuple, list[tuple[int, int, int]]] = {}  # (past, splits) -> [(row, packed start, past)]
    start = 0
    for b, splits in enumerate(rows):
        n = sum(s.length for s in splits)
        if n:
            past = cache.lens[b] if cache is not None else 0
            by_sig.setdefault((past, tuple(splits)), []).append((b, start, past))
        start += n
    if pad_cached and cache is not None:
        by_sig = _pad_lone_rows(by_sig)
    groups = []
    for (_, splits), members in by_sig.items():
        n = sum(s.length for s in splits)
        bs, starts, pasts = (list(t) for t in zip(*members, strict=True))
        row_index = _as_slice(bs) or torch.tensor(bs, device=device)
        token_index = _as_slice([st + i for st in starts for i in range(n)])
        if token_index is None:
            token_index = torch.tensor([st + i for st in starts for i in range(n)], device=device)
        groups.append(RowGroup(bs, n, tuple(pasts), splits, row_index, token_index,
                               _padding_mask(pasts, n, device, dtype)))
    return groups


def _pad_lone_rows(by_sig: dict[tuple, list]) -> dict[tuple, list]:
    """Merge the one-row groups of each bidirectional layout into one padded group (key past = None)."""
    lengths: dict[tuple, int] = {}
    for _, splits in by_sig:
        lengths[splits] = lengths.get(splits, 0) + 1
    merged: dict[tuple, list] = {}
    for (past, splits), members in by_sig.items():
        alone = len(members) == 1 and lengths[splits] > MAX_UNPADDED_LENGTHS and not any(s.causal for s in splits)
        merged.setdefault((None, splits) if alone else (past, splits), []).extend(members)
    for key in [k for k in merged if k[0] is None]:  # keep rows in packing order inside the padded group
        merged[key].sort()
    return merged


def _as_slice(index: list[int]) -> slice | None:
    """`index` as a slice when it is a run of consecutive integers."""
    if index == list(range(index[0], index[0] + len(index))):
        return slice(index[0], index[0] + len(index))
    return None


def _padding_mask(pasts: list[int], n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive key mask [G, 1, 1, max(pasts) + n]: row g sees its own pasts[g] cached keys and all n new ones.
    Its rows are laid out 16-element aligned, as the memory-efficient attention kernel wants."""
    longest = max(pasts)
    if longest == min(pasts):
        return None
    width = longest + n
    mask = torch.zeros(len(pasts), 1, 1, -(-width // 16) * 16, dtype=dtype)[..., :width]
    for g, past in enumerate(pasts):
        mask[g, ..., past:longest] = float("-inf")
    return mask.to(device)


@dataclass
class ForwardPlan:
    """Everything a forward needs besides the activations: built once per token layout and reused while the
    layout and the cache lengths stay the same (the denoising query of every step)."""

    rows: list[list[Split]]
    cos: torch.Tensor  # [N, hd] rotary tables of the packed tokens
    sin: torch.Tensor
    route: Routing
    groups: list[RowGroup]  # attention batches (none while decoding)
    cache: KVCache | None
    update_cache: bool
    decoding: bool  # one token per row over a cache: the batched decoding path
    gen_fp8: bool  # the gen expert's matmuls in FP8 (the `fp8` speed mode)

    @property
    def n_tokens(self) -> int:
        return sum(s.length for r in self.rows for s in r)


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

    def fuse_projections(self) -> None:
        """Join every expert's q/k/v and gate/up projections (once, after loading; forwards need it)."""
        for layer in self.layers:
            layer.und.fuse_projections()
            layer.gen.fuse_projections()

    def plan(
        self,
        pos: torch.Tensor,
        rows: list[list[Split]],
        *,
        dtype: torch.dtype,
        cache: KVCache | None = None,
        gen_mask: torch.Tensor | None = None,
        update_cache: bool = True,
        routing: Routing | None = None,
        gen_fp8: bool = False,
    ) -> ForwardPlan:
        """The layout of a forward (arguments as `forward`'s) -- build it once to run it many times."""
        if not hasattr(self.layers[0].und, "qkv_proj"):
            raise RuntimeError("call fuse_projections() once after loading the weights")
        if cache is not None and len(rows) != cache.batch:
            raise ValueError(f"{len(rows)} rows for a cache of {cache.batch}")
        cos, sin = rotary_cos_sin(pos, self.cfg, dtype)
        # Decoding steps take the batched path and need no groups (no host-to-device copy: they may run
        # under CUDA-graph capture).
        decoding = cache is not None and all(len(r) == 1 and r[0].length == 1 for r in rows)
        groups = [] if decoding else group_rows(rows, cache, pos.device, dtype,
                                                pad_cached=cache is not None and not update_cache)
        route = routing if routing is not None else Routing(gen_mask)
        return ForwardPlan(rows, cos, sin, route, groups, cache, update_cache, decoding, gen_fp8)

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
        plan: ForwardPlan | None = None,
    ) -> torch.Tensor:
        """x: [N, H] input embeddings, pos: [3, N] -> final-normed hidden states [N, H].

        `routing` = `Routing(gen_mask)` built once by the caller for a layout used many times; `plan` = the
        whole layout, `self.plan(pos, rows, ...)` with these same arguments (the denoising loop: its query
        has the same layout at every step).
        """
        if sum(s.length for r in rows for s in r) != x.shape[0]:
            raise ValueError("rows do not add up to the number of packed tokens")
        if plan is None:
            plan = self.plan(pos, rows, dtype=x.dtype, cache=cache, gen_mask=gen_mask, update_cache=update_cache,
                             routing=routing)
        x = self.run_layers(x, plan)
        if plan.cache is not None and plan.update_cache:
            plan.cache.advance([sum(s.length for s in r) for r in plan.rows])
        return self.final_norm(x, plan)

    def run_layers(self, x: torch.Tensor, plan: ForwardPlan, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Layers [start, stop) on x [N, H] (the residual stream, not normed)."""
        for layer in self.layers[start:stop]:
            x = layer(x, plan)
        return x

    def final_norm(self, x: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        return plan.route.apply(self.norm_und, self.norm_gen, x)
