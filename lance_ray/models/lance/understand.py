"""Batched understanding (x2t): one ViT pass, one packed prefill, batched decoding.

Reproduces the official KV path (`modeling/lance/lance.py`, `Lance.validation_und_KVcache`).

Per sample the official KV path does: prefill the prompt split by split (text causal, ViT block
bidirectional) except its last token; then feed that last token and every generated token one at a
time, greedy argmax over the first `len(tokenizer)` logits, stop after `<|im_end|>` or `max_new_tokens`.
We do the same for B samples at once: the prefill packs all prompts into one forward (attention stays
per sample and per split), decoding feeds one token per sample per step through the batched cache
path.  Samples never attend to each other, so each answer is the one it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import LanceModel
from .sequence import UnderstandingLayout
from .tokenizer import IM_END
from .transformer import KVCache, LanguageModel, Split

STOP_CHECK_EVERY = 8  # decoding steps between host checks for "all samples finished"


@dataclass
class DecodeResult:
    ids: list[list[int]]  # per sample, up to and including <|im_end|> when it came
    first_logits: torch.Tensor  # [B, V] logits of the first decoding step (parity tests)


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


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from softmax(logits / T), restricted to the top-p nucleus; row b uses generators[b]."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


class DecodeStep:
    """Logits of one decoding step (one token per row).  With `cuda_graph` the step is recorded once
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


@torch.inference_mode()
def generate_text(model: LanceModel, layouts: list[UnderstandingLayout], vit_tokens: list[list[torch.Tensor]], *,
                  eos_id: int, vocab_limit: int, max_new_tokens: int, temperature: float, top_p: float,
                  seeds: list[int], cuda_graph: bool | None = None) -> DecodeResult:
    """Decode answers for B prompts.  vit_tokens[b] holds the ViT outputs of sample b's visuals.

    temperature 0 = greedy (the official default); otherwise sampling with a per-sample generator seeded
    by seeds[b], so a sample's draw does not depend on its batch neighbours.  `cuda_graph` (default: on
    CUDA devices) replays the decoding step as a CUDA graph.
    """
    llm = model.llm
    device, dtype = llm.embed.weight.device, llm.embed.weight.dtype
    B = len(layouts)
    prompt_lens = [len(lay.prompt_ids) for lay in layouts]
    cache = KVCache(llm.cfg, B, max(prompt_lens) + max_new_tokens, device, dtype)

    # Prefill everything but each prompt's last token, split by split.
    xs, pos, rows = [], [], []
    for lay, vt, n in zip(layouts, vit_tokens, prompt_lens, strict=True):
        xs.append(prompt_embeddings(model, lay, vt)[: n - 1])
        pos.append(lay.position_ids[:, : n - 1])
        rows.append([Split(min(s.end, n - 1) - s.start, s.causal) for s in lay.splits if s.start < n - 1])
    llm(torch.cat(xs), torch.cat(pos, dim=1).to(device), rows, cache=cache)

    tokens = torch.tensor([int(lay.prompt_ids[-1]) for lay in layouts], device=device)
    step_pos = torch.tensor([int(lay.position_ids[0, -1]) for lay in layouts], device=device)
    if temperature > 0:
        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    step_fn = DecodeStep(llm, cache, vocab_limit, device.type == "cuda" if cuda_graph is None else cuda_graph)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    first_logits = None
    n_steps = 0
    for step in range(max_new_tokens):
        logits = step_fn(tokens, (step_pos + step).expand(3, B))
        if first_logits is None:
            first_logits = logits.float().clone()
        tokens = logits.argmax(-1) if temperature <= 0 else _sample(logits, temperature, top_p, generators)
        out[:, step] = tokens
        finished |= tokens == eos_id
        n_steps = step + 1
        if n_steps % STOP_CHECK_EVERY == 0 and bool(finished.all()):
            break

    ids = []
    for row in out[:, :n_steps].tolist():
        ids.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return DecodeResult(ids=ids, first_logits=first_logits)
