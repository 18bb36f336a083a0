"""The CFG branches of a denoising batch at run time: their KV caches, and the target query run over them
at every step (`denoise` in generate.py drives it).

A `Lane` is one language model with one KV cache that holds the prefixes of one or both branches of B
samples: the conditional rows [0, B), then the unconditional rows [B, 2B) when they share the lane.  The
exact path has one lane for both branches, so a step with CFG is ONE forward of 2B rows.  CFG-parallel
(the `cfg_parallel` speed mode) gives the unconditional branch its own lane on a second GPU, with a replica
of the language model there: the two branches of a step then run at the same time.

Per step, `Lane.velocities(query, active)` runs the target query `[<|vision_start|>, latents, <|vision_end|>]`
of the active branches over their caches (without extending them) and returns each branch's velocity.
How, depends on the speed modes and the device:
* eagerly, through `LanguageModel.forward` with a `ForwardPlan` built once per set of active branches;
* on CUDA, replayed as a CUDA graph from the third use of a plan on (the first run is eager and compiles
  the fused kernels, the second runs on a side stream and then captures; `LANCE_RAY_CUDA_GRAPHS=0` turns
  graphs off; a capture that fails is logged and the lane stays eager);
* with `step_cache` (First-Block-Cache family, `StepCache` below): the first layer runs for every active
  branch, and the other layers only for a branch whose first-layer output changed enough since its last
  full step; otherwise its last deep-layer residual is reused.  Each branch keeps its own state.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from .latent import LatentAdapter
from .layers import compiled_kernels_in_capture
from .transformer import ForwardPlan, KVCache, LanguageModel, Routing, Split

log = logging.getLogger(__name__)

CUDA_GRAPHS = os.environ.get("LANCE_RAY_CUDA_GRAPHS", "1") != "0"
BRANCHES = ("cond", "uncond")


class StepCache:
    """`step_cache` state of one CFG branch.

    At each step the branch's first layer runs; its residual r_t (output - input) is compared with the
    previous step's: the relative change |r_t - r_{t-1}|_1 / |r_{t-1}|_1 accumulates since the last step
    whose deep layers ran, and while the sum stays under the threshold the deep layers are skipped: their
    output is the first layer's output plus the deep residual (last layers' output - first layer's output)
    of that last full step.  Accumulating bounds the drift of a run of skipped steps; the first step always
    runs in full.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.previous: torch.Tensor | None = None  # first-layer residual of the previous step
        self.deep_residual: torch.Tensor | None = None
        self.accumulated = 0.0
        self.skipped = 0

    def can_skip(self, first_residual: torch.Tensor) -> bool:
        skip = False
        if self.previous is not None and self.deep_residual is not None:
            change = (first_residual - self.previous).float().abs().mean() / self.previous.float().abs().mean()
            self.accumulated += float(change)  # one host sync per branch and step
            skip = self.accumulated < self.threshold
        self.previous = first_residual
        if skip:
            self.skipped += 1
        else:
            self.accumulated = 0.0
        return skip


_side_streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}


def side_stream(device: torch.device, purpose: str) -> torch.cuda.Stream:
    """One extra CUDA stream per device and purpose, reused (memory a stream's work frees is cached for
    that stream: a new stream per batch would strand it)."""
    if (device, purpose) not in _side_streams:
        _side_streams[device, purpose] = torch.cuda.Stream(device)
    return _side_streams[device, purpose]


class _Graph:
    """`fn(x)` recorded as a CUDA graph on x's device: copy the input in, replay, copy the output out."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 pool: tuple[int, int] | None) -> None:
        self.input = x.clone()
        self.graph = torch.cuda.CUDAGraph()
        with compiled_kernels_in_capture(), torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(self.input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.input.copy_(x)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the static output


class Lane:
    """One language model and one KV cache holding the prefixes of `branches` for B samples."""

    def __init__(self, llm: LanguageModel, latent: LatentAdapter, branches: tuple[str, ...], batch: int, *,
                 gen_fp8: bool = False, step_cache: float = 0.0) -> None:
        self.llm, self.latent, self.branches, self.batch = llm, latent, branches, batch
        self.device, self.dtype = llm.embed.weight.device, llm.embed.weight.dtype
        self.gen_fp8 = gen_fp8
        self.cache: KVCache | None = None
        self.step_cache = {b: StepCache(step_cache) for b in branches} if step_cache > 0 else None
        self.use_graphs = CUDA_GRAPHS and self.device.type == "cuda" and self.step_cache is None
        self._plans: dict[tuple[str, ...], ForwardPlan] = {}
        self._positions: dict[tuple[str, ...], torch.Tensor] = {}
        self._graphs: dict[tuple[str, ...], _Graph] = {}
        self._uses: Counter[tuple[str, ...]] = Counter()
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # ---- prefill ----------------------------------------------------------------------------------------
    def prefill(self, prefixes: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Split]]]]) -> None:
        """Fill the cache: per branch, B rows of (embeddings [n, H], positions [3, n], gen mask [n], splits)."""
        xs, pos, gen, rows = [], [], [], []
        for branch in self.branches:
            for x, p, g, splits in prefixes[branch]:
                xs.append(x)
                pos.append(p)
                gen.append(g)
                rows.append(splits)
        capacity = max(sum(s.length for s in r) for r in rows)
        self.cache = KVCache(self.llm.cfg, len(rows), capacity, self.device, self.dtype)
        self.llm(torch.cat(xs).to(self.device), torch.cat(pos, dim=1).to(self.device), rows, cache=self.cache,
                 gen_mask=torch.cat(gen).to(self.device))

    # ---- the per-step query -------------------------------------------------------------------------------
    def set_query_layout(self, query_len: int, positions: dict[str, torch.Tensor], gen_row: torch.Tensor) -> None:
        """The target query of every row: `query_len` tokens at `positions[branch]` ([3, B * query_len]) with
        `gen_row` [query_len] saying which use the gen expert (all but the start and end tokens)."""
        self.query_len, self.gen_row = query_len, gen_row.to(self.device)
        self._branch_positions = {b: positions[b].to(self.device) for b in self.branches}

    def velocities(self, query: torch.Tensor, active: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """query [B, Lq, H] -> velocity [B, Lq - 2, 48] of each active branch this lane holds."""
        active = tuple(b for b in self.branches if b in active)
        if not active:
            return {}
        x = query.to(self.device, non_blocking=True)
        x = (x.repeat(len(active), 1, 1) if len(active) > 1 else x).reshape(-1, x.shape[-1])
        if self.step_cache is not None:
            v = self._cached_forward(x, active)
        else:
            v = self._graphed_forward(x, active) if self.use_graphs else self._forward(x, active)
        return dict(zip(active, v.split(self.batch), strict=True))

    def _plan(self, active: tuple[str, ...]) -> ForwardPlan:
        if active not in self._plans:
            rows = [[Split(self.query_len, False)] if branch in active else []
                    for branch in self.branches for _ in range(self.batch)]
            self._positions[active] = torch.cat([self._branch_positions[b] for b in active], dim=1)
            routing = Routing(self.gen_row.repeat(len(active) * self.batch))
            self._plans[active] = self.llm.plan(self._positions[active], rows, dtype=self.dtype, cache=self.cache,
                                                update_cache=False, routing=routing, gen_fp8=self.gen_fp8)
        return self._plans[active]

    def _velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.latent.velocity(hidden.view(-1, self.query_len, hidden.shape[-1])[:, 1:-1])

    def _forward(self, x: torch.Tensor, active: tuple[str, ...]) -> torch.Tensor:
        plan = self._plan(active)
        hidden = self.llm(x, self._positions[active], plan.rows, cache=self.cache, routing=plan.route,
                          update_cache=False, plan=plan)
        return self._velocity(hidden)

    def _graphed_forward(self, x: torch.Tensor, active: tuple[str, ...]) -> torch.Tensor:
        if active in self._graphs:
            return self._graphs[active](x)
        self._uses[active] += 1
        if self._uses[active] == 1:  # eager warm-up: compiles the fused kernels, plans attention
            return self._forward(x, active)
        # Second use: run it on a side stream (the capture recipe's warm-up), then capture it.
        side = side_stream(self.device, "capture warm-up")
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            v = self._forward(x, active)
        torch.cuda.current_stream(self.device).wait_stream(side)
        try:
            with torch.cuda.device(self.device):
                self._graphs[active] = _Graph(lambda t: self._forward(t, active), x, self._pool)
        except Exception as exc:  # whatever cannot be captured: this lane stays eager, generation goes on
            log.warning("denoising step not captured as a CUDA graph (%s); running it eagerly", exc)
            self.use_graphs = False
        return v

    def _cached_forward(self, x: torch.Tensor, active: tuple[str, ...]) -> torch.Tensor:
        plan = self._plan(active)
        first = self.llm.run_layers(x, plan, 0, 1)
        per_branch = dict(zip(active, first.split(self.batch * self.query_len), strict=True))
        inputs = dict(zip(active, x.split(self.batch * self.query_len), strict=True))
        full = tuple(b for b in active if not self.step_cache[b].can_skip(per_branch[b] - inputs[b]))
        deep: dict[str, torch.Tensor] = {}
        if full:
            start = first if full == active else per_branch[full[0]]
            out = self.llm.run_layers(start, self._plan(full), 1)
            for branch, h in zip(full, out.split(self.batch * self.query_len), strict=True):
                self.step_cache[branch].deep_residual = h - per_branch[branch]
                deep[branch] = h
        last = [deep[b] if b in deep else per_branch[b] + self.step_cache[b].deep_residual for b in active]
        return self._velocity(self.llm.final_norm(torch.cat(last) if len(last) > 1 else last[0], plan))

    def skipped_steps(self) -> dict[str, int]:
        """Per branch, how many steps reused the deep layers (step cache)."""
        return {b: s.skipped for b, s in (self.step_cache or {}).items()}


def replicate(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of an inference module on `device`: parameters and buffers are copied there directly (never a
    second copy on the source device); FP8 weight copies are not copied, the replica makes its own."""
    memo: dict[int, object] = {id(p): nn.Parameter(p.detach().to(device), requires_grad=False)
                               for p in module.parameters()}
    memo.update({id(b): b.to(device) for b in module.buffers()})
    memo.update({id(sub._fp8): None for sub in module.modules() if getattr(sub, "_fp8", None) is not None})
    return copy.deepcopy(module, memo)
