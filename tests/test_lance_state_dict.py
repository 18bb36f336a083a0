"""The official key map against the real Lance-3B shapes, on the meta device (no memory allocated)."""

from __future__ import annotations

import pytest
import torch

from lance_ray.models.lance.config import LLMConfig, ViTConfig
from lance_ray.models.lance.model import LanceModel
from lance_ray.models.lance.state_dict import (
    IGNORED_KEYS,
    VIT_PREFIX_IN_MODEL_FILE,
    CheckpointMismatch,
    llm_key_map,
    plan_load,
    vit_key_map,
)

# Element and tensor counts of the published files, from a third-party header audit (LANCE_FACTS header).
PUBLISHED = {"Lance_3B": (1021, 6_185_205_808), "Lance_3B_Video": (1411, 7_105_548_336)}
POS_TABLE_ROWS = {"Lance_3B": 4096, "Lance_3B_Video": 126976}


@pytest.fixture(scope="module")
def real_model() -> LanceModel:
    with torch.device("meta"):
        return LanceModel(LLMConfig.lance_3b(), ViTConfig.qwen25_vl())


def _official_shapes(model: LanceModel, family: str) -> dict[str, tuple[int, ...]]:
    """Official key -> shape, derived from our parameters through the key map."""
    params = dict(model.named_parameters())
    key_maps = [llm_key_map(model.llm_cfg)]
    if family == "Lance_3B_Video":
        key_maps.append(vit_key_map(model.vit_cfg, VIT_PREFIX_IN_MODEL_FILE))
    shapes = {}
    for km in key_maps:
        for official, ours in km.items():
            shape = tuple(params[ours].shape)
            if official.endswith("patch_embed.proj.weight"):  # stored as the Conv3d kernel
                shape = (shape[0], 3, 2, 14, 14)
            shapes[official] = shape
    shapes["latent_pos_embed.pos_embed"] = (POS_TABLE_ROWS[family], model.llm_cfg.hidden_size)
    return shapes


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_key_map_reproduces_the_published_tensor_and_element_counts(real_model: LanceModel, family: str) -> None:
    shapes = _official_shapes(real_model, family)
    n_tensors, n_elements = PUBLISHED[family]
    assert len(shapes) == n_tensors
    assert sum(torch.Size(s).numel() for s in shapes.values()) == n_elements


def test_key_map_covers_every_parameter_once(real_model: LanceModel) -> None:
    params = {n for n, _ in real_model.named_parameters()}
    for vit_map in (vit_key_map(real_model.vit_cfg), vit_key_map(real_model.vit_cfg, VIT_PREFIX_IN_MODEL_FILE)):
        targets = list(llm_key_map(real_model.llm_cfg).values()) + list(vit_map.values())
        assert sorted(targets) == sorted(params)
    assert all(p.is_meta for p in real_model.parameters())


def test_plan_load_real_video_checkpoint(real_model: LanceModel) -> None:
    keys = set(_official_shapes(real_model, "Lance_3B_Video"))
    plan = plan_load(keys, set(), real_model.llm_cfg, real_model.vit_cfg)
    assert plan.vit_from_model_file and set(plan.ignored) == set(IGNORED_KEYS)
    assert len(plan.sources) == sum(1 for _ in real_model.parameters())
    with pytest.raises(CheckpointMismatch, match="missing"):
        plan_load(keys - {"language_model.lm_head.weight"}, set(), real_model.llm_cfg, real_model.vit_cfg)
