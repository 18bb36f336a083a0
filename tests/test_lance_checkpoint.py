"""Tiny checkpoint writer, source resolution and tensor-by-tensor loading."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lance_ray.models.lance.checkpoint import resolve_checkpoint
from lance_ray.models.lance.loader import load_lance_model
from lance_ray.models.lance.state_dict import CheckpointMismatch

# sha256 of the parity harness's seed-0 files (shared/lance/golden/MANIFEST.json), the goldens' checkpoint.
HARNESS_SHA256 = {
    "Lance_3B/model.safetensors": "7d1a0e25aa8dcd80881969dc031e7ed4168fec14d3b878636685f1d721cb1d5b",
    "Lance_3B_Video/model.safetensors": "dff9df59be4d3077332cecbcbcf5d6f0907ec9b6ee261099a1814ec7057c6403",
    "Qwen2.5-VL-ViT/vit.safetensors": "affc4ec11c4ef87248eae0fe4180b16ed28e7d8737356e6ca7df592e387d5db9",
    "Lance_3B/vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "Lance_3B/merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
    "Lance_3B/tokenizer_config.json": "799b7b49189ffa6c773120b65b767514e8ce2962b2b45bb1204a2a168e3405d1",
    "Lance_3B/llm_config.json": "5e23e70de566171f9cde7f71eb09fd25b77005ec56d323e516f05ca9e75a9ef4",
    "Qwen2.5-VL-ViT/config.json": "47c421b3188a5ca852acba1556ab91450fd4f00dc388fd3265a288f777f3b640",
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("rel", sorted(HARNESS_SHA256))
def test_tiny_checkpoint_is_byte_identical_to_the_goldens_checkpoint(tiny_ckpt: Path, rel: str) -> None:
    assert _sha(tiny_ckpt / rel) == HARNESS_SHA256[rel]


def test_tiny_checkpoint_has_the_official_layout(tiny_ckpt: Path) -> None:
    for family in ("Lance_3B", "Lance_3B_Video"):
        names = {p.name for p in (tiny_ckpt / family).iterdir()}
        assert {"llm_config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"} <= names
    assert (tiny_ckpt / "Wan2.2_VAE.pth").exists()
    image_keys = set(load_file(tiny_ckpt / "Lance_3B/model.safetensors"))
    video_keys = set(load_file(tiny_ckpt / "Lance_3B_Video/model.safetensors"))
    assert video_keys - image_keys == {k for k in video_keys if k.startswith("vit_model.")}
    assert len(image_keys) == 69 and len(video_keys) == 69 + 54  # harness README §2


@pytest.mark.parametrize("family", ["image", "video"])
def test_resolve_accepts_hf_and_downloads_layouts(tiny_ckpt: Path, tmp_path: Path, family: str) -> None:
    hf = resolve_checkpoint(str(tiny_ckpt), family)
    (tmp_path / "downloads").symlink_to(tiny_ckpt, target_is_directory=True)
    official = resolve_checkpoint(str(tmp_path), family)
    assert hf.model_dir.name == official.model_dir.name == {"image": "Lance_3B", "video": "Lance_3B_Video"}[family]
    assert official.model_dir.parent.name == "downloads"
    assert resolve_checkpoint(str(tiny_ckpt), family, with_vae=True).vae_path == tiny_ckpt / "Wan2.2_VAE.pth"


def test_lance_tiny_short_name_is_cached(tiny_ckpt: Path) -> None:
    files = resolve_checkpoint("lance-tiny", "image", cache_dir=tiny_ckpt.parent)
    assert files.model_dir == tiny_ckpt / "Lance_3B"


def test_load_matches_file_values_and_video_vit_overrides(tiny_ckpt: Path) -> None:
    image, stats = load_lance_model(resolve_checkpoint(str(tiny_ckpt), "image"), "cpu", torch.float32)
    video, vstats = load_lance_model(resolve_checkpoint(str(tiny_ckpt), "video"), "cpu", torch.float32)
    sd = load_file(tiny_ckpt / "Lance_3B/model.safetensors")
    vit = load_file(tiny_ckpt / "Qwen2.5-VL-ViT/vit.safetensors")
    vsd = load_file(tiny_ckpt / "Lance_3B_Video/model.safetensors")
    assert torch.equal(image.llm.layers[1].gen.k_norm.weight,
                       sd["language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"].float())
    assert torch.equal(image.llm.layers[0].und.mlp_norm.weight,
                       sd["language_model.model.layers.0.post_attention_layernorm.weight"].float())
    assert torch.equal(image.vit.blocks[2].qkv.bias, vit["blocks.2.attn.qkv.bias"].float())
    assert torch.equal(video.vit.blocks[2].qkv.bias, vsd["vit_model.blocks.2.attn.qkv.bias"].float())
    assert not torch.equal(video.vit.blocks[2].qkv.bias, image.vit.blocks[2].qkv.bias)
    assert not stats.vit_from_model_file and vstats.vit_from_model_file
    assert stats.seconds > 0 and stats.peak_rss_bytes > 0
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in image.parameters())


def _copy_family(tiny_ckpt: Path, dst: Path) -> Path:
    for name in ("Lance_3B", "Qwen2.5-VL-ViT"):
        shutil.copytree(tiny_ckpt / name, dst / name)
    return dst


def test_missing_and_unexpected_keys_are_named(tiny_ckpt: Path, tmp_path: Path) -> None:
    root = _copy_family(tiny_ckpt, tmp_path)
    path = root / "Lance_3B/model.safetensors"
    sd = load_file(path)
    del sd["language_model.model.layers.0.mlp.up_proj.weight"]
    sd["some.extra.weight"] = torch.zeros(2)
    save_file(sd, path)
    with pytest.raises(CheckpointMismatch, match=r"layers\.0\.mlp\.up_proj\.weight.*some\.extra\.weight"):
        load_lance_model(resolve_checkpoint(str(root), "image"), "cpu", torch.float32)


def test_missing_gen_expert_falls_back_to_und_twin_and_ema_is_used(tiny_ckpt: Path, tmp_path: Path) -> None:
    root = _copy_family(tiny_ckpt, tmp_path)
    model_file = root / "Lance_3B/model.safetensors"
    sd = load_file(model_file)
    gen_key = "language_model.model.layers.1.mlp_moe_gen.down_proj.weight"
    del sd[gen_key]
    model_file.unlink()
    save_file(sd, root / "Lance_3B/ema.safetensors")  # only ema present: the official loader falls back to it
    model, stats = load_lance_model(resolve_checkpoint(str(root), "image"), "cpu", torch.float32)
    assert stats.copied_from_und == (gen_key,)
    assert torch.equal(model.llm.layers[1].gen.down_proj.weight, model.llm.layers[1].und.down_proj.weight)


def test_s3_source_downloads_once(tiny_ckpt: Path, tmp_path: Path, s3_server: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("ckpts")
    for rel in ("Lance_3B/llm_config.json", "Lance_3B/model.safetensors", "Lance_3B/vocab.json",
                "Lance_3B/merges.txt", "Lance_3B/tokenizer_config.json", "Qwen2.5-VL-ViT/config.json",
                "Qwen2.5-VL-ViT/vit.safetensors"):
        fs.put(str(tiny_ckpt / rel), f"ckpts/lance/downloads/{rel}")
    files = resolve_checkpoint("s3://ckpts/lance", "image", cache_dir=tmp_path)
    assert files.model_dir.parent.name == "downloads"
    assert _sha(files.weights) == HARNESS_SHA256["Lance_3B/model.safetensors"]
    stamp = files.weights.stat().st_mtime_ns
    again = resolve_checkpoint("s3://ckpts/lance", "image", cache_dir=tmp_path)
    assert again.weights.stat().st_mtime_ns == stamp  # cached, not fetched again
    assert not (tmp_path / "remote/s3/ckpts/lance/downloads/Lance_3B_Video").exists()
    assert json.loads((files.model_dir / "llm_config.json").read_text())["hidden_size"] == 128


def test_hub_source_downloads_only_what_the_family_needs(tiny_ckpt: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import fnmatch

    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, cache_dir=None):
        calls.append((repo_id, revision, list(allow_patterns)))
        snap = tmp_path / "snap" / str(len(calls))
        for path in tiny_ckpt.rglob("*"):
            rel = path.relative_to(tiny_ckpt).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, snap / rel)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    files = resolve_checkpoint("bytedance-research/Lance", "image", revision="abc123", cache_dir=tmp_path)
    assert calls[0][:2] == ("bytedance-research/Lance", "abc123")
    assert files.vae_path is None and files.weights.exists()
    assert not (files.model_dir.parent / "Lance_3B_Video").exists()
    assert not (files.model_dir.parent / "Wan2.2_VAE.pth").exists()
    with_vae = resolve_checkpoint("bytedance-research/Lance", "image", revision="abc123", cache_dir=tmp_path,
                                  with_vae=True)
    assert with_vae.vae_path is not None and with_vae.vae_path.exists()
