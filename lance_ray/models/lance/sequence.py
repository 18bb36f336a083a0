"""Token layouts of the seven Lance tasks -- the only place that knows the official templates.

API
---
    und = build_understanding(tok, question, vit_grids, system_prompt=None, kind="image")
        und.prompt_ids      [P] token ids up to and including the "\\n" after "assistant"
        und.splits          prefill splits of the prompt (see below)
        und.position_ids    [3, P]; generated token i (0-based) gets und.next_position + i on all 3 axes
        und.visual_spans    [(start, end)] placeholder tokens of each ViT visual (ViT outputs go there)

    gen = build_generation(tok, task, prompt, target=(t, h, w), vit_grids=[...], source=(t, h, w))
        gen.token_ids, gen.modality, gen.splits, gen.position_ids       the conditional sample
        gen.target                                                      index of the noisy target split
        gen.prefix_splits_uncond, gen.uncond_target_position_ids        the unconditional (CFG) branch
        gen.visual_spans, gen.gen_mask, gen.source_latent, gen.clean_target_rows

A split is `SplitInfo(start, length, mode, modality)`; modes are the official attention modes:
"causal" (text), "full" (ViT condition: bidirectional inside, sees everything before), "full_noise"
(clean VAE condition, attends like "full"), "noise" (the noisy target: the query of every denoising
step, never seen by anything else).  Modalities: -1 template text, 0 user text (dropped for the
unconditional branch), 1 noisy target, 2 edit source, 4 ViT condition (official
`data/datasets_custom/validation_dataset.py`, `ValidationDataset.process_text_template`).

Grids are what the *LLM* sees: a ViT visual of T frames (incl. the duplicate frame) and H x W pixels
has (T/2, H/28, W/28) merged tokens; a VAE latent (t, h, w) = ((T-1)/4+1, H/16, W/16) voxels.

How the official code builds a sample (`data/system_prompt_render.py`: `render_qwenvl_prompt`,
`expand_and_index_by_token_ids_new`; `data/common.py`: `shift_position_ids`), which we reproduce bit for
bit (checked against the fixtures in tests/fixtures/golden):
1. render `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n
   <|im_start|>assistant\\n{assistant}<|im_end|>` (stripped), every visual as
   `<|vision_start|><|video_pad|><|vision_end|>`; tokenize the whole string;
2. expand each visual's single pad to its token count;
3. locate the user prompt by its standalone tokenization (first contiguous match, even inside the system
   prompt -- an official quirk we keep; no match -> error);
4. split: text runs are causal (a run holding the prompt is cut into before / prompt / after), each
   visual with its `<|vision_start|>`/`<|vision_end|>` is one split;
5. positions: Qwen2.5-VL `get_rope_index` (text sequential; a visual at offset o gets
   (2*t + o, y + o, x + o); the text after it restarts at its max + 1), then the MaPE shifts for
   generation samples with a "full"/"full_noise" split: ViT-condition temporal ids start at 1000, and
   when the edit source and the target have equally many tokens the target copies the source's ids.
The unconditional branch drops the modality-0 tokens.  Official KV-path quirk, reproduced: its prefix
splits are fed the *conditional* position ids, only its target uses ids recomputed on the shortened
sequence (`position_ids_uncond_fed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .tokenizer import IM_END, IM_START, VIDEO_PAD, VISION_END, VISION_START, LanceTokenizer

GEN_TASKS: tuple[str, ...] = ("t2i", "t2v", "i2v", "image_edit", "video_edit")
VisualKind = Literal["vit", "vae_cond", "vae_target"]
Grid = tuple[int, int, int]

# Official system prompts (data/common.py: generate_system_prompt, prompt type SP0). Quoted as data.
T2I_SYSTEM = ("Describe the image by detailing the color, quantity, text, shape, size, texture, spatial "
              "relationships of the objects and background:")
T2V_SYSTEM = ("Describe the video by detailing the color, quantity, visible text, shape, size, texture, spatial "
              "relationships and motion/camera movements of the objects and background:")


def edit_system_prompt(kind: str) -> str:
    # Note the curly apostrophe (U+2019) of the official string.
    return (f"Describe the key features of the input {kind} (color, shape, size, texture, objects, background), "
            f"then explain how the user\u2019s text instruction should alter or modify the {kind}. Generate a new "
            f"{kind} that meets the user\u2019s requirements while maintaining consistency with the original input "
            "where appropriate.")


def caption_instructions(kind: str) -> tuple[str, ...]:
    """The four caption instructions the official code draws from (python `random.choice`) for a sample
    without one (data/common.py: generate_system_prompt, type "caption")."""
    return (
        f"Generate a detailed and accurate description of the {kind}, including all the key moments and visual "
        "details.",
        f"Write an in-depth depiction of the {kind}, covering all its aspects.",
        f"Write an exhaustive depiction of the given {kind}, capturing its essence and key moments.",
        f"Describe the key features of the input {kind}, including color, shape, size, texture, objects, "
        "background.",
    )


def default_understanding_system_prompt(kind: str) -> str:
    """The official code draws one of the four caption instructions at random when a sample has none; we
    use the first, so outputs are reproducible (`seed_mode: official` replays the official draw)."""
    return caption_instructions(kind)[0]


MODE_OF_KIND = {"vit": "full", "vae_cond": "full_noise", "vae_target": "noise"}
MODALITY_OF_KIND = {"vit": 4, "vae_cond": 2, "vae_target": 1}
TEMPLATE, USER_TEXT = -1, 0
VIT_COND_TEMPORAL_START = 1000  # MaPE: first ViT-condition temporal id


@dataclass(frozen=True)
class SplitInfo:
    start: int
    length: int
    mode: str
    modality: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def causal(self) -> bool:
        return self.mode == "causal"


@dataclass(frozen=True)
class Visual:
    kind: VisualKind
    grid: Grid

    @property
    def n_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass
class _Sample:
    token_ids: list[int]
    splits: list[SplitInfo]
    modality: list[int]
    visual_spans: list[tuple[int, int]]  # placeholder token range of each visual, in order


@dataclass
class UnderstandingLayout:
    prompt_ids: torch.Tensor  # [P]
    splits: list[SplitInfo]  # covering the prompt
    position_ids: torch.Tensor  # [3, P]
    next_position: int  # generated token i (0-based) is fed back at this position + i, on all 3 axes
    visual_spans: list[tuple[int, int]]


@dataclass
class GenerationLayout:
    token_ids: torch.Tensor  # [L]
    modality: torch.Tensor  # [L]
    splits: list[SplitInfo]
    position_ids: torch.Tensor  # [3, L] conditional, MaPE-shifted
    target: int  # index into splits of the noisy target
    visual_spans: list[tuple[int, int]]  # in order: (edit) ViT, VAE source, target; (t2i/t2v/i2v) target
    gen_mask: torch.Tensor  # [L] True for VAE-latent tokens (processed by the gen expert)
    source_latent: Grid | None
    clean_target_rows: int  # leading target latent rows that stay clean (i2v: latent frame 0)
    prefix_splits_uncond: list[int] = field(default_factory=list)  # split indices fed to the uncond cache
    uncond_target_position_ids: torch.Tensor | None = None  # [3, target length]

    @property
    def prefix_splits(self) -> list[SplitInfo]:
        return self.splits[: self.target]

    @property
    def target_split(self) -> SplitInfo:
        return self.splits[self.target]

    @property
    def position_ids_uncond_fed(self) -> torch.Tensor:
        """[3, n] what the official KV path feeds the uncond branch: kept prefix splits with their
        conditional ids, then the target with recomputed ids."""
        parts = [self.position_ids[:, s.start:s.end] for s in (self.splits[i] for i in self.prefix_splits_uncond)]
        return torch.cat([*parts, self.uncond_target_position_ids], dim=1)


# ---------------------------------------------------------------------------------------------------
def _render(system: str, user: str, assistant: str) -> str:
    return (f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n"
            f"{IM_START}assistant\n{assistant}{IM_END}\n").strip()


VISUAL_MARK = VISION_START + VIDEO_PAD + VISION_END


def _check_user_text(text: str) -> None:
    for special in (VISION_START, VISION_END, VIDEO_PAD, IM_START, IM_END):
        if special in text:
            raise ValueError(f"user text must not contain the special token {special}")


def _find(haystack: list[int], needle: list[int]) -> int:
    """First contiguous occurrence (the official scan); ValueError if absent."""
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i:i + n] == needle:
            return i
    raise ValueError("the prompt's tokens do not occur contiguously in the rendered template "
                     "(they merge with the surrounding text); the official code rejects such prompts too")


def _build(tok: LanceTokenizer, system: str, user: str, assistant: str, visuals: list[Visual],
           search_text: str) -> _Sample:
    sp = tok.special
    base = tok.encode(_render(system, user, assistant))
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    it = iter(visuals)
    i = 0
    while i < len(base):
        if base[i] == sp.vision_start:
            visual = next(it)
            ids.append(sp.vision_start)
            spans.append((len(ids), len(ids) + visual.n_tokens))
            ids += [base[i + 1]] * visual.n_tokens + [sp.vision_end]
            i += 3
        else:
            ids.append(base[i])
            i += 1
    if len(spans) != len(visuals):
        raise ValueError("visual count does not match the template")

    search: range | None = None
    if search_text:
        needle = tok.encode(search_text)
        if not needle:
            raise ValueError("empty prompt")
        start = _find(ids, needle)
        search = range(start, start + len(needle))

    splits: list[SplitInfo] = []
    modality = [TEMPLATE] * len(ids)

    def text_run(a: int, b: int, allow_search: bool) -> None:
        if b <= a:
            return
        if allow_search and search is not None and search.start in range(a, b):
            cuts = [a, search.start, min(search.stop, b), b]
            for s, e in zip(cuts, cuts[1:], strict=False):
                if e > s:
                    splits.append(SplitInfo(s, e - s, "causal", TEMPLATE))
        else:
            splits.append(SplitInfo(a, b - a, "causal", TEMPLATE))

    cursor = 0
    for visual, (a, b) in zip(visuals, spans, strict=True):
        text_run(cursor, a - 1, allow_search=True)
        m = MODALITY_OF_KIND[visual.kind]
        splits.append(SplitInfo(a - 1, b - a + 2, MODE_OF_KIND[visual.kind], m))
        modality[a - 1:b + 1] = [m] * (b - a + 2)
        cursor = b + 1
    # The official code looks for the prompt only in runs that precede a visual.
    text_run(cursor, len(ids), allow_search=False)
    if search is not None:
        modality[search.start:search.stop] = [USER_TEXT] * len(search)
    # Splits carry the modality of their first token (what the official prefill logic looks at).
    splits = [SplitInfo(s.start, s.length, s.mode, modality[s.start]) for s in splits]
    return _Sample(ids, splits, modality, spans)


def rope_positions(token_ids: list[int], spans: list[tuple[int, int]], grids: list[Grid],
                   tokens_per_second: int) -> torch.Tensor:
    """Qwen2.5-VL `get_rope_index` for one sample whose visuals are all treated as videos with
    1 s per temporal grid step.  spans: placeholder ranges; grids: LLM-level (t, h, w) -> [3, L]."""
    pieces = []
    next_id = 0
    cursor = 0
    for (a, b), (t, h, w) in zip(spans, grids, strict=True):
        n_text = a - cursor
        pieces.append(torch.arange(n_text).expand(3, -1) + next_id)
        offset = next_id + n_text
        tt, hh, ww = torch.meshgrid(torch.arange(t) * tokens_per_second, torch.arange(h), torch.arange(w),
                                    indexing="ij")
        block = torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + offset
        pieces.append(block)
        next_id = int(block.max()) + 1
        cursor = b
    pieces.append(torch.arange(len(token_ids) - cursor).expand(3, -1) + next_id)
    return torch.cat(pieces, dim=1).long()


def mape_shift(pos: torch.Tensor, modality: torch.Tensor, splits: list[SplitInfo]) -> torch.Tensor:
    """Generation position shifts (official `shift_position_ids`, pro_type 10); returns a new tensor."""
    pos = pos.clone()
    if not any(s.mode in ("full", "full_noise") for s in splits):
        return pos
    vit = modality == 4
    if vit.any():
        pos[0, vit] += VIT_COND_TEMPORAL_START - pos[0, vit][0]
    src, tgt = modality == 2, modality == 1
    if src.any() and int(src.sum()) == int(tgt.sum()):
        pos[:, tgt] = pos[:, src]
    return pos


# ---------------------------------------------------------------------------------------------------
def build_understanding(tok: LanceTokenizer, question: str, vit_grids: list[Grid], *,
                        system_prompt: str | None = None, kind: str = "image",
                        tokens_per_second: int = 2) -> UnderstandingLayout:
    """x2t_image / x2t_video: `[system, user: visuals + question]`, generation prompt up to "assistant\\n"."""
    system = system_prompt if system_prompt is not None else default_understanding_system_prompt(kind)
    _check_user_text(question)
    _check_user_text(system)
    visuals = [Visual("vit", g) for g in vit_grids]
    sample = _build(tok, system, VISUAL_MARK * len(visuals) + question, "", visuals, search_text="")
    ids = sample.token_ids
    # The prompt ends right after the first "assistant" token that is followed by "\n".
    marker = tok.encode("assistant\n")
    prompt_len = next(i + len(marker) for i in range(len(ids)) if ids[i:i + len(marker)] == marker)
    pos = rope_positions(ids, sample.visual_spans, [v.grid for v in visuals], tokens_per_second)
    splits = [SplitInfo(s.start, min(s.end, prompt_len) - s.start, s.mode, s.modality)
              for s in sample.splits if s.start < prompt_len]
    return UnderstandingLayout(
        prompt_ids=torch.tensor(ids[:prompt_len]), splits=splits, position_ids=pos[:, :prompt_len],
        next_position=int(pos[0, prompt_len - 1]) + 1, visual_spans=sample.visual_spans)


def full_understanding_ids(tok: LanceTokenizer, question: str, vit_grids: list[Grid], *, system_prompt: str,
                           answer: str) -> tuple[list[int], list[SplitInfo], list[int]]:
    """The whole training-style sample (prompt + answer + <|im_end|>): ids, splits, modality."""
    visuals = [Visual("vit", g) for g in vit_grids]
    s = _build(tok, system_prompt, VISUAL_MARK * len(visuals) + question, answer, visuals, search_text="")
    return s.token_ids, s.splits, s.modality


def build_generation(tok: LanceTokenizer, task: str, prompt: str, *, target: Grid,
                     vit_grids: list[Grid] | None = None, source: Grid | None = None,
                     tokens_per_second: int = 2) -> GenerationLayout:
    """t2i / t2v / i2v / image_edit / video_edit sample with its conditional and unconditional layouts.

    target: latent grid (t, h, w) of the output; i2v's first latent frame is the clean input image.
    Edits: `vit_grids` = [merged ViT grid of the input], `source` = its latent grid (== target).
    """
    if task not in GEN_TASKS:
        raise ValueError(f"unknown generation task {task!r}")
    _check_user_text(prompt)
    is_edit = task.endswith("_edit")
    kind = "image" if task in ("t2i", "image_edit") else "video"
    if is_edit:
        if not vit_grids or len(vit_grids) != 1 or source is None:
            raise ValueError(f"{task} needs one ViT grid and the source latent grid")
        # Official order of the user content: ViT view, VAE view, then the instruction.
        visuals = [Visual("vit", vit_grids[0]), Visual("vae_cond", source)]
        system, user = edit_system_prompt(kind), VISUAL_MARK * 2 + prompt
    else:
        visuals = []
        system, user = (T2I_SYSTEM if task == "t2i" else T2V_SYSTEM), prompt
    visuals.append(Visual("vae_target", target))
    sample = _build(tok, system, user, VISUAL_MARK, visuals, search_text=prompt)

    ids = torch.tensor(sample.token_ids)
    modality = torch.tensor(sample.modality)
    grids = [v.grid for v in visuals]
    pos = mape_shift(rope_positions(sample.token_ids, sample.visual_spans, grids, tokens_per_second),
                     modality, sample.splits)
    target_idx = next(i for i, s in enumerate(sample.splits) if s.mode == "noise")
    gen_mask = torch.zeros(len(ids), dtype=torch.bool)
    for v, (a, b) in zip(visuals, sample.visual_spans, strict=True):
        if v.kind != "vit":
            gen_mask[a:b] = True

    # Unconditional branch: drop the user text, recompute positions on what is left.
    keep = modality != USER_TEXT
    kept_ids = ids[keep].tolist()
    kept_splits = [s for s in sample.splits if s.modality != USER_TEXT]
    dropped_before = torch.cumsum((~keep).long(), 0).tolist()  # dropped tokens up to each index
    uncond_splits = [SplitInfo(s.start - dropped_before[s.start], s.length, s.mode, s.modality) for s in kept_splits]
    uncond_spans = [(a - dropped_before[a], b - dropped_before[a]) for a, b in sample.visual_spans]
    uncond_pos = mape_shift(rope_positions(kept_ids, uncond_spans, grids, tokens_per_second), modality[keep],
                            uncond_splits)
    tgt = sample.splits[target_idx]
    tgt_uncond_start = tgt.start - dropped_before[tgt.start]
    return GenerationLayout(
        token_ids=ids, modality=modality, splits=sample.splits, position_ids=pos, target=target_idx,
        visual_spans=sample.visual_spans, gen_mask=gen_mask, source_latent=source,
        clean_target_rows=target[1] * target[2] if task == "i2v" else 0,
        prefix_splits_uncond=[i for i, s in enumerate(sample.splits[:target_idx]) if s.modality != USER_TEXT],
        uncond_target_position_ids=uncond_pos[:, tgt_uncond_start:tgt_uncond_start + tgt.length],
    )
