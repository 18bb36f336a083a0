"""x2t end to end: parity with the official goldens, batching independence, sampling, stopping, bf16."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lance_ray.models.lance.media_rules import image_to_rgb
from lance_ray.models.lance.pipeline import LancePipeline
from lance_ray.models.lance.preprocess import resize_to_bucket, vit_frames, vit_patches
from lance_ray.models.lance.sequence import build_understanding
from lance_ray.models.lance.understand import generate_text, prompt_embeddings

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
def _greedy(max_new_tokens: int, batch: int = 1) -> dict:
    """Decoding arguments of the official default: greedy, seeds unused."""
    return {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "seeds": [0] * batch}


CASES = {"x2t_image": ("image", "image_256res"), "x2t_video": ("video", "video_192p")}


def _media(task: str) -> np.ndarray:
    if task == "x2t_image":
        return image_to_rgb(Image.open(GOLDEN / "inputs" / "img_304x224.png"))
    with av.open(str(GOLDEN / "inputs" / "vid_304x224_5f12.mp4")) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _case(task: str, golden_set: str = "fp32_kv"):
    meta = json.loads((GOLDEN / golden_set / task / "x2t_meta.json").read_text())
    system, question, _ = next(iter(meta["input"].values()))["interleave_array"][1]
    return meta, load_file(GOLDEN / golden_set / task / "x2t.safetensors"), system, question


@pytest.fixture(scope="module")
def pipes(tiny_ckpt: Path) -> dict[str, LancePipeline]:
    return {fam: LancePipeline.from_pretrained(str(tiny_ckpt), family=fam, device="cpu", dtype="float32")
            for fam in ("image", "video")}


def _ask(pipe: LancePipeline, task: str, media, questions, **kw) -> list[str]:
    method = pipe.x2t_image if task == "x2t_image" else pipe.x2t_video
    return method(media, questions, preset=CASES[task][1], **kw)


@pytest.mark.parametrize("task", sorted(CASES))
def test_pipeline_reproduces_official_answer(pipes, task: str) -> None:
    meta, _, system, question = _case(task)
    pipe = pipes[CASES[task][0]]
    answer = _ask(pipe, task, [_media(task)], [question], max_new_tokens=24, system_prompt=system)
    assert answer == [meta["generated_text_normalized"]]


@pytest.mark.parametrize("task", sorted(CASES))
def test_intermediates_match_official(pipes, task: str) -> None:
    meta, g, system, question = _case(task)
    pipe = pipes[CASES[task][0]]
    frames = resize_to_bucket(_media(task), CASES[task][1], "vit")
    assert np.array_equal(vit_frames(frames), g["vit_input_u8_cthw_0"].permute(1, 2, 3, 0).numpy())
    patches, (t, h, w) = vit_patches(frames)
    vit = pipe.model.vit(patches, [(t, h, w)])
    torch.testing.assert_close(vit, g["vit_out_0"], atol=1e-4, rtol=1e-4)
    layout = build_understanding(pipe.tokenizer, question, [(t, h // 2, w // 2)], system_prompt=system)
    with torch.inference_mode():
        emb = prompt_embeddings(pipe.model, layout, [vit])
    torch.testing.assert_close(emb[:-1], g["prefill_query_embeds"], atol=1e-4, rtol=1e-4)
    res = generate_text(pipe.model, [layout], [[vit]], eos_id=pipe.tokenizer.special.im_end,
                        vocab_limit=len(pipe.tokenizer), **_greedy(24))
    assert res.ids[0] == g["generated_ids"].tolist()
    ids = g["logits_step0_top100_ids"]
    torch.testing.assert_close(res.first_logits[0, ids], g["logits_step0_top100_values"], atol=1e-3, rtol=0)


def _variants() -> tuple[list[np.ndarray], list[str]]:
    base = _media("x2t_image")
    images = [base, base[:, ::-1], base[:150], np.ascontiguousarray(base.transpose(1, 0, 2)), base[20:200, 40:],
              np.full((64, 300, 3), 90, np.uint8), base[::2, ::2], base[:, :224]]
    questions = ["What shapes are in the image?", "Colour?", "Describe every object you can see, in order.",
                 "Is there a bar?", "How many discs?", "What is the background colour of this picture?",
                 "Where?", "Count the shapes and name them."]
    return [np.ascontiguousarray(i) for i in images], questions


@pytest.mark.slow
def test_batch_of_8_answers_equal_single_answers(pipes) -> None:
    pipe = pipes["image"]
    images, questions = _variants()
    batched = _ask(pipe, "x2t_image", images, questions, max_new_tokens=10)
    alone = [_ask(pipe, "x2t_image", [i], [q], max_new_tokens=10)[0] for i, q in zip(images, questions, strict=True)]
    assert batched == alone
    assert len(set(batched)) > 1


def test_sampling_is_per_row_reproducible(pipes) -> None:
    pipe = pipes["image"]
    images, questions = _variants()
    kw = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9}
    batched = _ask(pipe, "x2t_image", images[:2], questions[:2], seeds=[1, 2], **kw)
    alone = _ask(pipe, "x2t_image", images[1:2], questions[1:2], seeds=[2], **kw)
    assert batched[1] == alone[0]
    other_seed = _ask(pipe, "x2t_image", images[1:2], questions[1:2], seeds=[7], **kw)
    greedy = _ask(pipe, "x2t_image", images[1:2], questions[1:2], max_new_tokens=6)
    assert other_seed[0] != alone[0] and greedy[0] != alone[0]


def test_each_sample_stops_at_its_own_eos(pipes) -> None:
    meta, g, system, question = _case("x2t_image")
    pipe = pipes["image"]
    frames = resize_to_bucket(_media("x2t_image"), "image_256res", "vit")
    patches, (t, h, w) = vit_patches(frames)
    vit = pipe.model.vit(patches, [(t, h, w)])
    official = g["generated_ids"].tolist()
    stop = official[3]  # pretend the 4th greedy token is <|im_end|>: that sample must stop there
    short = build_understanding(pipe.tokenizer, question, [(t, h // 2, w // 2)], system_prompt=system)
    other = build_understanding(pipe.tokenizer, "Something else entirely?", [(t, h // 2, w // 2)])
    res = generate_text(pipe.model, [short, other], [[vit], [vit]], eos_id=stop, vocab_limit=len(pipe.tokenizer),
                        **_greedy(12, batch=2))
    assert res.ids[0] == official[:4]
    assert len(res.ids[1]) == 12 or res.ids[1][-1] == stop


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(CASES))
def test_bfloat16_is_close_to_official_bf16(tiny_ckpt: Path, task: str) -> None:
    meta, g, system, question = _case(task, "bf16_kv")
    pipe = LancePipeline.from_pretrained(str(tiny_ckpt), family=CASES[task][0], device="cpu", dtype="bfloat16")
    patches, (t, h, w) = vit_patches(resize_to_bucket(_media(task), CASES[task][1], "vit"))
    with torch.inference_mode():
        vit = pipe.model.vit(patches, [(t, h, w)])
    cos = torch.nn.functional.cosine_similarity(vit.float().flatten(), g["vit_out_0"].flatten(), dim=0)
    assert cos > 0.999
    layout = build_understanding(pipe.tokenizer, question, [(t, h // 2, w // 2)], system_prompt=system)
    res = generate_text(pipe.model, [layout], [[vit]], eos_id=pipe.tokenizer.special.im_end,
                        vocab_limit=len(pipe.tokenizer), **_greedy(3))
    # bf16 rounding differs from the reference's bf16 flow; the first tokens still agree.
    assert res.ids[0] == g["generated_ids"][:3].tolist()
