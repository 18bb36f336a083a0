"""The benchmarks' random real-shape checkpoint writer, checked at tiny shapes against our strict loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.realshape import write_checkpoint
from lance_ray.models.lance.checkpoint import resolve_checkpoint
from lance_ray.models.lance.pipeline import LancePipeline
from lance_ray.models.lance.tiny import TINY_LLM, TINY_VIT


@pytest.mark.slow
@pytest.mark.parametrize("family", ["image", "video"])
def test_written_checkpoint_loads_strictly(tmp_path: Path, family: str) -> None:
    root = write_checkpoint(tmp_path, family, with_vae=False, shapes=(TINY_LLM, TINY_VIT))
    files = resolve_checkpoint(str(root), family)
    pipe = LancePipeline.from_pretrained(str(root), family=family, device="cpu", dtype="float32")
    assert files.weights.name == "model.safetensors"
    assert pipe.load_stats.copied_from_und == ()  # every gen-expert tensor came from the file
    assert pipe.load_stats.vit_from_model_file == (family == "video")
    assert all(torch.isfinite(p).all() for p in pipe.model.parameters())
