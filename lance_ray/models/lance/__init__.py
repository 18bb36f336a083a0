"""Clean-room Lance inference.  The names below are what the rest of lance_ray uses; ARCHITECTURE.md maps
the modules behind them.

Importing this package does not import torch.  The driver side of lance_ray (job spec, CLI, planning,
media decoding in CPU workers) needs presets, source rules and media rules but never runs the model, and
importing torch costs seconds and hundreds of MB per process.  So the torch-free names are imported
eagerly, and the names that need torch (`LancePipeline`, the tiny-checkpoint writers) are imported on
first access through the module-level `__getattr__` (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .checkpoint import resolve_checkpoint
from .media_rules import image_to_rgb, sample_frame_indices
from .params import MAX_NEW_TOKENS, Params
from .presets import MAX_FRAMES, MAX_SIDE, PRESETS, presets_of
from .settings import DecodeSettings, GenerationSettings, SamplerSettings
from .source import default_cache_dir, source_kind
from .tasks import GPU_SPEED, PROMPT_COLUMNS, TASK_NAMES, TASKS, TaskSpec, get_task, tasks_of

if TYPE_CHECKING:
    from .pipeline import LancePipeline
    from .preprocess import resize_for_understanding
    from .tiny import ensure_tiny_checkpoint, write_tiny_checkpoint
    from .understand import admissible

# name -> submodule that defines it; imported when the name is first used.
_LAZY = {
    "LancePipeline": "pipeline",
    "admissible": "understand",
    "resize_for_understanding": "preprocess",
    "write_tiny_checkpoint": "tiny",
    "ensure_tiny_checkpoint": "tiny",
}

__all__ = [
    "GPU_SPEED",
    "MAX_FRAMES",
    "MAX_NEW_TOKENS",
    "MAX_SIDE",
    "PRESETS",
    "PROMPT_COLUMNS",
    "TASKS",
    "TASK_NAMES",
    "DecodeSettings",
    "GenerationSettings",
    "LancePipeline",
    "Params",
    "SamplerSettings",
    "TaskSpec",
    "admissible",
    "default_cache_dir",
    "ensure_tiny_checkpoint",
    "get_task",
    "image_to_rgb",
    "presets_of",
    "resize_for_understanding",
    "resolve_checkpoint",
    "sample_frame_indices",
    "source_kind",
    "tasks_of",
    "write_tiny_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    # An AttributeError (not an ImportError) lets `from lance_ray.models.lance import <submodule>` go on
    # to import the submodule.
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
