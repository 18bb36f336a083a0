"""Understanding (x2t) with continuous batching: a pool of decode slots that never waits for its slowest row.

Reproduces the official KV path (`modeling/lance/lance.py`, `Lance.validation_und_KVcache`) per row:
prefill the prompt split by split (text causal, each visual block bidirectional) except its last token;
then feed that last token and every generated token one at a time, greedy argmax over the first
`len(tokenizer)` logits (or nucleus sampling), stop after `<|im_end|>` or the row's `max_new_tokens`.

`DecodeEngine` does this for many rows at once. It owns S slots of KV cache of C tokens each:
* `admit(requests)` puts rows into free slots: one ViT pass over their visuals, one packed prefill
  that writes each row's keys/values straight into its slot (rows never attend to each other);
* `run()` decodes `check_every` steps for every slot in one batched forward per step (a CUDA graph on
  GPUs: the shapes never change), then looks at the new tokens once on the host and hands back the rows
  that ended. Their slots are free for the next `admit`, while the other rows keep decoding.
So a batch no longer decodes until its longest row ends, rows of any length share the decode steps, and
a row's answer is the one it gets alone (checked in fp32 on CPU by the tests).

Slots are padded to C tokens (the longest prompt + max_new_tokens + a `check_every` margin: a row
decodes a few steps past its end before the host notices). `slots_for_memory` sizes S from the free
GPU memory. A decode step runs only over the slots in use: the lowest free slots are filled first, and
the step covers the first b slots, b the smallest power of two (or S) that holds every active one, with
one CUDA graph per b — so a half-empty engine costs half a step, and a deep pool of slots reserved for
long rows costs nothing until rows fill it. Sampling draws from a per-row generator seeded with the row's seed, so a row's sample does
not depend on its neighbours either.

Prefix reuse: every prompt starts with the same text (the system prompt and the user turn's header, up
to the first visual), at the same positions, so its keys/values are the same for every row with that
system prompt. The engine computes them once per distinct prefix and copies them into each new row's
slot; the row's prefill starts after them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .model import LanceModel
from .preprocess import vit_patches
from .sequence import UnderstandingLayout
from .tokenizer import IM_END
from .transformer import KVCache, LanguageModel, Split

CHECK_EVERY = 16  # decoding steps between looks at the new tokens on the host (each look is a device sync)
ADMIT_TOKENS = 32_768  # prompt tokens prefilled in one admission at most (bounds the ViT + prefill activations)
# GPU memory one admitted prompt token needs during its ViT + prefill pass (measured about 200 KB on an H200
# at image_768res, bf16): the admission budget of a small card comes from its activation reserve.
ADMIT_BYTES_PER_TOKEN = 256 << 10


@dataclass
class Request:
    """One row to answer. `visuals` are its visuals as ViT-stream frames (uint8 [T, H, W, 3], already
    resized to the preset's bucket; pinned CPU memory makes the copy to the GPU asynchronous), or
    `vit_tokens` when the ViT outputs were computed already (parity tests)."""

    layout: UnderstandingLayout
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy (the official default)
    top_p: float = 1.0
    seed: int = 0
    visuals: list[torch.Tensor] = field(default_factory=list)
    vit_tokens: list[torch.Tensor] | None = None
    tag: Any = None  # the caller's handle, returned with the answer

    @property
    def prompt_len(self) -> int:
        return len(self.layout.prompt_ids)


@dataclass
class Answer:
    request: Request
    ids: list[int]  # generated ids, up to and including <|im_end|> when it came
    first_logits: torch.Tensor | None = None  # [V] float32 logits of the first step (parity tests)


def prompt_embeddings(model: LanceModel, layout: UnderstandingLayout, vit_tokens: list[torch.Tensor]) -> torch.Tensor:
    """Token embeddings of the prompt with each visual's ViT outputs in its placeholder span.  -> [P, H]"""
    x = model.llm.embed(layout.prompt_ids.to(model.llm.embed.weight.device))
    for (a, b), tokens in zip(layout.visual_spans, vit_tokens, strict=True):
        if tokens.shape[0] != b - a:
            raise ValueError(f"{tokens.shape[0]} ViT tokens for a span of {b - a}")
        x[a:b] = tokens.to(x.dtype)
    return x


def normalize_answer(text: str) -> str:
    """The official `normalize_understanding_answer`: drop `<|im_end|>`, strip whitespace."""
    return text.replace(IM_END, "").strip()


def capacity_for(requests: Iterable[Request], check_every: int = CHECK_EVERY) -> int:
    """KV slot size (tokens) that holds every one of `requests`, rounded up to a multiple of 64."""
    need = max(r.prompt_len - 1 + r.max_new_tokens for r in requests) + check_every
    return -(-need // 64) * 64


def kv_bytes_per_token(llm: LanguageModel) -> int:
    cfg = llm.cfg
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * llm.embed.weight.element_size()


def slots_for_memory(llm: LanguageModel, capacity: int, free_bytes: int, *, reserve_bytes: int,
                     max_slots: int = 256) -> int:
    """How many slots of `capacity` tokens fit in `free_bytes` after keeping `reserve_bytes` for the
    activations of prefill and the ViT (at least one slot)."""
    per_slot = capacity * kv_bytes_per_token(llm)
    return max(1, min(max_slots, (free_bytes - reserve_bytes) // per_slot))


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token from softmax(logits / T) restricted to the top-p nucleus.  logits: [V] -> [1]"""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)


class DecodeStep:
    """Logits of one decoding step (one token per slot).  With `cuda_graph` the step is recorded once
    as a CUDA graph and replayed: a decoding step is hundreds of tiny kernels whose launch cost would
    otherwise dominate (the cache's `static_decode` keeps every step's shapes identical)."""

    def __init__(self, llm: LanguageModel, cache: KVCache, vocab_limit: int, cuda_graph: bool) -> None:
        self.llm, self.cache, self.vocab_limit = llm, cache, vocab_limit
        self.rows = [[Split(1, True)] for _ in range(cache.batch)]
        self.cuda_graph = cuda_graph
        cache.static_decode = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def _logits(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = self.llm.lm_head(self.llm(self.llm.embed(tokens), pos, self.rows, cache=self.cache))
        logits[:, self.vocab_limit:] = float("-inf")
        return logits

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph:
            return self._logits(tokens, pos)
        cache = self.cache
        if self.graph is None:
            self.tokens, self.pos = tokens.clone(), pos.clone()
            lens, lens_t = list(cache.lens), cache.lens_t.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up; it writes exactly the k/v the replay writes again
                self._logits(self.tokens, self.pos)
            torch.cuda.current_stream().wait_stream(side)
            cache.lens_t.copy_(lens_t)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._logits(self.tokens, self.pos)
            cache.lens = lens  # capturing ran the host bookkeeping but no kernel
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()  # also advances cache.lens_t on the device
        cache.lens = [n + 1 for n in cache.lens]
        return self.logits


@dataclass
class _Slot:
    request: Request
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    first_logits: torch.Tensor | None = None
    started: bool = False  # has taken its first decoding step


class DecodeEngine:
    """S decode slots of C tokens over one model; see the module docstring."""

    def __init__(self, model: LanceModel, *, eos_id: int, vocab_limit: int, slots: int, capacity: int,
                 cuda_graph: bool | None = None, check_every: int = CHECK_EVERY,
                 keep_first_logits: bool = False, reuse_prefix: bool = True,
                 admit_tokens: int = ADMIT_TOKENS) -> None:
        llm = model.llm
        self.model, self.eos_id, self.check_every = model, eos_id, check_every
        self.keep_first_logits, self.reuse_prefix = keep_first_logits, reuse_prefix
        self._prefixes: dict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.device, dtype = llm.embed.weight.device, llm.embed.weight.dtype
        self.capacity = capacity
        self.cache = KVCache(llm.cfg, slots, capacity, self.device, dtype)
        self.admit_tokens = admit_tokens  # prompt tokens per admission at most (see `admissible`)
        self._use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self._vocab_limit = vocab_limit
        self._steps: dict[int, tuple[KVCache, DecodeStep]] = {}  # per decode width b: a cache view and its step
        self.slots: list[_Slot | None] = [None] * slots
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # the token each slot feeds next
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)  # ... and its position

    @property
    def free(self) -> int:
        return sum(s is None for s in self.slots)

    @property
    def active(self) -> int:
        return len(self.slots) - self.free

    def fits(self, request: Request) -> bool:
        return request.prompt_len - 1 + request.max_new_tokens + self.check_every <= self.capacity

    @torch.inference_mode()
    def admit(self, requests: list[Request]) -> None:
        """Prefill `requests` (at most `free` of them) into free slots: one ViT pass, one packed prefill."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        if len(requests) > len(free):
            raise ValueError(f"{len(requests)} requests for {len(free)} free slots")
        for request in requests:
            if not self.fits(request):
                raise ValueError(f"a request of {request.prompt_len} prompt tokens + {request.max_new_tokens} "
                                 f"new ones does not fit slots of {self.capacity} tokens")
        if not requests:
            return
        vit_tokens = self._vit_tokens(requests)
        chosen = free[: len(requests)]  # ascending: the packed prefill lists rows in slot order
        cache, llm = self.cache, self.model.llm
        index = torch.tensor(chosen, device=self.device)
        starts = self._load_prefixes(chosen, requests)  # tokens whose keys/values are already in each slot
        rows: list[list[Split]] = [[] for _ in self.slots]
        xs, pos = [], []
        for slot, request, tokens, start in zip(chosen, requests, vit_tokens, starts, strict=True):
            lay, n = request.layout, request.prompt_len
            xs.append(prompt_embeddings(self.model, lay, tokens)[start : n - 1])  # all but the last token
            pos.append(lay.position_ids[:, start : n - 1])
            rows[slot] = [Split(min(s.end, n - 1) - max(s.start, start), s.causal)
                          for s in lay.splits if s.end > start and s.start < n - 1]
        llm(torch.cat(xs), torch.cat(pos, dim=1).to(self.device), rows, cache=cache)
        # The first decoding step feeds each prompt's last token at its own position.
        last = [(int(r.layout.prompt_ids[-1]), int(r.layout.position_ids[0, -1])) for r in requests]
        self.tokens[index] = torch.tensor([t for t, _ in last], device=self.device)
        self.positions[index] = torch.tensor([p for _, p in last], device=self.device)
        for slot, request in zip(chosen, requests, strict=True):
            generator = None
            if request.temperature > 0:
                generator = torch.Generator(self.device).manual_seed(int(request.seed))
            self.slots[slot] = _Slot(request, generator=generator)

    def _load_prefixes(self, slots: list[int], requests: list[Request]) -> list[int]:
        """Put each request's prefix (its leading text split) into its slot, computing the keys/values of
        a prefix the first time it is seen; returns per request how many tokens its slot now holds."""
        starts, by_prefix = [], {}
        for slot, request in zip(slots, requests, strict=True):
            key = self._prefix_key(request.layout)
            starts.append(len(key))
            self.cache.lens[slot] = len(key)
            if key:
                by_prefix.setdefault(key, []).append(slot)
        for key, members in by_prefix.items():
            keys, values = self._prefix_kv(key)
            index = torch.tensor(members, device=self.device)
            for layer, (k, v) in enumerate(zip(keys, values, strict=True)):  # one copy per layer for all rows
                self.cache.k[layer][index, :, : len(key)] = k
                self.cache.v[layer][index, :, : len(key)] = v
        self.cache.lens_t[torch.tensor(slots, device=self.device)] = torch.tensor(starts, device=self.device)
        return starts

    def _prefix_key(self, layout: UnderstandingLayout) -> tuple[int, ...]:
        first = layout.splits[0]
        if not self.reuse_prefix or not first.causal or first.end >= len(layout.prompt_ids) - 1:
            return ()
        return tuple(layout.prompt_ids[: first.end].tolist())

    def _prefix_kv(self, key: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys/values of a prefix (text at positions 0..P-1 on every axis): [nkv, P, hd] per layer."""
        if key not in self._prefixes:
            if len(self._prefixes) >= 8:  # a handful of system prompts per job; forget the oldest
                self._prefixes.pop(next(iter(self._prefixes)))
            llm, n = self.model.llm, len(key)
            scratch = KVCache(llm.cfg, 1, n, self.device, self.cache.k[0].dtype)
            ids = torch.tensor(key, device=self.device)
            llm(llm.embed(ids), torch.arange(n, device=self.device).expand(3, n), [[Split(n, True)]], cache=scratch)
            self._prefixes[key] = ([k[0] for k in scratch.k], [v[0] for v in scratch.v])
        return self._prefixes[key]

    def _vit_tokens(self, requests: list[Request]) -> list[list[torch.Tensor]]:
        """ViT outputs per request and visual: one ViT call for every visual of every request."""
        todo = [(i, frames) for i, r in enumerate(requests) if r.vit_tokens is None for frames in r.visuals]
        out: list[list[torch.Tensor]] = [list(r.vit_tokens or []) for r in requests]
        if todo:
            merge = self.model.vit_cfg.spatial_merge_size
            inputs = [vit_patches(frames.to(self.device, non_blocking=True)) for _, frames in todo]
            grids = [grid for _, grid in inputs]
            vit = self.model.vit(torch.cat([p for p, _ in inputs]), grids)  # visuals never attend to each other
            for (i, _), chunk in zip(todo, vit.split([t * h * w // merge**2 for t, h, w in grids]), strict=True):
                out[i].append(chunk)
        return out

    @torch.inference_mode()
    def run(self) -> list[Answer]:
        """Decode `check_every` steps for every slot; return the rows that ended (their slots are free again)."""
        if not self.active:
            return []
        k = self.check_every
        n = self._width()
        view, step_fn = self._step_for(n)
        view.lens = self.cache.lens[:n]
        window = torch.empty(n, k, dtype=torch.long, device=self.device)
        sampled = [i for i, s in enumerate(self.slots[:n]) if s is not None and s.generator is not None]
        fresh = [i for i, s in enumerate(self.slots[:n]) if s is not None and not s.started]
        tokens, positions = self.tokens[:n], self.positions[:n]
        for step in range(k):
            logits = step_fn(tokens, positions.expand(3, n))
            if step == 0 and self.keep_first_logits:
                for i in fresh:
                    self.slots[i].first_logits = logits[i].float().cpu()
            nxt = logits.argmax(-1)
            for i in sampled:
                r = self.slots[i].request
                nxt[i] = _sample(logits[i], r.temperature, r.top_p, self.slots[i].generator)[0]
            window[:, step] = nxt
            tokens.copy_(nxt)
            positions += 1
        self.cache.lens[:n] = view.lens
        return self._collect(window.tolist())

    def _width(self) -> int:
        """Slots a decode step covers: the smallest power of two (or all slots) past the last active one."""
        top = max(i for i, s in enumerate(self.slots) if s is not None) + 1
        width = 1
        while width < top:
            width *= 2
        return min(width, len(self.slots))

    def _step_for(self, width: int) -> tuple[KVCache, DecodeStep]:
        if width not in self._steps:
            view = self.cache.head(width)
            self._steps[width] = (view, DecodeStep(self.model.llm, view, self._vocab_limit, self._use_graph))
        return self._steps[width]

    def _collect(self, window: list[list[int]]) -> list[Answer]:
        done: list[Answer] = []
        for i, slot in enumerate(self.slots[: len(window)]):
            if slot is None:
                continue
            slot.started = True
            for token in window[i]:
                slot.generated.append(token)
                if token == self.eos_id or len(slot.generated) == slot.request.max_new_tokens:
                    done.append(Answer(slot.request, slot.generated, slot.first_logits))
                    self.slots[i] = None
                    break
        # Free slots decoded garbage past their row's end; rewind them so they never run out of room.
        idle = [i for i, s in enumerate(self.slots) if s is None]
        for i in idle:
            self.cache.lens[i] = 0
        if idle:
            self.cache.lens_t[torch.tensor(idle, device=self.device)] = 0
        return done


def admissible(engine: DecodeEngine, requests: Sequence[Request], token_budget: int | None = None) -> int:
    """How many of the first `requests` to admit now: as many as there are free slots and fit them, within
    `token_budget` prompt tokens (default: the engine's `admit_tokens`; always at least one when one fits)."""
    token_budget = engine.admit_tokens if token_budget is None else token_budget
    count, tokens = 0, 0
    for request in requests:
        if count == engine.free or not engine.fits(request):
            break
        if count and tokens + request.prompt_len > token_budget:
            break
        count += 1
        tokens += request.prompt_len
    return count


def answer_all(engine: DecodeEngine, requests: list[Request], token_budget: int | None = None) -> list[Answer]:
    """Answers to every request, in request order: slots are refilled as rows end."""
    pending = list(requests)
    answers: dict[int, Answer] = {}
    order = {id(r): i for i, r in enumerate(requests)}
    while pending or engine.active:
        n = admissible(engine, pending, token_budget)
        if n:
            engine.admit(pending[:n])
            pending = pending[n:]
        elif pending and not engine.active:
            raise ValueError("a request does not fit the engine's slots")
        for answer in engine.run():
            answers[order[id(answer.request)]] = answer
    return [answers[i] for i in range(len(requests))]
