"""Prometheus metrics of a run, through Ray's metrics API (`ray.util.metrics`).

Every Ray node exports what its processes record on its metrics port (`ray start
--metrics-export-port`, or `lance-ray run --metrics-port` for a local run); Ray prefixes the names
with `ray_` and counters get `_total`, so `lance_ray_rows_committed` is scraped as
`ray_lance_ray_rows_committed_total`. deploy/grafana-dashboard.json charts them.

Who records what:
- the driver (`RunMetrics`, from the runner): committed rows per step and status, rows/s, rows pending;
- the prepare stage (`record_prepared`) and each model actor (`ActorMetrics`, from the worker): rows
  prepared and rows received (their difference is the queue in front of the model), rows per model
  call, model seconds, generated tokens, denoising steps, tokens/s and steps/s, the actor's busy share
  and memory, and its checkpoint load time.

Outside Ray (a stage function called in a unit test) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

PREFIX = "lance_ray_"
BATCH_ROWS_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# name -> (kind, description, tag keys). Names without PREFIX; every metric of lance-ray is here.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rows_committed": ("counter", "Output rows committed, by step and status (ok | failed).",
                       ("job", "step", "task", "status")),
    "rows_per_second": ("gauge", "Committed rows per second of each step since it started.", ("job", "step")),
    "rows_pending": ("gauge", "Rows of each step not yet committed in this run.", ("job", "step")),
    "rows_prepared": ("counter", "Rows out of the prepare stage (media decoded), by step.", ("step",)),
    "rows_received": ("counter", "Rows that reached a model actor, by step. prepared - received = the "
                      "queue in front of the model.", ("step",)),
    "model_batch_rows": ("histogram", "Rows per model call.", ("step", "task")),
    "model_seconds": ("counter", "Seconds spent in model calls.", ("step", "task", "actor")),
    "generated_tokens": ("counter", "Tokens of generated text (x2t tasks).", ("step", "task")),
    "denoising_steps": ("counter", "Denoising steps run, one per row per step (generation tasks).",
                        ("step", "task")),
    "tokens_per_second": ("gauge", "Generated tokens per second of an actor's latest model call.",
                          ("step", "actor")),
    "denoising_steps_per_second": ("gauge", "Denoising steps (rows x steps) per second of an actor's latest "
                                   "model call.", ("step", "actor")),
    "actor_busy_ratio": ("gauge", "Share of wall time an actor spent in model calls since its previous batch "
                         "arrived: its GPU's busy share when it has one.", ("family", "actor")),
    "actor_memory_bytes": ("gauge", "Memory of a model actor: gpu_allocated and gpu_peak (torch's CUDA "
                           "allocator, GPU actors only) and host_rss.", ("family", "actor", "kind")),
    "checkpoint_load_seconds": ("gauge", "Seconds an actor took to load its checkpoint.",
                                ("family", "actor", "backend")),
}


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to find out that it is not running
    return ray is not None and ray.is_initialized()


@cache
def _metric(name: str) -> Any:
    from ray.util import metrics

    kind, description, tags = METRICS[name]
    if kind == "counter":
        return metrics.Counter(PREFIX + name, description=description, tag_keys=tags)
    if kind == "gauge":
        return metrics.Gauge(PREFIX + name, description=description, tag_keys=tags)
    return metrics.Histogram(PREFIX + name, description=description, boundaries=BATCH_ROWS_BOUNDARIES,
                             tag_keys=tags)


def _inc(name: str, value: float, **tags: str) -> None:
    if value:
        _metric(name).inc(value, tags=tags)


def _set(name: str, value: float, **tags: str) -> None:
    _metric(name).set(value, tags=tags)


def record_prepared(steps: Iterable[str]) -> None:
    """The prepare stage let these rows (one step name per row) through."""
    if _ray_running():
        for step, rows in Tally(steps).items():
            _inc("rows_prepared", rows, step=step)


class RunMetrics:
    """The driver's metrics of one checkpoint group's run: what is committed, how fast, what is left."""

    def __init__(self, job: str, tasks: dict[str, str], pending: dict[str, int]) -> None:
        self.enabled = _ray_running()
        self.job = job
        self.tasks = tasks  # step -> task
        self.started = time.monotonic()
        if self.enabled:
            for step, rows in pending.items():
                _set("rows_pending", rows, job=job, step=step)

    def committed(self, step: str, ok: int, failed: int, done: int, pending: int) -> None:
        """`ok` and `failed` rows of `step` were just committed; `done` of them so far, `pending` left."""
        if not self.enabled:
            return
        for status, rows in (("ok", ok), ("failed", failed)):
            _inc("rows_committed", rows, job=self.job, step=step, task=self.tasks[step], status=status)
        _set("rows_per_second", done / max(time.monotonic() - self.started, 1e-9), job=self.job, step=step)
        _set("rows_pending", pending, job=self.job, step=step)


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux, where GPU nodes run); None where /proc is not there."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _token_counter(backend: Any) -> Callable[[str], int] | None:
    """How to count the tokens of generated text: the model's own tokenizer (none for the debug backend)."""
    tokenizer = getattr(getattr(backend, "pipeline", None), "tokenizer", None)
    return None if tokenizer is None else (lambda text: len(tokenizer.encode(text)))


class ActorMetrics:
    """A model actor's metrics; the worker calls `batch_received` and `model_call` as rows go through."""

    def __init__(self, family: str, backend: Any, load_seconds: float) -> None:
        self.enabled = _ray_running()
        self.family = family
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.count_tokens = _token_counter(backend)
        self.window_started = time.monotonic()  # busy share: model seconds over the time between batches
        self.busy_s = 0.0
        if self.enabled:
            _set("checkpoint_load_seconds", load_seconds, family=family, actor=self.actor, backend=backend.name)
            self._memory()

    def batch_received(self, steps: Iterable[str]) -> None:
        """A batch reached the actor (one step name per row)."""
        if not self.enabled:
            return
        for step, rows in Tally(steps).items():
            _inc("rows_received", rows, step=step)
        if self.busy_s:  # the window since the previous batch arrived, idle time included, closes here
            self._busy_ratio()
        self.window_started, self.busy_s = time.monotonic(), 0.0

    def _busy_ratio(self) -> None:
        window = max(time.monotonic() - self.window_started, 1e-9)
        _set("actor_busy_ratio", min(self.busy_s / window, 1.0), family=self.family, actor=self.actor)

    def model_call(self, step: str, task: Any, settings: Any, texts: list[str | None], seconds: float,
                   turns: int = 1) -> None:
        """One batched model call of `step` (a TaskSpec `task`) returned `texts` (None for media) in `seconds`."""
        if not self.enabled:
            return
        self.busy_s += seconds
        self._busy_ratio()
        tags = {"step": step, "task": task.name}
        _metric("model_batch_rows").observe(len(texts), tags=tags)
        _inc("model_seconds", seconds, actor=self.actor, **tags)
        rate_tags = {"step": step, "actor": self.actor}
        if task.output == "text":
            if self.count_tokens is not None:
                tokens = sum(self.count_tokens(text) for text in texts if text)
                _inc("generated_tokens", tokens, **tags)
                _set("tokens_per_second", tokens / max(seconds, 1e-9), **rate_tags)
        else:
            steps = settings.sampler.steps * len(texts) * max(turns, 1)
            _inc("denoising_steps", steps, **tags)
            _set("denoising_steps_per_second", steps / max(seconds, 1e-9), **rate_tags)
        self._memory()

    def _memory(self) -> None:
        tags = {"family": self.family, "actor": self.actor}
        rss = _resident_bytes()
        if rss is not None:
            _set("actor_memory_bytes", rss, kind="host_rss", **tags)
        torch = sys.modules.get("torch")  # only where the model already loaded it
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            _set("actor_memory_bytes", torch.cuda.memory_allocated(), kind="gpu_allocated", **tags)
            _set("actor_memory_bytes", torch.cuda.max_memory_allocated(), kind="gpu_peak", **tags)
