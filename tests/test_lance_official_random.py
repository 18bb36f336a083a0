"""`OfficialRun` replays the official script's global generators draw for draw.

Fixtures: tests/fixtures/golden/official_runs/ (made by its make_official_runs.py from whole runs of the
official code on the tiny checkpoint): for every row of every run, the official posterior noise ε of the
conditioning latent (sha256 + first values), the crops torchvision drew and, for captions, the instruction
python's `random` picked.  These tests need no model: only the start-up replay (about a second for the tiny
checkpoint) and each row's draws -- except the last, the Python API captioning whole official runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from official_runs import GENERATION, NAMES, ROOT, UNDERSTANDING, load, load_input

from lance_ray.models.lance import preprocess
from lance_ray.models.lance.config import LLMConfig, ViTConfig
from lance_ray.models.lance.official_random import GLOBAL_SEED, Draw, OfficialRun, startup_draws
from lance_ray.models.lance.sequence import caption_instructions
from lance_ray.models.lance.tasks import TASKS


def _configs(tiny_ckpt: Path, family: str) -> tuple[LLMConfig, ViTConfig]:
    model_dir = tiny_ckpt / ("Lance_3B" if family == "image" else "Lance_3B_Video")
    return LLMConfig.from_json(model_dir / "llm_config.json"), ViTConfig.from_json(tiny_ckpt / "Qwen2.5-VL-ViT" / "config.json")


def media_shape(name: str | None) -> tuple[int, int, int] | None:
    """(T, H, W) of an input (T = 1 for an image)."""
    if name is None:
        return None
    pixels = load_input(name)
    return (1, *pixels.shape[:2]) if pixels.ndim == 3 else pixels.shape[:3]


@pytest.mark.parametrize("run_name", GENERATION)
def test_every_row_draws_the_official_posterior_noise_and_crops(run_name: str, tiny_ckpt: Path) -> None:
    meta = json.loads((ROOT / run_name / "meta.json").read_text())
    stored = np.load(ROOT / run_name / "rows.npz")
    settings = meta["settings"]
    task = TASKS[settings["task"]]
    run = OfficialRun(*_configs(tiny_ckpt, settings["family"]), "cpu")
    for k, row in enumerate(meta["rows"]):
        shape = media_shape(row["media"])
        draws = run.generation_row(task, shape, settings["resolution"], settings["num_frames"], settings["seed"],
                                   noise_rows=1, noise_dtype=torch.float32)
        if shape is None:  # t2i / t2v: nothing conditioned
            assert draws.eps is None and "eps_sha256" not in row
            continue
        eps = draws.eps.contiguous()
        assert list(eps.shape) == row["eps_shape"]
        head = stored[f"eps_head_{k}"]
        assert np.array_equal(eps.flatten()[: head.size].numpy(), head), f"row {k}: first values differ"
        assert hashlib.sha256(eps.numpy().tobytes()).hexdigest() == row["eps_sha256"], f"row {k}"
        # The crops the official resize drew, in call order: the ViT stream (edits), then the VAE stream.
        frames, height, width = shape if task.conditioning == "source" else (1, *shape[1:])
        streams = (["vit"] if task.conditioning == "source" else []) + ["vae"]
        offsets = {"vit": draws.vit_offsets, "vae": draws.vae_offsets}
        assert len(row["crops_top_left_h_w"]) == frames * len(streams)
        for i, (top, left, _, _) in enumerate(row["crops_top_left_h_w"]):
            stream = streams[i // frames]
            if offsets[stream] is None:  # the centred fallback crop (nothing drawn that matters)
                assert preprocess.crop_slack(height, width, settings["resolution"], stream) is None
            else:
                assert offsets[stream][i % frames] == (top, left), (k, stream, i)


def test_the_fixtures_exercise_a_drawn_crop_offset() -> None:
    """Some official crop offsets differ from the centred one lance-ray takes by default, so the pixel tests
    (tests/test_job_parity.py) would fail if the official offsets were not used."""
    drawn = 0
    for name in NAMES:
        for row in json.loads((ROOT / name / "meta.json").read_text())["rows"]:
            if row["media"] is None:
                continue
            _, height, width = media_shape(row["media"])
            drawn += sum((top, left) != ((height - h) // 2, (width - w) // 2)
                         for top, left, h, w in row["crops_top_left_h_w"])
    assert drawn > 0


def test_the_cpu_generator_is_replayed_only_when_a_value_is_needed(tiny_ckpt: Path) -> None:
    llm, vit = _configs(tiny_ckpt, "image")
    run = OfficialRun(llm, vit, "cpu")
    # A centred crop and a placeholder draw nothing anyone reads: they are only counted.
    assert run.crop_offsets(150, 200, 1, "image_256res", "vae") is None
    assert run._cpu is None and len(run._pending) == 20
    # A seed-0 noise reads the generator: the start-up and the counted draws are replayed first.
    noise = run.generation_row(TASKS["t2i"], None, "image_256res", None, 0, noise_rows=6, noise_dtype=torch.float32)
    expected = torch.Generator().manual_seed(GLOBAL_SEED)
    for draw in startup_draws(llm, vit) + [Draw("uniform", (1,))] * 20:
        draw.replay(expected)
    assert torch.equal(noise.noise, torch.randn(6, 48, generator=expected))


@pytest.mark.parametrize("run_name", UNDERSTANDING)
def test_every_caption_row_draws_the_official_instruction_and_crops(run_name: str, tiny_ckpt: Path) -> None:
    run = load(run_name)
    kind = TASKS[run.settings["task"]].input_media
    official = OfficialRun(*_configs(tiny_ckpt, run.settings["family"]), "cpu")
    instructions = caption_instructions(kind)
    picked = []
    for row in run.rows:
        draws = official.understanding_row(media_shape(row.media), run.settings["resolution"], instructions)
        assert f"<|im_start|>system\n{draws.instruction}<|im_end|>" in row.meta["prompt_text"]
        picked.append(instructions.index(draws.instruction))
        offsets = draws.vit_offsets or [None] * len(row.meta["crops_top_left_h_w"])
        for ours, (top, left, _, _) in zip(offsets, row.meta["crops_top_left_h_w"], strict=True):
            assert ours in (None, (top, left))
    assert len(set(picked)) > 1  # the rows did not all get the same instruction


@pytest.mark.parametrize("run_name", UNDERSTANDING)
def test_python_api_captions_like_an_official_run(run_name: str, tiny_ckpt: Path) -> None:
    """A caption call with `seed_mode="official"` is one official run: each row's instruction is python's next
    pick, so each answer is the official one (the tiny model's greedy tokens show which instruction it read)."""
    from lance_ray.models.lance.pipeline import LancePipeline

    run = load(run_name)
    pipe = LancePipeline.from_pretrained(str(tiny_ckpt), family=run.settings["family"], device="cpu",
                                         dtype="float32")
    task = run.settings["task"]
    answers = getattr(pipe, task)([load_input(row.media) for row in run.rows], [None] * len(run.rows), **run.params)
    assert answers == [row.meta["generated_text"] for row in run.rows]
    per_row = getattr(pipe, task)([load_input(row.media) for row in run.rows], [None] * len(run.rows),
                                  **{**run.params, "seed_mode": "per_row"})
    assert per_row != answers  # the first instruction for every row is not what the official run reads
