"""Vision tower against the official ViT outputs, and batching across visuals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lance_ray.models.lance.checkpoint import resolve_checkpoint
from lance_ray.models.lance.loader import load_lance_model
from lance_ray.models.lance.preprocess import vit_patches

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "fp32_kv"


@pytest.fixture(scope="module")
def models(tiny_ckpt: Path):
    return {fam: load_lance_model(resolve_checkpoint(str(tiny_ckpt), fam), "cpu", torch.float32)[0]
            for fam in ("image", "video")}


def _inputs(task: str):
    g = load_file(GOLDEN / task / "x2t.safetensors")
    patches, grid = vit_patches(g["vit_input_u8_cthw_0"].permute(1, 2, 3, 0).numpy())
    assert list(grid) == g["vit_grid_thw_0"][0].tolist()
    return patches, grid, g["vit_out_0"]


@pytest.mark.parametrize(("task", "family"), [("x2t_image", "image"), ("x2t_video", "video")])
def test_vit_matches_official(models, task: str, family: str) -> None:
    patches, grid, expected = _inputs(task)
    out = models[family].vit(patches, [grid])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_vit_batch_of_visuals_equals_one_by_one(models) -> None:
    vit = models["image"].vit
    (p1, g1, _), (p2, g2, _) = _inputs("x2t_image"), _inputs("x2t_video")
    both = vit(torch.cat([p1, p2, p1]), [g1, g2, g1])
    alone = torch.cat([vit(p1, [g1]), vit(p2, [g2]), vit(p1, [g1])])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)


def test_vit_attention_stays_inside_windows_and_slices(models) -> None:
    # Changing the last temporal slice of a video must not change the first slice's tokens.
    vit = models["video"].vit
    patches, grid, _ = _inputs("x2t_video")
    per_slice = grid[1] * grid[2]
    changed = patches.clone()
    changed[-per_slice:] += 1.0
    a, b = vit(patches, [grid]), vit(changed, [grid])
    first = per_slice // 4
    torch.testing.assert_close(a[:first], b[:first], atol=0, rtol=0)
    assert not torch.allclose(a[-first:], b[-first:])
