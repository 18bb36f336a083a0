"""Stream a resolved checkpoint's tensors onto the device: `load_lance_model(files, device, dtype)`.

The model is built on the `meta` device, then every parameter is read alone from the safetensors file,
converted to the target dtype and placed on the target device -- never the whole fp32 model in RAM or on
the GPU.  Last, the backbone joins its q/k/v and gate/up projections (`LanguageModel.fuse_projections`).  Which file key fills which parameter is state_dict.py's business; where the files are,
checkpoint.py's.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from .checkpoint import CheckpointFiles
from .config import LLMConfig, ViTConfig
from .model import LanceModel
from .state_dict import convert, plan_load

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadStats:
    seconds: float
    peak_gpu_bytes: int  # torch.cuda.max_memory_allocated during the load (0 on CPU)
    peak_rss_bytes: int  # peak resident memory of the process so far (ru_maxrss), read after the load
    copied_from_und: tuple[str, ...]
    vit_from_model_file: bool


def load_configs(files: CheckpointFiles) -> tuple[LLMConfig, ViTConfig]:
    return LLMConfig.from_json(files.model_dir / "llm_config.json"), ViTConfig.from_json(files.vit_dir / "config.json")


def load_lance_model(files: CheckpointFiles, device: torch.device | str, dtype: torch.dtype, *,
                     understanding_only: bool = False) -> tuple[LanceModel, LoadStats]:
    """Build `LanceModel` on meta and fill it tensor by tensor from the checkpoint files.

    `understanding_only` leaves the generation-only parameters (`LanceModel.generation_only`) on the meta
    device: never read, never on the GPU."""
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

        wanted = [(n, src) for n, src in plan.sources.items()
                  if not (understanding_only and LanceModel.generation_only(n))]
        for name, tensor in _bounded_map(read, wanted):
            _assign(model, name, tensor)
    model.llm.fuse_projections()  # q|k|v and gate|up as one matmul each, now that every part is loaded
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
