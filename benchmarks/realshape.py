"""Random weights at the real Lance_3B / Lance_3B_Video shapes, for GPU benchmarks without downloads.

    random_model(family, device)          LanceModel in bf16 with random weights, built on the device, its
                                          projections fused as the loader leaves them
    write_checkpoint(root, family)        the official on-disk layout at real shapes (model.safetensors in
                                          float32 like the published file, vit.safetensors in bf16, the
                                          full-size Wan2.2 VAE, tokenizer files), for load-time benchmarks

Values are N(0, 0.02²) for matrices and 1 for norm weights: timings do not depend on them, but they keep
activations finite in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lance_ray.models.lance.config import LLMConfig, ViTConfig
from lance_ray.models.lance.model import LanceModel
from lance_ray.models.lance.state_dict import IGNORED_KEYS, VIT_PREFIX_IN_MODEL_FILE, llm_key_map, vit_key_map
from lance_ray.models.lance.tiny import llm_config_dict, vit_config_dict, write_tokenizer

# Rows of the fixed latent position table each official file carries (frames x 64 x 64).
POS_TABLE_ROWS = {"image": 1 * 64 * 64, "video": 31 * 64 * 64}
FAMILY_DIR = {"image": "Lance_3B", "video": "Lance_3B_Video"}


def configs() -> tuple[LLMConfig, ViTConfig]:
    return LLMConfig.lance_3b(), ViTConfig.qwen25_vl()


@torch.no_grad()
def _fill_random(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


def random_model(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 shapes: tuple[LLMConfig, ViTConfig] | None = None, fused: bool = True) -> LanceModel:
    """`fused=False` keeps the checkpoint's layout (separate q/k/v, gate/up), for writing checkpoints."""
    llm, vit = shapes or configs()
    with torch.device("meta"):
        model = LanceModel(llm, vit)
    model = model.to_empty(device=device).to(dtype)
    _fill_random(model, seed)
    if fused:
        model.llm.fuse_projections()
    return model.eval().requires_grad_(False)


def write_checkpoint(root: Path, family: str = "image", seed: int = 0, with_vae: bool = True,
                     shapes: tuple[LLMConfig, ViTConfig] | None = None, weights_dtype: str = "float32") -> Path:
    """Writes `root/{Lance_3B|Lance_3B_Video, Qwen2.5-VL-ViT, Wan2.2_VAE.pth}` (real shapes by default).

    `weights_dtype`: float32 like the published model file (load-time benchmarks), or bfloat16 (half the
    bytes to write and read when only the speed of inference is measured)."""
    llm, vit = shapes or configs()
    model = random_model("cuda" if torch.cuda.is_available() else "cpu", torch.float32, seed, (llm, vit), fused=False)
    params = dict(model.named_parameters())
    model_dir = root / FAMILY_DIR[family]
    vit_dir = root / "Qwen2.5-VL-ViT"
    model_dir.mkdir(parents=True, exist_ok=True)
    vit_dir.mkdir(parents=True, exist_ok=True)

    def official(mapping: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = {}
        for key, ours in mapping.items():
            tensor = params[ours].detach()
            if key.endswith("patch_embed.proj.weight"):  # the official Conv3d kernel [D, C, Tp, P, P]
                tensor = tensor.reshape(vit.hidden_size, 3, vit.temporal_patch_size, vit.patch_size, vit.patch_size)
            tensors[key] = tensor.to(dtype).cpu().contiguous()
        return tensors

    file_dtype = getattr(torch, weights_dtype)
    weights = official(llm_key_map(llm), file_dtype)  # the published model files are float32
    (pos_key,) = IGNORED_KEYS
    weights[pos_key] = torch.zeros(POS_TABLE_ROWS[family] * llm.max_latent_size**2 // 4096, llm.hidden_size)
    if family == "video":
        weights.update(official(vit_key_map(vit, VIT_PREFIX_IN_MODEL_FILE), file_dtype))
    save_file(weights, str(model_dir / "model.safetensors"))
    del weights
    save_file(official(vit_key_map(vit), torch.bfloat16), str(vit_dir / "vit.safetensors"))
    (model_dir / "llm_config.json").write_text(json.dumps(llm_config_dict(llm, vit), indent=2))
    (vit_dir / "config.json").write_text(json.dumps(vit_config_dict(vit, llm.tokens_per_second), indent=2))
    write_tokenizer(model_dir)
    if with_vae:
        from lance_ray.models.lance.vae import VAEConfig, random_vae_state_dict

        torch.save(random_vae_state_dict(VAEConfig.wan22(), seed), root / "Wan2.2_VAE.pth")
    return root
