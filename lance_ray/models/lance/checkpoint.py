"""Find the files of a Lance checkpoint family, downloading what is missing.  No torch here.

Sources (`resolve_checkpoint`; which kind a string is follows `source.source_kind`):
* `lance-tiny` (or `lance-tiny:<seed>`): the tiny random checkpoint, written once into the cache dir;
* a local directory holding the official layout, either `<root>/Lance_3B/...` (Hugging Face) or
  `<root>/downloads/Lance_3B/...` (what the official scripts use);
* `s3://bucket/prefix` (any fsspec URL with a scheme): the needed files are copied once per node into
  the cache dir, under a file lock so that several actors on a node download once;
* a Hugging Face repo id `owner/name` (e.g. `bytedance-research/Lance`), fetched with
  `snapshot_download(allow_patterns=...)` so an image job never downloads the video checkpoint and
  nobody downloads the VAE before a generation task needs it. It goes to huggingface_hub's own cache
  (`~/.cache/huggingface/hub`, or `$HF_HUB_CACHE`, or `$HF_HOME/hub`), where any other download of the
  same repo already is, unless a `cache_dir` is given (then `<cache_dir>/hub`).

The cache dir (`cache_dir`, else `$LANCE_RAY_CACHE`, else `~/.cache/lance-ray`) holds what lance-ray makes
itself: the tiny checkpoint and the copies of `s3://` checkpoints.

Putting the tensors on a device is loader.py's job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .source import default_cache_dir, parse_tiny, source_kind

log = logging.getLogger(__name__)

FAMILY_DIRS = {"image": "Lance_3B", "video": "Lance_3B_Video"}
VIT_DIR = "Qwen2.5-VL-ViT"
VAE_FILE = "Wan2.2_VAE.pth"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")  # the official loader prefers model over ema


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


def resolve_checkpoint(source: str, family: str, *, revision: str | None = None,
                       cache_dir: str | Path | None = None, with_vae: bool = False) -> CheckpointFiles:
    """Local paths of the files a `family` ("image" | "video") needs, downloading what is missing."""
    if family not in FAMILY_DIRS:
        raise ValueError(f"family must be one of {sorted(FAMILY_DIRS)}, got {family!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    hub_cache = Path(cache_dir) / "hub" if cache_dir is not None else None  # None: huggingface_hub's default
    kind = source_kind(source)
    if kind == "tiny":
        from .tiny import ensure_tiny_checkpoint  # torch: only when the tiny checkpoint is asked for

        root = ensure_tiny_checkpoint(cache, parse_tiny(source))
    elif kind == "uri":
        root = _fetch_fsspec(source, family, cache, with_vae)
    elif kind == "hub":
        if Path(source).is_dir():
            log.warning("%r is read as a Hugging Face repo id; write ./%s for the local directory",
                        source, source)
        root = _fetch_hub(source, revision, family, hub_cache, with_vae)
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"no checkpoint directory at {source} (a local directory with "
                                    "Lance_3B/ or downloads/Lance_3B/, a Hugging Face repo id, an s3:// URI, "
                                    "or lance-tiny)")
    return _locate(root, family, with_vae)


def _locate(root: Path, family: str, with_vae: bool) -> CheckpointFiles:
    for base in (root, root / "downloads"):
        model_dir = base / FAMILY_DIRS[family]
        if (model_dir / "llm_config.json").exists():
            vae = base / VAE_FILE
            if with_vae and not vae.exists():
                raise FileNotFoundError(f"{vae} not found (needed for generation/editing)")
            return CheckpointFiles(family, model_dir, base / VIT_DIR, vae if with_vae else None)
    hint = _where_instead(root, family)
    raise FileNotFoundError(f"no {FAMILY_DIRS[family]}/llm_config.json under {root} or {root / 'downloads'}"
                            + (f"; {hint}" if hint else ""))


def _where_instead(root: Path, family: str) -> str | None:
    """A hint when `root` is one level off a checkpoint root: a folder inside the checkpoint (`Lance_3B/`,
    `Qwen2.5-VL-ViT/`, ...), or a folder holding the checkpoint one level down."""
    family_dir = FAMILY_DIRS[family]
    if (root.parent / family_dir / "llm_config.json").exists():
        where = f"{family_dir}/ itself" if root.name == family_dir else f"{root.name}/, beside {family_dir}/"
        return f"this is {where}, inside the checkpoint: use {root.parent}"
    children = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for child in children:
        for base in (child, child / "downloads"):
            if (base / family_dir / "llm_config.json").exists():
                return f"it holds the checkpoint one level down ({base.relative_to(root)}/{family_dir}/): use {child}"
    return None


def _wanted(family: str, with_vae: bool) -> list[str]:
    """Glob patterns (relative to the checkpoint root) of the files a family needs."""
    return [f"{FAMILY_DIRS[family]}/*", f"{VIT_DIR}/*"] + ([VAE_FILE] if with_vae else [])


def _fetch_hub(repo_id: str, revision: str | None, family: str, cache: Path | None, with_vae: bool) -> Path:
    """The repo's files a family needs, in `cache` or (None) huggingface_hub's default cache, which follows
    `HF_HUB_CACHE` / `HF_HOME` and is shared with every other tool that downloads from the hub."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id, revision=revision, allow_patterns=_wanted(family, with_vae),
                             cache_dir=None if cache is None else str(cache))
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
