"""The only place that knows the official Lance checkpoint key names.

They are the parameter names of the official modules: `modeling/lance/lance.py` (`Lance`),
`modeling/lance/qwen2_navit.py` (`Qwen2ForCausalLM`, the MoT layers) and `modeling/vit/qwen2_5_vl_vit.py`
(`Qwen2_5_VisionTransformerPretrainedModel`).

`key_map(llm, vit)` lists every official tensor name of `model.safetensors` (with `vit_model.` for the ViT
copy embedded in the video checkpoint) and of `vit.safetensors` (no prefix), each with the name of our
parameter in `LanceModel` it becomes.  `plan_load` turns the key lists of the actual files into a
per-parameter source, and fails loudly, naming the keys, on anything missing or unexpected.

Decisions, mirroring what the official loader ends up with:
* `latent_pos_embed.pos_embed` is ignored: it is a fixed 3-D sin-cos table; latent.py recomputes the
  rows it needs (the official loader pops it before loading as well).
* `vit_model.*` tensors in the model file override `vit.safetensors` (the official non-strict load of
  the video checkpoint does exactly that); a model file without them uses `vit.safetensors`.
* A gen-expert (`*_moe_gen`) tensor missing from the file takes the value of its und twin: the official
  code initialises every gen weight as a copy of the und one (`copy_init_moe`) before its non-strict
  load.  The published checkpoints contain all of them, so such a fallback is reported (logged and
  listed in `LoadPlan.copied_from_und`), never silent.  Any other missing key is an error.
* `patch_embed.proj.weight` is a Conv3d kernel [D, C, Tp, P, P] applied with stride == kernel; our ViT
  holds it as the equivalent Linear [D, C*Tp*P*P] (`convert` reshapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import LLMConfig, ViTConfig

IGNORED_KEYS = {
    "latent_pos_embed.pos_embed": "fixed 3-D sin-cos table, recomputed by latent.sincos_3d "
                                  "(the official loader pops it too)",
}
VIT_PREFIX_IN_MODEL_FILE = "vit_model."

# (official suffix within a layer, our name within an Expert); the gen expert's official names carry
# `_moe_gen` at the position marked {g}.
_LAYER_TENSORS = [
    ("self_attn.q_proj{g}.weight", "q_proj.weight"), ("self_attn.q_proj{g}.bias", "q_proj.bias"),
    ("self_attn.k_proj{g}.weight", "k_proj.weight"), ("self_attn.k_proj{g}.bias", "k_proj.bias"),
    ("self_attn.v_proj{g}.weight", "v_proj.weight"), ("self_attn.v_proj{g}.bias", "v_proj.bias"),
    ("self_attn.o_proj{g}.weight", "o_proj.weight"),
    ("self_attn.q_norm{g}.weight", "q_norm.weight"), ("self_attn.k_norm{g}.weight", "k_norm.weight"),
    ("mlp{g}.gate_proj.weight", "gate_proj.weight"), ("mlp{g}.up_proj.weight", "up_proj.weight"),
    ("mlp{g}.down_proj.weight", "down_proj.weight"),
    ("input_layernorm{g}.weight", "attn_norm.weight"),
    ("post_attention_layernorm{g}.weight", "mlp_norm.weight"),
]
_VIT_BLOCK_TENSORS = [
    ("norm1.weight", "norm1.weight"), ("norm2.weight", "norm2.weight"),
    ("attn.qkv.weight", "qkv.weight"), ("attn.qkv.bias", "qkv.bias"),
    ("attn.proj.weight", "proj.weight"), ("attn.proj.bias", "proj.bias"),
    ("mlp.gate_proj.weight", "gate_proj.weight"), ("mlp.gate_proj.bias", "gate_proj.bias"),
    ("mlp.up_proj.weight", "up_proj.weight"), ("mlp.up_proj.bias", "up_proj.bias"),
    ("mlp.down_proj.weight", "down_proj.weight"), ("mlp.down_proj.bias", "down_proj.bias"),
]


def llm_key_map(cfg: LLMConfig) -> dict[str, str]:
    """Official `model.safetensors` names (without ViT) -> our `LanceModel` parameter names."""
    m = {
        "language_model.model.embed_tokens.weight": "llm.embed.weight",
        "language_model.lm_head.weight": "llm.lm_head.weight",
        "language_model.model.norm.weight": "llm.norm_und.weight",
        "language_model.model.norm_moe_gen.weight": "llm.norm_gen.weight",
        "time_embedder.mlp.0.weight": "latent.time_embedder.fc1.weight",
        "time_embedder.mlp.0.bias": "latent.time_embedder.fc1.bias",
        "time_embedder.mlp.2.weight": "latent.time_embedder.fc2.weight",
        "time_embedder.mlp.2.bias": "latent.time_embedder.fc2.bias",
        "vae2llm.weight": "latent.vae2llm.weight",
        "vae2llm.bias": "latent.vae2llm.bias",
        "llm2vae.weight": "latent.llm2vae.weight",
        "llm2vae.bias": "latent.llm2vae.bias",
    }
    for layer in range(cfg.num_hidden_layers):
        for official, ours in _LAYER_TENSORS:
            for g, expert in (("", "und"), ("_moe_gen", "gen")):
                m[f"language_model.model.layers.{layer}.{official.format(g=g)}"] = f"llm.layers.{layer}.{expert}.{ours}"
    return m


def vit_key_map(cfg: ViTConfig, prefix: str = "") -> dict[str, str]:
    """Official ViT names (as in `vit.safetensors`, or with `prefix`) -> our parameter names."""
    m = {
        "patch_embed.proj.weight": "vit.patch_embed.weight",
        "merger.ln_q.weight": "vit.merger_norm.weight",
        "merger.mlp.0.weight": "vit.merger_fc1.weight",
        "merger.mlp.0.bias": "vit.merger_fc1.bias",
        "merger.mlp.2.weight": "vit.merger_fc2.weight",
        "merger.mlp.2.bias": "vit.merger_fc2.bias",
    }
    for b in range(cfg.depth):
        for official, ours in _VIT_BLOCK_TENSORS:
            m[f"blocks.{b}.{official}"] = f"vit.blocks.{b}.{ours}"
    return {prefix + k: v for k, v in m.items()}


def und_twin(official_key: str) -> str | None:
    """The und-expert key a gen-expert key falls back to (None for non-gen keys)."""
    return official_key.replace("_moe_gen", "") if "_moe_gen" in official_key else None


def convert(official_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Official tensor -> the layout of our parameter (only the ViT patch embedding differs)."""
    if official_key.endswith("patch_embed.proj.weight"):
        return tensor.reshape(tensor.shape[0], -1)
    return tensor


@dataclass
class LoadPlan:
    """Where each of our parameters comes from: `sources[ours] = (file role, official key)`."""

    sources: dict[str, tuple[str, str]] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)  # official key -> reason
    copied_from_und: list[str] = field(default_factory=list)  # gen keys absent from the file
    vit_from_model_file: bool = False


class CheckpointMismatch(ValueError):
    pass


def plan_load(model_keys: set[str], vit_keys: set[str], llm: LLMConfig, vit: ViTConfig) -> LoadPlan:
    """Match the keys of `model.safetensors` ("model") and `vit.safetensors` ("vit") to our parameters."""
    plan = LoadPlan()
    llm_map = llm_key_map(llm)
    embedded_vit = vit_key_map(vit, VIT_PREFIX_IN_MODEL_FILE)
    plan.vit_from_model_file = any(k.startswith(VIT_PREFIX_IN_MODEL_FILE) for k in model_keys)

    unexpected = sorted(k for k in model_keys if k not in llm_map and k not in embedded_vit and k not in IGNORED_KEYS)
    if plan.vit_from_model_file:
        vit_map, vit_role, vit_available = embedded_vit, "model", model_keys
    else:
        vit_map, vit_role, vit_available = vit_key_map(vit), "vit", vit_keys
        unexpected += sorted(f"vit.safetensors:{k}" for k in vit_keys if k not in vit_map)
    plan.ignored = {k: IGNORED_KEYS[k] for k in model_keys if k in IGNORED_KEYS}

    missing = []
    for official, ours in llm_map.items():
        if official in model_keys:
            plan.sources[ours] = ("model", official)
        elif (twin := und_twin(official)) is not None and twin in model_keys:
            plan.sources[ours] = ("model", twin)
            plan.copied_from_und.append(official)
        else:
            missing.append(official)
    for official, ours in vit_map.items():
        if official in vit_available:
            plan.sources[ours] = (vit_role, official)
        else:
            missing.append(f"{vit_role}:{official}")
    if missing or unexpected:
        raise CheckpointMismatch(_describe("missing", missing) + _describe("unexpected", unexpected))
    return plan


def _describe(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
    return f"{len(keys)} {what} checkpoint keys: {shown}. "
