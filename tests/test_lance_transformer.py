"""MoT backbone: attention modes, KV cache, batching, expert routing, MRoPE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lance_ray.models.lance.checkpoint import resolve_checkpoint
from lance_ray.models.lance.loader import load_lance_model
from lance_ray.models.lance.transformer import KVCache, Split, rotary_cos_sin


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path):
    return load_lance_model(resolve_checkpoint(str(tiny_ckpt), "image"), "cpu", torch.float32)[0]


def _inputs(n: int, seed: int, H: int = 128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, generator=g), torch.arange(n).expand(3, -1) + 3


def _dense_reference(model, x, pos, splits, gen_mask):
    """Official mask semantics (create_sparse_mask): causal, plus bidirectional inside full/noise splits;
    computed with a dense mask through a hand-written attention."""
    import torch.nn.functional as F

    from lance_ray.models.lance.transformer import apply_rotary

    n = x.shape[0]
    seg = torch.cat([torch.full((s.length,), i) for i, s in enumerate(splits)])
    full = torch.tensor([not s.causal for s in splits])[seg]
    q_i, k_i = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (k_i <= q_i) | ((seg[:, None] == seg[None, :]) & full[:, None])
    cfg = model.llm_cfg
    cos, sin = rotary_cos_sin(pos, cfg, x.dtype)
    for layer in model.llm.layers:
        outs = []
        for idx in range(n):
            e = layer.gen if gen_mask[idx] else layer.und
            outs.append(torch.cat([*e.qkv(e.attn_norm(x[idx:idx + 1]), cfg.head_dim)], dim=1))
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        q, k, v = torch.cat(outs).split([nh, nkv, nkv], 1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed)
        att = att.transpose(0, 1).flatten(1)
        x = x + torch.stack([(layer.gen if gen_mask[i] else layer.und).o_proj(att[i]) for i in range(n)])
        x = x + torch.stack([(lambda e, t: e.mlp(e.mlp_norm(t)))(layer.gen if gen_mask[i] else layer.und, x[i])
                             for i in range(n)])
    return torch.stack([(model.llm.norm_gen if gen_mask[i] else model.llm.norm_und)(x[i]) for i in range(n)])


@torch.inference_mode()
def test_split_modes_and_expert_routing_match_dense_reference(model) -> None:
    splits = [Split(6, True), Split(5, False), Split(7, False), Split(3, True)]
    x, pos = _inputs(21, 0)
    gen_mask = torch.zeros(21, dtype=torch.bool)
    gen_mask[12:17] = True  # latent tokens inside the third split (framed by und tokens)
    ours = model.llm(x, pos, [splits], gen_mask=gen_mask)
    torch.testing.assert_close(ours, _dense_reference(model, x, pos, splits, gen_mask), atol=2e-5, rtol=2e-5)
    assert not torch.allclose(ours, model.llm(x, pos, [splits]))  # routing matters


@torch.inference_mode()
def test_cached_split_by_split_equals_one_pass(model) -> None:
    splits = [Split(6, True), Split(5, False), Split(7, True)]
    x, pos = _inputs(18, 1)
    one_pass = model.llm(x, pos, [splits])
    cache = KVCache(model.llm_cfg, 1, 32, "cpu", torch.float32)
    parts, start = [], 0
    for s in splits:
        parts.append(model.llm(x[start:start + s.length], pos[:, start:start + s.length], [[s]], cache=cache))
        start += s.length
    torch.testing.assert_close(torch.cat(parts), one_pass, atol=1e-5, rtol=1e-5)
    assert cache.lens == [18]
    # A query that does not update the cache sees the cache plus itself and leaves the cache as it was.
    q, qpos = _inputs(4, 2)
    k_before = cache.k[0].clone()
    peek = model.llm(q, qpos + 20, [[Split(4, False)]], cache=cache, update_cache=False)
    assert torch.equal(cache.k[0], k_before) and cache.lens == [18]
    full = model.llm(torch.cat([x, q]), torch.cat([pos, qpos + 20], 1), [[*splits, Split(4, False)]])
    torch.testing.assert_close(peek, full[18:], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_rows_are_independent_and_batched_decode_matches(model) -> None:
    lens = [5, 9, 2]
    xs = [_inputs(n, 10 + i) for i, n in enumerate(lens)]
    cache = KVCache(model.llm_cfg, 3, 16, "cpu", torch.float32)
    packed = model.llm(torch.cat([x for x, _ in xs]), torch.cat([p for _, p in xs], 1),
                       [[Split(n, True)] for n in lens], cache=cache)
    alone = [model.llm(x, p, [[Split(n, True)]]) for (x, p), n in zip(xs, lens, strict=True)]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    # One decoding step for all rows (batched path) == appending the token to each row's full pass.
    step, _ = _inputs(3, 20)
    step_pos = torch.tensor([p[0, -1] + 1 for _, p in xs]).expand(3, -1)
    batched = model.llm(step, step_pos, [[Split(1, True)]] * 3, cache=cache)
    for b, ((x, p), n) in enumerate(zip(xs, lens, strict=True)):
        ref = model.llm(torch.cat([x, step[b:b + 1]]), torch.cat([p, step_pos[:, b:b + 1]], 1), [[Split(n + 1, True)]])
        torch.testing.assert_close(batched[b], ref[-1], atol=1e-5, rtol=1e-5)
    assert cache.lens == [6, 10, 3]


def test_mrope_sections(model) -> None:
    cfg = model.llm_cfg  # head_dim 32, sections [4, 6, 6]
    pos = torch.tensor([[7], [100], [1000]])
    cos, _ = rotary_cos_sin(pos, cfg, torch.float32)
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, 32, 2).float() / 32)
    axis = [0] * 4 + [1] * 6 + [2] * 6
    expected = torch.cos(torch.tensor([float(pos[a, 0]) for a in axis]) * inv_freq)
    torch.testing.assert_close(cos[0], torch.cat([expected, expected]))


@torch.inference_mode()
def test_static_decode_shapes_give_the_same_step(model) -> None:
    # CUDA-graph decoding attends over the whole (masked) capacity; results must not change.
    x, pos = _inputs(7, 30)
    outs = []
    for static in (False, True):
        cache = KVCache(model.llm_cfg, 1, 40, "cpu", torch.float32)
        cache.static_decode = static
        model.llm(x[:6], pos[:, :6], [[Split(6, True)]], cache=cache)
        outs.append(model.llm(x[6:], pos[:, 6:], [[Split(1, True)]], cache=cache))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)


@torch.inference_mode()
def test_rows_with_identical_layouts_are_batched_without_changing_results(model) -> None:
    # Rows 0, 2, 3 share splits (one attention batch), row 1 differs; each must match its lone run.
    layouts = [[Split(4, True), Split(3, False)], [Split(5, True)], [Split(4, True), Split(3, False)],
               [Split(4, True), Split(3, False)]]
    xs = [_inputs(sum(s.length for s in r), 40 + i) for i, r in enumerate(layouts)]
    for with_cache in (False, True):
        cache = KVCache(model.llm_cfg, 4, 16, "cpu", torch.float32) if with_cache else None
        packed = model.llm(torch.cat([x for x, _ in xs]), torch.cat([p for _, p in xs], 1), layouts, cache=cache)
        alone = torch.cat([model.llm(x, p, [r]) for (x, p), r in zip(xs, layouts, strict=True)])
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # ...and the cache rows hold the same keys as separate caches would.
    single = KVCache(model.llm_cfg, 1, 16, "cpu", torch.float32)
    model.llm(xs[2][0], xs[2][1], [layouts[2]], cache=single)
    torch.testing.assert_close(cache.k[1][2, :, :7], single.k[1][0, :, :7], atol=1e-5, rtol=1e-5)
