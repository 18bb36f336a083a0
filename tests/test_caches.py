"""Where checkpoints are cached: hub checkpoints in huggingface_hub's standard cache (so a Lance already
downloaded with `huggingface-cli download` is reused), what lance-ray makes itself in LANCE_RAY_CACHE."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache_with_lance(hub: Path, tiny_ckpt: Path) -> Path:
    """huggingface_hub's cache layout holding the tiny checkpoint as `bytedance-research/Lance` at main, as a
    download by any hub tool leaves it."""
    repo = hub / "models--bytedance-research--Lance"
    snapshot = repo / "snapshots" / COMMIT
    for name in ("Lance_3B", "Qwen2.5-VL-ViT"):
        shutil.copytree(tiny_ckpt / name, snapshot / name)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _resolve_in_subprocess(env: dict[str, str]) -> Path:
    code = ("from lance_ray.models.lance import resolve_checkpoint; "
            "print(resolve_checkpoint('bytedance-research/Lance', 'image').model_dir)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def test_hub_checkpoints_come_from_the_standard_cache(tiny_ckpt: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LANCE_RAY_CACHE"))}
    env.update(HF_HUB_OFFLINE="1", LANCE_RAY_CACHE=str(tmp_path / "lance-ray-cache"))

    snapshot = _hub_cache_with_lance(tmp_path / "hf-home" / "hub", tiny_ckpt)
    assert _resolve_in_subprocess({**env, "HF_HOME": str(tmp_path / "hf-home")}) == snapshot / "Lance_3B"

    elsewhere = _hub_cache_with_lance(tmp_path / "nvme" / "hub-cache", tiny_ckpt)
    found = _resolve_in_subprocess({**env, "HF_HUB_CACHE": str(tmp_path / "nvme" / "hub-cache")})
    assert found == elsewhere / "Lance_3B"
    assert not (tmp_path / "lance-ray-cache").exists()  # nothing downloaded twice into lance-ray's own cache
