"""Wan 2.2 VAE (lance_ray.models.lance.vae) against the official code's goldens on the small-width model.

Fixtures: tests/fixtures/golden/vae_small (see its README).  Thresholds from golden/README §10: mu /
log_var / latents max_rel <= 1e-4, decoded floats max_abs <= 1e-4, uint8 within 1 LSB on >= 99.9 %;
bf16 (the reference's bf16 flow) cos >= 0.999, max_rel <= 5 %.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lance_ray.models.lance.vae import (
    LATENT_MEAN,
    LATENT_STD,
    VAEConfig,
    WanVAE,
    load_vae,
    random_vae_state_dict,
    to_uint8,
)

FIXTURES = Path(__file__).parent / "fixtures" / "golden"
SMALL = FIXTURES / "vae_small"
CASES = {"img_304x224": ("image", 1234), "vid_304x224_5f12": ("video", 1235)}  # input, eps seed


def golden(case: str, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    return load_file(SMALL / dtype / case / "tensors.safetensors")


def pixels(case: str) -> torch.Tensor:
    u8 = load_file(FIXTURES / "inputs" / "preprocess_fp32_kv.safetensors")[
        f"{CASES[case][0]}.vae_input_u8_cthw"
    ]
    return u8.float().div(255).sub(0.5).div(0.5)  # the official float input, [3, T, H, W]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def assert_uint8_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours.int() - ref.int()).abs()
    assert ours.shape == ref.shape and ours.dtype == torch.uint8
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3


def latent(z_thwc: torch.Tensor) -> torch.Tensor:
    return z_thwc.permute(3, 0, 1, 2)[None]  # (t, h, w, 48) -> [1, 48, t, h, w]


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return random_vae_state_dict(VAEConfig.small(), 0)


@pytest.fixture(scope="module")
def vae(state_dict: dict[str, torch.Tensor]) -> WanVAE:
    return WanVAE.from_state_dict(state_dict)


@contextmanager
def recording(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect every output of the given modules while the block runs."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    hooks = [
        m.register_forward_hook(lambda _m, _a, y, n=name: out[n].append(y)) for name, m in modules.items()
    ]
    try:
        yield out
    finally:
        for hook in hooks:
            hook.remove()


# --------------------------------------------------------------------------------------------------
# weights and layout
# --------------------------------------------------------------------------------------------------
def test_random_weights_are_the_golden_model(state_dict: dict[str, torch.Tensor]) -> None:
    cfg = json.loads((SMALL / "vae_small_config.json").read_text())
    assert [(k, list(v.shape)) for k, v in state_dict.items()] == [(k, s) for k, s in cfg["state_dict_keys"]]
    h = hashlib.sha256()  # the config's torch-independent content hash: key | shape | float32 LE bytes
    for key in sorted(state_dict):
        v = state_dict[key].contiguous().numpy().astype("<f4")
        h.update(key.encode() + b"|" + str(list(v.shape)).encode() + b"|" + v.tobytes())
    assert h.hexdigest() == cfg["weights"]["content_sha256"]
    assert sum(v.numel() for v in state_dict.values()) == cfg["weights"]["params"]
    assert VAEConfig.from_state_dict(state_dict) == VAEConfig.small()


def test_full_size_layout() -> None:
    with torch.device("meta"):
        sd = WanVAE(VAEConfig.wan22()).state_dict()
    assert len(sd) == 196
    assert sum(v.numel() for v in sd.values()) == 704_688_668  # Wan2.2_VAE.pth (LANCE_FACTS §1.1)
    assert tuple(sd["decoder.upsamples.0.upsamples.3.time_conv.weight"].shape) == (2048, 1024, 3, 1, 1)
    assert VAEConfig.from_state_dict(sd) == VAEConfig.wan22()


def test_load_file_strict(tmp_path: Path, state_dict: dict[str, torch.Tensor], vae: WanVAE) -> None:
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save(state_dict, path)
    loaded = load_vae(path)
    assert loaded.config == VAEConfig.small() and loaded.dtype == torch.float32
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), vae.state_dict().values(), strict=True)
    )
    with pytest.raises(RuntimeError, match="Unexpected key"):
        WanVAE.from_state_dict({**state_dict, "encoder.extra.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------------
def test_normalisation_constants(vae: WanVAE) -> None:
    g = golden("img_304x224")
    mean, inv_std = vae.latent_stats(torch.device("cpu"))
    assert torch.equal(mean.flatten(), g["norm_mean"]) and torch.equal(inv_std.flatten(), g["norm_inv_std"])
    assert len(LATENT_MEAN) == len(LATENT_STD) == 48


def test_encoder_stages(vae: WanVAE) -> None:
    g = golden("img_304x224")
    enc = vae.encoder
    stages = {f"down{i}": block for i, block in enumerate(enc.downsamples)}
    stages.update(middle=enc.middle[2], head=enc.head[2])
    with recording({**stages, "mu_logvar": vae.conv1}) as out:
        vae.encode(pixels("img_304x224"))
    for name in stages:
        assert max_rel(out[name][0], g[f"enc_stage_{name}_chunk0"]) <= 1e-4, name
    assert max_rel(out["head"][0], g["enc_encoder_out"]) <= 1e-4
    assert max_rel(out["mu_logvar"][0][:, :48], g["enc_mu_raw"]) <= 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_and_sample(vae: WanVAE, case: str) -> None:
    g = golden(case)
    mu, log_var = vae.encode(pixels(case))
    assert mu.shape == g["enc_mu_norm"].shape and mu.dtype == torch.float32
    assert max_rel(mu, g["enc_mu_norm"]) <= 1e-4
    assert max_rel(log_var, g["enc_log_var"]) <= 1e-4
    # the golden eps is the default CPU generator's draw after manual_seed(eps seed)
    z = vae.sample(mu, log_var, torch.Generator().manual_seed(CASES[case][1]))
    assert torch.equal(z, vae.sample(mu, log_var, eps=g["enc_eps"]))
    assert max_rel(z, g["enc_sample"]) <= 1e-4
    given = vae.sample(g["enc_mu_norm"], g["enc_log_var"], eps=g["enc_eps"])
    assert max_rel(given, g["enc_sample"]) <= 1e-6


def test_encode_ignores_frames_after_4k_plus_1(vae: WanVAE) -> None:
    x = pixels("vid_304x224_5f12")[:, :, :64, :64]
    extra = torch.cat([x, x[:, :3]], dim=1)  # 8 frames: the last 3 cannot form a chunk
    mu, _ = vae.encode(x)
    mu_extra, _ = vae.encode(extra)
    assert mu.shape[2] == 2 and torch.equal(mu, mu_extra)
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(x[:, :, :40])


# --------------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["img_304x224", "rand_latent_3x4x5"])
def decoded(request: pytest.FixtureRequest, vae: WanVAE) -> tuple[str, list[torch.Tensor], dict]:
    """One decode per case, with the decoder's stages recorded."""
    dec = vae.decoder
    modules = {
        "conv2": vae.conv2,
        "conv1": dec.conv1,
        "middle": dec.middle[2],
        "up0": dec.upsamples[0],
        "decoder": dec,
    }
    with recording(modules) as out:
        chunks = list(vae.decode_chunks(latent(golden(request.param)["dec_input_thwc"])))
    return request.param, chunks, out


def test_decode_floats_and_uint8(decoded: tuple[str, list[torch.Tensor], dict]) -> None:
    case, chunks, out = decoded
    g = golden(case)
    assert max_rel(out["conv2"][0], g["dec_conv2_out"]) <= 1e-4
    pre_clamp = torch.cat(chunks, dim=2)[0]
    assert pre_clamp.shape == g["dec_out_preclamp"].shape
    assert max_abs(pre_clamp, g["dec_out_preclamp"]) <= 1e-4
    assert float((pre_clamp.abs() > 1).float().mean()) > 0  # the clamp matters for this case
    assert_uint8_close(to_uint8(pre_clamp).permute(1, 2, 3, 0), g["dec_uint8_thwc"])


def test_decoder_stages_per_latent_frame(decoded: tuple[str, list[torch.Tensor], dict]) -> None:
    case, chunks, out = decoded
    t = golden(case)["dec_input_thwc"].shape[0]
    # one decoder call per latent frame, each fed a single latent frame: 1 pixel frame, then 4 per call
    assert len(out["decoder"]) == t and [c.shape[2] for c in chunks] == [1] + [4] * (t - 1)
    if case == "rand_latent_3x4x5":
        g = golden(case)
        for name in ("conv1", "middle", "up0"):
            for i in range(t):
                assert max_rel(out[name][i], g[f"dec_stage_{name}_chunk{i}"]) <= 1e-4, (name, i)


def test_decode_video_sample(vae: WanVAE) -> None:
    g = golden("vid_304x224_5f12")
    frames = vae.decode_uint8(latent(g["enc_sample"][0].permute(1, 2, 3, 0)))
    assert_uint8_close(frames[0], g["dec_uint8_thwc"])


def test_denormalisation(vae: WanVAE) -> None:
    g = golden("rand_latent_3x4x5")
    mean, inv_std = vae.latent_stats(torch.device("cpu"))
    assert torch.equal(latent(g["dec_input_thwc"]) / inv_std + mean, g["dec_z_denorm"])


def test_decode_is_causal_and_apis_agree(vae: WanVAE) -> None:
    z = torch.randn(2, 48, 3, 2, 3, generator=torch.Generator().manual_seed(0))  # batch of 2, small frames
    frames = vae.decode_uint8(z)
    assert frames.shape == (2, 9, 32, 48, 3) and frames.dtype == torch.uint8
    # the frames of a latent prefix are exactly the prefix of the frames
    assert torch.equal(vae.decode_uint8(z[:, :, :2]), frames[:, :5])
    clamped = vae.decode(z)
    assert float(clamped.abs().max()) <= 1
    assert torch.equal(to_uint8(clamped).permute(0, 2, 3, 4, 1), frames)


# --------------------------------------------------------------------------------------------------
# bf16 (the reference's bf16 dtype flow, loosely)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow  # bf16 convolutions are slow on CPU (~15 s)
def test_bf16(state_dict: dict[str, torch.Tensor]) -> None:
    vae16 = WanVAE.from_state_dict(state_dict, dtype=torch.bfloat16)
    assert vae16.dtype == torch.bfloat16
    g = golden("img_304x224", "bf16")
    mu, log_var = vae16.encode(pixels("img_304x224"))
    assert cos(mu, g["enc_mu_norm"]) >= 0.999 and max_rel(mu, g["enc_mu_norm"]) <= 0.05
    assert cos(log_var, g["enc_log_var"]) >= 0.999 and max_rel(log_var, g["enc_log_var"]) <= 0.05
    # the bf16 golden decodes the fp32 latent; its first 2 latent frames (5 pixel frames) suffice, as
    # decoding is causal, and bf16 convs are slow on CPU
    z = latent(golden("rand_latent_3x4x5")["dec_input_thwc"])[:, :, :2]
    pre = torch.cat(list(vae16.decode_chunks(z)), dim=2)[0]
    ref = golden("rand_latent_3x4x5", "bf16")["dec_out_preclamp"][:, :5]
    assert cos(pre, ref) >= 0.999 and max_rel(pre, ref) <= 0.05


# --------------------------------------------------------------------------------------------------
# an independent implementation: diffusers' AutoencoderKLWan, fed the same weights through a key map
# --------------------------------------------------------------------------------------------------
def diffusers_key(key: str) -> str:
    rules = [
        (r"^conv1\.", "quant_conv."),
        (r"^conv2\.", "post_quant_conv."),
        (r"\.shortcut\.", ".conv_shortcut."),
    ]
    rules += [
        (rf"\.residual\.{i}\.", f".{name}.")
        for i, name in ((0, "norm1"), (2, "conv1"), (3, "norm2"), (6, "conv2"))
    ]
    for side, blocks, new, n_res, resampler in (
        ("encoder", "downsamples", "down_blocks", 2, "downsampler"),
        ("decoder", "upsamples", "up_blocks", 3, "upsampler"),
    ):
        rules += [
            (rf"^{side}\.conv1\.", f"{side}.conv_in."),
            (rf"^{side}\.head\.0\.", f"{side}.norm_out."),
            (rf"^{side}\.head\.2\.", f"{side}.conv_out."),
            (rf"^{side}\.middle\.0\.", f"{side}.mid_block.resnets.0."),
            (rf"^{side}\.middle\.1\.", f"{side}.mid_block.attentions.0."),
            (rf"^{side}\.middle\.2\.", f"{side}.mid_block.resnets.1."),
            (rf"^{side}\.{blocks}\.(\d+)\.{blocks}\.{n_res}\.", rf"{side}.{new}.\1.{resampler}."),
            (rf"^{side}\.{blocks}\.(\d+)\.{blocks}\.(\d+)\.", rf"{side}.{new}.\1.resnets.\2."),
        ]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def test_matches_diffusers(state_dict: dict[str, torch.Tensor], vae: WanVAE) -> None:
    from diffusers import AutoencoderKLWan

    cfg = VAEConfig.small()
    ref = AutoencoderKLWan(
        base_dim=cfg.dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim, is_residual=True, in_channels=12,
        out_channels=12, patch_size=2, scale_factor_spatial=16, temperal_downsample=list(cfg.temporal_downsample),
    )  # fmt: skip
    ref.load_state_dict({diffusers_key(k): v for k, v in state_dict.items()}, strict=True)
    ref.eval()
    x = pixels("vid_304x224_5f12")[None, :, :, :96, :128]
    mean, inv_std = vae.latent_stats(torch.device("cpu"))
    with torch.no_grad():
        mu_raw, log_var_ref = ref.encode(x).latent_dist.parameters.chunk(2, dim=1)
        mu, log_var = vae.encode(x)
        assert max_rel(mu, (mu_raw - mean) * inv_std) <= 1e-5 and max_rel(log_var, log_var_ref) <= 1e-5
        z = latent(golden("rand_latent_3x4x5")["dec_input_thwc"])
        assert max_abs(vae.decode(z), ref.decode(z / inv_std + mean).sample) <= 1e-5
