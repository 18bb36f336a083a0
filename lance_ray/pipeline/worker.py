"""The stages of a checkpoint group's Ray Data pipeline, in the order rows pass through them.

    prepare_rows   CPU tasks   decode input media (official frame sampling), fix each row's seed
    LanceWorker    actor pool  loads the family's checkpoint once; sub-batches rows by step
    finish_rows    CPU tasks   encode PNG/MP4, write media files, write the step's Parquet part

A row that goes wrong at any stage keeps going with `error` set, so it is still written (and counted)
instead of failing the job. Batches travel as Arrow tables with explicit schemas: decoded pixels are
raw uint8 bytes plus a shape, which Arrow carries without copies or ragged-tensor extensions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from lance_ray.io import media, storage
from lance_ray.pipeline import sinks
from lance_ray.pipeline.backends import IMAGE_OUTPUT_TASKS, TEXT_TASKS, TaskInput, TaskOutput, load_backend
from lance_ray.spec import INPUT_MEDIA, PROMPT_OPTIONAL_TASKS, ModelRef, Params

SHAPE = pa.list_(pa.int32())
CANONICAL_FIELDS = [
    pa.field("row_id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("image", pa.string()),
    pa.field("video", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("input_row", pa.string()),
    pa.field("error", pa.string()),
    pa.field("step", pa.string()),
]
PREPARED_SCHEMA = pa.schema(
    CANONICAL_FIELDS
    + [
        pa.field("seed_used", pa.int64()),
        pa.field("pixels", pa.large_binary()),
        pa.field("pixels_shape", SHAPE),
    ]
)
RESULT_SCHEMA = pa.schema(
    CANONICAL_FIELDS
    + [
        pa.field("seed_used", pa.int64()),
        pa.field("text", pa.string()),
        pa.field("result_pixels", pa.large_binary()),
        pa.field("result_shape", SHAPE),
        pa.field("turn_pixels", pa.list_(pa.large_binary())),
        pa.field("turn_shapes", pa.list_(SHAPE)),
        pa.field("model_id", pa.string()),
        pa.field("model_revision", pa.string()),
        pa.field("backend", pa.string()),
        pa.field("started_at", pa.string()),
        pa.field("elapsed_s", pa.float64()),
    ]
)
COMMITTED_SCHEMA = pa.schema(
    [
        pa.field("step", pa.string()),
        pa.field("row_id", pa.string()),
        pa.field("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class StepContext:
    """What the stages need to know about a step (picklable, shipped with the stage functions)."""

    name: str
    task: str
    params: Params
    output_uri: str
    video_codec: str = "h264"
    turns: tuple[str, ...] = ()


def row_seed(params: Params, row_id: str, row_seed_value: int | None) -> int:
    """A row's seed: its own `seed` column, else the step seed (official mode) or one derived from it.

    The official script gives every prompt of a run the same noise; for a dataset that means identical
    noise for every row, so by default each row gets a seed derived from (step seed, row_id): stable
    across runs and independent of batching.
    """
    if row_seed_value is not None:
        return int(row_seed_value)
    if params.seed_mode == "official":
        return params.seed
    digest = hashlib.sha256(f"{params.seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in schema.names} for row in rows], schema=schema
    )


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _decode_input(task: str, row: dict) -> np.ndarray | None:
    """The task's input media as uint8 pixels; videos are frame-sampled the official way."""
    kind = INPUT_MEDIA[task]
    if kind is None:
        return None
    if not row.get(kind):
        raise ValueError(f"task {task} needs {'an image' if kind == 'image' else 'a video'}, the row has none")
    if kind == "image":
        return media.decode_image(row["image"])
    from lance_ray.models.lance import sample_frame_indices

    info = media.probe_video(row["video"])
    return media.decode_video(row["video"], sample_frame_indices(info.num_frames, info.fps))


def prepare_rows(batch: pa.Table, steps: dict[str, StepContext]) -> pa.Table:
    """CPU stage: decode media and fix seeds. Rows that cannot be prepared carry `error`."""
    rows = batch.to_pylist()
    for row in rows:
        ctx = steps[row["step"]]
        row["seed_used"] = row_seed(ctx.params, row["row_id"], row.get("seed"))
        if row.get("error"):
            continue
        if ctx.task not in PROMPT_OPTIONAL_TASKS and not (row.get("prompt") or "").strip() and not ctx.turns:
            row["error"] = f"task {ctx.task} needs a non-empty prompt/instruction"
            continue
        try:
            pixels = _decode_input(ctx.task, row)
        except Exception as exc:  # a bad row must never fail the job
            row["error"] = _error_text(exc)
            continue
        if pixels is not None:
            row["pixels"] = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
            row["pixels_shape"] = list(pixels.shape)
    return _table(rows, PREPARED_SCHEMA)


def _array(data: bytes, shape: list[int]) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


class LanceWorker:
    """One actor per GPU: loads its family's checkpoint once and serves every task of the family."""

    def __init__(
        self,
        model: ModelRef,
        family: str,
        steps: dict[str, StepContext],
        batch_sizes: dict[str, int],
        events_uri: str | None = None,
    ) -> None:
        started = time.perf_counter()
        self.backend = load_backend(model, family)
        self.steps = steps
        self.batch_sizes = batch_sizes
        self.load_id = uuid.uuid4().hex[:12]
        if events_uri:
            event = {
                "event": "checkpoint_load",
                "load_id": self.load_id,
                "family": family,
                "source": model.source,
                "backend": self.backend.name,
                "pid": os.getpid(),
                "load_s": round(time.perf_counter() - started, 3),
                "at": datetime.now(timezone.utc).isoformat(),
            }
            event.update(self.backend.load_info)
            storage.write_bytes_atomic(
                storage.join_uri(events_uri, f"load-{self.load_id}.json"), json.dumps(event).encode()
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        # Sub-batches by step (task and params); LancePipeline groups each sub-batch by shape itself
        # (understanding packs mixed sizes into one call, generation batches same-shape targets).
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            if not row.get("error"):
                groups[row["step"]].append(row)
        for step_name, members in groups.items():
            size = self.batch_sizes.get(step_name, 1)
            for start in range(0, len(members), size):
                self._run_chunk(self.steps[step_name], members[start : start + size])
        for row in rows:
            row.pop("pixels", None)
            row.setdefault("model_id", self.backend.model_id)
            row.setdefault("model_revision", self.backend.model_revision)
            row.setdefault("backend", self.backend.name)
        return _table(rows, RESULT_SCHEMA)

    def _run_chunk(self, ctx: StepContext, chunk: list[dict]) -> None:
        """Runs rows of one step as one batched call; isolates a failing row."""
        started_at = datetime.now(timezone.utc).isoformat()
        t0 = time.perf_counter()
        try:
            outputs, turn_outputs = self._run_task(ctx, chunk)
        except Exception as exc:
            if len(chunk) > 1:  # find the bad row instead of failing its neighbours
                for row in chunk:
                    self._run_chunk(ctx, [row])
                return
            chunk[0]["error"] = _error_text(exc)
            return
        elapsed = (time.perf_counter() - t0) / len(chunk)
        for index, (row, output) in enumerate(zip(chunk, outputs, strict=True)):
            row["started_at"] = started_at
            row["elapsed_s"] = elapsed
            row["text"] = output.text
            if output.pixels is not None:
                row["result_pixels"], row["result_shape"] = _pixels_bytes(output.pixels)
            if turn_outputs:  # intermediate turns; the last turn is the row's result
                encoded = [_pixels_bytes(turn[index].pixels) for turn in turn_outputs[:-1]]
                row["turn_pixels"] = [data for data, _ in encoded]
                row["turn_shapes"] = [shape for _, shape in encoded]

    def _run_task(
        self, ctx: StepContext, chunk: list[dict]
    ) -> tuple[list[TaskOutput], list[list[TaskOutput]]]:
        inputs = []
        for row in chunk:
            pixels = _array(row["pixels"], row["pixels_shape"]) if row.get("pixels") else None
            is_video = INPUT_MEDIA[ctx.task] == "video"
            inputs.append(
                TaskInput(
                    prompt=row.get("prompt"),
                    seed=row["seed_used"],
                    image=None if is_video else pixels,
                    video=pixels if is_video else None,
                )
            )
        if not ctx.turns:
            return self.backend.run(ctx.task, inputs, ctx.params), []
        # Multi-turn edit: each turn edits the previous turn's output; every turn is kept.
        turn_outputs: list[list[TaskOutput]] = []
        for instruction in ctx.turns:
            for task_input in inputs:
                task_input.prompt = instruction
            outputs = self.backend.run(ctx.task, inputs, ctx.params)
            turn_outputs.append(outputs)
            for task_input, output in zip(inputs, outputs, strict=True):
                if ctx.task == "image_edit":
                    task_input.image = output.pixels
                else:
                    task_input.video = output.pixels
        return turn_outputs[-1], turn_outputs


def _pixels_bytes(pixels: np.ndarray) -> tuple[bytes, list[int]]:
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    return pixels.tobytes(), list(pixels.shape)


def _output_row(row: dict, ctx: StepContext) -> dict:
    params = ctx.params.model_dump(mode="json", exclude_none=True)
    return {
        "row_id": row["row_id"],
        "step": ctx.name,
        "task": ctx.task,
        "prompt": row.get("prompt"),
        "image": row.get("image"),
        "video": row.get("video"),
        "input_row": row.get("input_row"),
        "text": row.get("text"),
        "params": json.dumps(params, sort_keys=True),
        "seed": row.get("seed_used"),
        "model_id": row.get("model_id"),
        "model_revision": row.get("model_revision"),
        "backend": row.get("backend"),
        "started_at": row.get("started_at"),
        "elapsed_s": row.get("elapsed_s"),
        "error": row.get("error"),
    }


def _write_pixels(ctx: StepContext, name: str, pixels: np.ndarray) -> dict:
    """Encodes one result (PNG for [H, W, 3], MP4/MKV for [T, H, W, 3]) and writes it under the step's media."""
    if pixels.ndim == 3:
        uri = sinks.write_media(ctx.output_uri, name, media.encode_png(pixels), "png")
        return {
            "media_uri": uri,
            "height": pixels.shape[0],
            "width": pixels.shape[1],
            "frames": 1,
            "fps": None,
        }
    data, ext = media.encode_video(pixels, ctx.params.fps, ctx.video_codec)
    uri = sinks.write_media(ctx.output_uri, name, data, ext)
    return {
        "media_uri": uri,
        "frames": pixels.shape[0],
        "height": pixels.shape[1],
        "width": pixels.shape[2],
        "fps": ctx.params.fps,
    }


def _write_result_media(row: dict, ctx: StepContext, out: dict) -> None:
    out.update(_write_pixels(ctx, row["row_id"], _array(row["result_pixels"], row["result_shape"])))
    turns = zip(row.get("turn_pixels") or [], row.get("turn_shapes") or [], strict=True)
    turn_uris = [
        _write_pixels(ctx, f"{row['row_id']}-turn{index + 1}", _array(data, shape))["media_uri"]
        for index, (data, shape) in enumerate(turns)
    ]
    if ctx.turns:  # every turn's output, the last being the row's result
        out["turn_media_uris"] = turn_uris + [out["media_uri"]]


def finish_rows(batch: pa.Table, steps: dict[str, StepContext]) -> pa.Table:
    """CPU stage: encode and write media, then commit each step's rows as one atomic Parquet part."""
    by_step: dict[str, list[dict]] = defaultdict(list)
    for row in batch.to_pylist():
        ctx = steps[row["step"]]
        out = _output_row(row, ctx)
        if not out["error"] and ctx.task not in TEXT_TASKS:
            try:
                _write_result_media(row, ctx, out)
            except Exception as exc:
                out["error"] = _error_text(exc)
        by_step[ctx.name].append(out)
    committed = []
    for step_name, outputs in by_step.items():
        sinks.write_part(steps[step_name].output_uri, outputs)
        committed.extend({"step": step_name, "row_id": r["row_id"], "error": r["error"]} for r in outputs)
    return _table(committed, COMMITTED_SCHEMA)


def output_kind(task: str) -> str:
    """What a step produces: `text`, `image` or `video` (used by from_step chaining and the planner)."""
    if task in TEXT_TASKS:
        return "text"
    return "image" if task in IMAGE_OUTPUT_TASKS else "video"
