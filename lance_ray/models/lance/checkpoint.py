"""Find a Lance checkpoint and stream its tensors onto the device.

Sources (`resolve_checkpoint`):
* `lance-tiny` (or `lance-tiny:<seed>`): the tiny random checkpoint, written once into the cache dir;
* a local directory holding the official layout, either `<root>/Lance_3B/...` (Hugging Face) or
  `<root>/downloads/Lance_3B/...` (what the official scripts use);
* `s3://bucket/prefix` (any fsspec URL with a scheme): the needed files are copied once per node into
  the cache dir, under a file lock so that several actors on a node download once;
* anything else is a Hugging Face repo id (e.g. `bytedance-research/Lance`), fetched with
  `snapshot_download(allow_patterns=...)` so an image job never downloads the video checkpoint and
  nobody downloads the VAE before a generation task needs it.

Loading (`load_lance_model`): the model is built on the `meta` device, then every parameter is read
alone from the safetensors file, converted to the target dtype and placed on the target device -- never
the whole fp32 model in RAM or on the GPU.  `torch.load` (the VAE) always uses `weights_only=True`.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import LLMConfig, ViTConfig
from .model import LanceModel
from .state_dict import convert, plan_load

log = logging.getLogger(__name__)

FAMILY_DIRS = {"image": "Lance_3B", "video": "Lance_3B_Video"}
VIT_DIR = "Qwen2.5-VL-ViT"
VAE_FILE = "Wan2.2_VAE.pth"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")  # the official loader prefers model over ema
TINY_SOURCE = "lance-tiny"


@dataclass(frozen=True)
class CheckpointFiles:
    family: str
    model_dir: Path  # llm_config.json, weights, tokenizer files
    vit_dir: Path  # config.json, vit.safetensors
    vae_path: Path | None  # Wan2.2_VAE.pth (None until a task needs it)

    @property
    def weights(self) -> Path:
        for name in WEIGHT_FILES:
            if (self.model_dir / name).exists():
                return self.model_dir / name
        raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {self.model_dir}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LANCE_RAY_CACHE", Path.home() / ".cache" / "lance-ray"))


def resolve_checkpoint(source: str, family: str, *, revision: str | None = None,
                       cache_dir: str | Path | None = None, with_vae: bool = False) -> CheckpointFiles:
    """Local paths of the files a `family` ("image" | "video") needs, downloading what is missing."""
    if family not in FAMILY_DIRS:
        raise ValueError(f"family must be one of {sorted(FAMILY_DIRS)}, got {family!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source == TINY_SOURCE or source.startswith(TINY_SOURCE + ":"):
        from .tiny import ensure_tiny_checkpoint

        seed = int(source.split(":", 1)[1]) if ":" in source else 0
        root = ensure_tiny_checkpoint(cache, seed)
    elif "://" in source:
        root = _fetch_fsspec(source, family, cache, with_vae)
    elif Path(source).expanduser().is_dir():
        root = Path(source).expanduser()
    elif source.startswith(("/", "./", "../", "~")) or source.count("/") != 1:
        # A hub id is exactly "namespace/name"; anything else was meant as a local directory.
        raise FileNotFoundError(f"no checkpoint directory at {source} (a local directory with Lance_3B/ or "
                                "downloads/Lance_3B/, a Hugging Face repo id, an s3:// URI, or lance-tiny)")
    else:
        root = _fetch_hub(source, revision, family, cache, with_vae)
    return _locate(root, family, with_vae)


def _locate(root: Path, family: str, with_vae: bool) -> CheckpointFiles:
    for base in (root, root / "downloads"):
        model_dir = base / FAMILY_DIRS[family]
        if (model_dir / "llm_config.json").exists():
            vae = base / VAE_FILE
            if with_vae and not vae.exists():
                raise FileNotFoundError(f"{vae} not found (needed for generation/editing)")
            return CheckpointFiles(family, model_dir, base / VIT_DIR, vae if with_vae else None)
    raise FileNotFoundError(f"no {FAMILY_DIRS[family]}/llm_config.json under {root} or {root / 'downloads'}")


def _wanted(family: str, with_vae: bool) -> list[str]:
    """Glob patterns (relative to the checkpoint root) of the files a family needs."""
    return [f"{FAMILY_DIRS[family]}/*", f"{VIT_DIR}/*"] + ([VAE_FILE] if with_vae else [])


def _fetch_hub(repo_id: str, revision: str | None, family: str, cache: Path, with_vae: bool) -> Path:
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id, revision=revision, allow_patterns=_wanted(family, with_vae),
                             cache_dir=str(cache / "hub"))
    return Path(path)


def _fetch_fsspec(url: str, family: str, cache: Path, with_vae: bool) -> Path:
    """Copy the needed files under `url` into the cache (one download per node, atomic per file)."""
    import fsspec
    from filelock import FileLock

    fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
    local = cache / "remote" / url.split("://", 1)[0] / root.strip("/")
    local.mkdir(parents=True, exist_ok=True)
    prefix = "downloads/" if fs.exists(f"{root}/downloads/{FAMILY_DIRS[family]}") else ""
    with FileLock(str(local) + ".lock"):
        for pattern in _wanted(family, with_vae):
            for remote in fs.glob(f"{root}/{prefix}{pattern}"):
                target = local / remote.strip("/")[len(root.strip("/")) + 1:]
                size = fs.size(remote)
                if target.exists() and target.stat().st_size == size:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".part")
                fs.get(remote, str(tmp))
                tmp.replace(target)
    return local


@dataclass(frozen=True)
class LoadStats:
    seconds: float
    peak_gpu_bytes: int  # torch.cuda.max_memory_allocated during the load (0 on CPU)
    peak_rss_bytes: int  # peak resident memory of the process so far (ru_maxrss), read after the load
    copied_from_und: tuple[str, ...]
    vit_from_model_file: bool


def load_configs(files: CheckpointFiles) -> tuple[LLMConfig, ViTConfig]:
    return LLMConfig.from_json(files.model_dir / "llm_config.json"), ViTConfig.from_json(files.vit_dir / "config.json")


def load_lance_model(files: CheckpointFiles, device: torch.device | str, dtype: torch.dtype) -> tuple[LanceModel, LoadStats]:
    """Build `LanceModel` on meta and fill it tensor by tensor from the checkpoint files."""
    device = torch.device(device)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    llm_cfg, vit_cfg = load_configs(files)
    with torch.device("meta"):
        model = LanceModel(llm_cfg, vit_cfg)
    paths = {"model": files.weights, "vit": files.vit_dir / "vit.safetensors"}
    with safe_open(str(paths["model"]), "pt") as f_model:
        model_keys = set(f_model.keys())
        vit_keys: set[str] = set()
        if paths["vit"].exists():
            with safe_open(str(paths["vit"]), "pt") as f_vit:
                vit_keys = set(f_vit.keys())
        plan = plan_load(model_keys, vit_keys, llm_cfg, vit_cfg)
        if plan.copied_from_und:
            log.warning("%d gen-expert tensors absent from %s; using their und twins (official copy_init_moe): %s",
                        len(plan.copied_from_und), paths["model"], plan.copied_from_und[:5])
        handles = {"model": f_model}
        if not plan.vit_from_model_file:
            handles["vit"] = safe_open(str(paths["vit"]), "pt")
        params = dict(model.named_parameters())

        def read(item: tuple[str, tuple[str, str]]) -> tuple[str, torch.Tensor]:
            name, (role, key) = item
            tensor = convert(key, handles[role].get_tensor(key))
            if tensor.shape != params[name].shape:
                raise ValueError(f"{paths[role]}:{key} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(params[name].shape)} for {name}")
            # On a GPU cast after the copy: the device converts far faster than one CPU thread.
            return name, (tensor.to(device).to(dtype) if device.type == "cuda" else tensor.to(dtype))

        for name, tensor in _bounded_map(read, list(plan.sources.items())):
            _assign(model, name, tensor)
    model.eval().requires_grad_(False)
    stats = LoadStats(
        seconds=time.perf_counter() - start,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        copied_from_und=tuple(plan.copied_from_und),
        vit_from_model_file=plan.vit_from_model_file,
    )
    log.info("loaded %s in %.1fs (%s, %s)", files.model_dir, stats.seconds, device, dtype)
    return model, stats


def _bounded_map(fn, items: list, workers: int = 4, window: int = 8):
    """`map(fn, items)` on a few threads (file reads overlap), at most `window` results in flight so
    only a handful of tensors are ever held in host memory at once."""
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(fn, item) for item in items[:window])
        for item in items[window:]:
            yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
