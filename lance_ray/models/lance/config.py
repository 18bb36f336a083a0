"""Typed configs of the Lance language model and its vision tower.

`LLMConfig` is built from a checkpoint's `llm_config.json` plus the settings the official inference
script forces on the command line (MoT layers, QK-norm for both experts, untied lm_head, 3-axis MRoPE:
official `inference_lance.py`, `main`, with the defaults of `inference_lance.sh`); only the fields the
model actually reads are kept.  `ViTConfig` comes from
`Qwen2.5-VL-ViT/config.json` (or the `vision_config` sub-dict of a full Qwen2.5-VL config).
`VAEConfig` lives in `vae.py` (its widths are read from the VAE state dict).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LLMConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128_000
    hidden_act: str = "silu"
    # Read from the LLM config's `vision_config` (the ViT's own config has its own copy, unused).
    spatial_merge_size: int = 2
    tokens_per_second: int = 2
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    # Lance constants (command-line defaults of the official script, not in the json).
    latent_channels: int = 48
    max_latent_size: int = 64
    timestep_freq_dim: int = 256

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> LLMConfig:
        vision = cfg.get("vision_config")
        if not isinstance(vision, dict):
            raise ValueError(
                "llm_config.json needs a dict-valued 'vision_config' (the official loader requires it)"
            )
        rope_scaling = cfg.get("rope_scaling") or {}
        return cls(
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            num_key_value_heads=int(cfg["num_key_value_heads"]),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 1_000_000.0)),
            mrope_section=tuple(rope_scaling.get("mrope_section", (16, 24, 24))),  # type: ignore[arg-type]
            max_position_embeddings=int(cfg.get("max_position_embeddings", 128_000)),
            hidden_act=str(cfg.get("hidden_act", "silu")),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
            tokens_per_second=int(vision.get("tokens_per_second", 2)),
            image_token_id=int(cfg.get("image_token_id", 151655)),
            video_token_id=int(cfg.get("video_token_id", 151656)),
            vision_start_token_id=int(cfg.get("vision_start_token_id", 151652)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> LLMConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def lance_3b(cls) -> LLMConfig:
        """The real Lance-3B shapes (Qwen2.5-3B backbone), for meta-device tests and benchmarks."""
        return cls(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
        )


@dataclass(frozen=True)
class ViTConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = field(default=(7, 15, 23, 31))
    in_channels: int = 3
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError("ViT head_dim must be a multiple of 4 (2-D rotary over head_dim/2)")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError("window_size must be a multiple of patch_size * spatial_merge_size")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported ViT hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch row (C * temporal * patch * patch = 1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ViTConfig:
        if isinstance(cfg.get("vision_config"), dict):  # a full Qwen2.5-VL config: the ViT part is nested
            cfg = cfg["vision_config"]
        return cls(
            depth=int(cfg["depth"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=int(cfg["num_heads"]),
            out_hidden_size=int(cfg["out_hidden_size"]),
            patch_size=int(cfg.get("patch_size", cfg.get("spatial_patch_size", 14))),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            spatial_merge_size=int(cfg.get("spatial_merge_size", 2)),
            window_size=int(cfg.get("window_size", 112)),
            fullatt_block_indexes=tuple(cfg.get("fullatt_block_indexes", (7, 15, 23, 31))),
            in_channels=int(cfg.get("in_channels", cfg.get("in_chans", 3))),
            hidden_act=str(cfg.get("hidden_act", "silu")),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ViTConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def qwen25_vl(cls) -> ViTConfig:
        """The Qwen2.5-VL-3B vision tower shipped with Lance."""
        return cls(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048)
