"""Token layouts of all seven tasks against the official goldens (every integer must match)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lance_ray.models.lance.sequence import build_generation, build_understanding, full_understanding_ids
from lance_ray.models.lance.tokenizer import LanceTokenizer

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "fp32_kv"
GEN_TASKS = ["t2i", "t2v", "i2v", "image_edit", "video_edit"]


@pytest.fixture(scope="module")
def tok(tiny_ckpt: Path) -> LanceTokenizer:
    return LanceTokenizer(tiny_ckpt / "Lance_3B")


def _gen_case(task: str):
    g = load_file(GOLDEN / task / "sequence.safetensors")
    meta = json.loads((GOLDEN / task / "sequence_meta.json").read_text())
    sample = next(iter(meta["input"].values()))
    prompt = sample if isinstance(sample, str) else sample["interleave_array"][0]
    t, h2, w2 = g["data_vae_video_grid_thw"][-1].tolist()  # the official grid doubles h and w for get_rope_index
    target = (t, h2 // 2, w2 // 2)
    vit_grids = None
    if "vit_grid_thw_0" in g:
        vt, vh, vw = g["vit_grid_thw_0"][0].tolist()
        vit_grids = [(vt, vh // 2, vw // 2)]
    return g, meta, prompt, target, vit_grids


@pytest.mark.parametrize("task", GEN_TASKS)
def test_generation_layout_matches_golden(tok: LanceTokenizer, task: str) -> None:
    g, meta, prompt, target, vit_grids = _gen_case(task)
    lay = build_generation(tok, task, prompt, target=target, vit_grids=vit_grids,
                           source=target if task.endswith("edit") else None)
    assert torch.equal(lay.token_ids, g["packed_text_ids"])
    assert torch.equal(lay.modality, g["sample_modality"])
    assert [s.length for s in lay.splits] == meta["split_lens"]
    assert [s.mode for s in lay.splits] == meta["attn_modes"]
    end = lay.target_split.end  # the KV path feeds everything up to the target, never the final <|im_end|>
    assert torch.equal(lay.position_ids[:, :end], g["position_ids_cond"].reshape(3, -1))
    assert torch.equal(lay.position_ids_uncond_fed, g["position_ids_uncond"].reshape(3, -1))
    # The official prefill calls: which splits go to the uncond cache, which calls are gen mode.
    calls = [c for c in meta["forward_inference_calls"] if c["update_cache"]]
    expected = []
    for i, s in enumerate(lay.prefix_splits):
        mode = "gen" if bool(lay.gen_mask[s.start:s.end].any()) else "und"
        expected.append(("cond", s.length, s.causal, mode))
        if i in lay.prefix_splits_uncond:
            expected.append(("uncond", s.length, s.causal, mode))
    assert [(c["branch"], c["query_len"], c["is_causal"], c["mode"]) for c in calls] == expected
    step = next(c for c in meta["forward_inference_calls"] if not c["update_cache"] and c["branch"] == "cond")
    assert step["n_gen_tokens"] == int(lay.gen_mask[lay.target_split.start:lay.target_split.end].sum())
    if task == "i2v":
        assert lay.clean_target_rows == target[1] * target[2]


@pytest.mark.parametrize("task", ["x2t_image", "x2t_video"])
def test_understanding_layout_matches_golden(tok: LanceTokenizer, task: str) -> None:
    g = load_file(GOLDEN / task / "x2t.safetensors")
    meta = json.loads((GOLDEN / task / "x2t_meta.json").read_text())
    system, question, answer = next(iter(meta["input"].values()))["interleave_array"][1]
    vt, vh, vw = g["vit_grid_thw_0"][0].tolist()
    grids = [(vt, vh // 2, vw // 2)]
    ids, splits, modality = full_understanding_ids(tok, question, grids, system_prompt=system, answer=answer)
    assert ids == g["packed_text_ids"].tolist() and modality == g["sample_modality"].tolist()
    assert [s.length for s in splits] == meta["split_lens"] and [s.mode for s in splits] == meta["attn_modes"]
    und = build_understanding(tok, question, grids, system_prompt=system)
    P = len(und.prompt_ids)
    assert torch.equal(und.prompt_ids, g["packed_text_ids"][:P])
    fed = g["position_ids_all_calls"].reshape(3, -1)  # prefill (P-1 columns), then one column per step
    assert torch.equal(und.position_ids[:, : P - 1], fed[:, : P - 1])
    assert torch.equal(und.position_ids[:, P - 1], fed[:, P - 1])
    steps = fed.shape[1] - P
    assert torch.equal(torch.arange(steps).expand(3, -1) + und.next_position, fed[:, P:])
    # Official prefill: the prompt split by split, its last token left for the first decoding step.
    prefill = [c["query_len"] for c in meta["forward_inference_calls"][:3]]
    assert prefill == [s.length for s in und.splits[:-1]] + [und.splits[-1].length - 1]


def test_prompt_that_merges_with_the_template_is_rejected(tok: LanceTokenizer) -> None:
    with pytest.raises(ValueError, match="contiguously"):
        build_generation(tok, "t2i", "\nA fox", target=(1, 4, 6))  # "\n\n" merges with the template's "\n"
    with pytest.raises(ValueError, match="special token"):
        build_generation(tok, "t2i", "a <|vision_start|> b", target=(1, 4, 6))


def test_uncond_branch_without_prompt_tokens(tok: LanceTokenizer) -> None:
    lay = build_generation(tok, "t2i", "A red fox sitting in fresh snow.", target=(1, 4, 6))
    n_prompt = int((lay.modality == 0).sum())
    assert n_prompt == lay.splits[1].length and lay.prefix_splits_uncond == [0, 2]
    # The uncond target starts right after the shortened prefix on all three axes.
    kept = sum(lay.splits[i].length for i in lay.prefix_splits_uncond)
    assert int(lay.uncond_target_position_ids[0, 0]) == kept
