"""The stages of a checkpoint group's Ray Data pipeline, in the order rows pass through them.

    prepare_rows   CPU tasks   decode input media (official frame sampling), fix each row's seed
    LanceWorker    actor pool  loads the family's checkpoint once; sub-batches rows by step
    finish_rows    CPU tasks   encode PNG/MP4, write media files, write the step's Parquet part

A row that goes wrong at any stage keeps going with `error` set, so it is still written (and counted)
instead of failing the job. Batches travel as Arrow tables in the schemas of `lance_ray.spec.rows`.
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
from lance_ray.models.lance import DecodeSettings, GenerationSettings, TaskSpec, sample_frame_indices
from lance_ray.pipeline import metrics, sinks
from lance_ray.pipeline.backends import TaskInput, TaskOutput, load_backend
from lance_ray.spec import ModelRef, Params
from lance_ray.spec.rows import (
    COMMIT_SCHEMA,
    PREPARED_SCHEMA,
    RESULT_SCHEMA,
    Row,
    rows_from_table,
    rows_to_table,
)


@dataclass(frozen=True)
class StepContext:
    """What the stages need to know about a step (picklable, shipped with the stage functions)."""

    name: str
    task: TaskSpec
    params: Params  # effective params (task defaults applied): written with every output row
    settings: DecodeSettings | GenerationSettings  # what the model takes, built once from `params`
    output_uri: str
    video_codec: str = "h264"
    turns: tuple[str, ...] = ()


def row_seed(params: Params, row_id: str, seed_override: int | None) -> int:
    """A row's seed: its own override, else the step seed (official mode) or one derived from it.

    The official script gives every prompt of a run the same noise; for a dataset that means identical
    noise for every row, so by default each row gets a seed derived from (step seed, row_id): stable
    across runs and independent of batching.
    """
    if seed_override is not None:
        return int(seed_override)
    if params.seed_mode == "official":
        return params.seed
    digest = hashlib.sha256(f"{params.seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _decode_input(task: TaskSpec, row: Row) -> np.ndarray | None:
    """The task's input media as uint8 pixels; videos are frame-sampled the official way."""
    kind = task.input_media
    if kind is None:
        return None
    uri = row.image if kind == "image" else row.video
    if not uri:
        raise ValueError(f"task {task.name} needs {'an image' if kind == 'image' else 'a video'}, the row has none")
    if kind == "image":
        return media.decode_image(uri)

    info = media.probe_video(uri)
    return media.decode_video(uri, sample_frame_indices(info.num_frames, info.fps))


def prepare_rows(batch: pa.Table, steps: dict[str, StepContext]) -> pa.Table:
    """CPU stage: decode media and fix seeds. Rows that cannot be prepared carry `error`."""
    rows = rows_from_table(batch)
    for row in rows:
        ctx = steps[row.step]
        row.seed = row_seed(ctx.params, row.row_id, row.seed_override)
        if row.error:
            continue
        if ctx.task.prompt_required and not (row.prompt or "").strip() and not ctx.turns:
            row.error = f"task {ctx.task.name} needs a non-empty {ctx.task.prompt_name}"
            continue
        try:
            pixels = _decode_input(ctx.task, row)
        except Exception as exc:  # a bad row must never fail the job
            row.error = _error_text(exc)
            continue
        if pixels is not None:
            row.set_input_array(pixels)
    metrics.record_prepared(row.step for row in rows)
    return rows_to_table(rows, PREPARED_SCHEMA)


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
        self.metrics = metrics.ActorMetrics(family, self.backend, time.perf_counter() - started)
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
        rows = rows_from_table(batch)
        self.metrics.batch_received(row.step for row in rows)
        # Sub-batches by step (one task, one settings object); LancePipeline groups each sub-batch by
        # shape itself (understanding packs mixed sizes into one call, generation batches same-shape targets).
        by_step: dict[str, list[Row]] = defaultdict(list)
        for row in rows:
            if not row.error:
                by_step[row.step].append(row)
        for step_name, members in by_step.items():
            size = self.batch_sizes.get(step_name, 1)
            for start in range(0, len(members), size):
                self._run_chunk(self.steps[step_name], members[start : start + size])
        for row in rows:
            row.pixels = row.pixels_shape = None  # the input media stay here; only results travel on
            row.model_id = row.model_id or self.backend.model_id
            row.model_revision = row.model_revision or self.backend.model_revision
            row.backend = row.backend or self.backend.name
        return rows_to_table(rows, RESULT_SCHEMA)

    def _run_chunk(self, ctx: StepContext, chunk: list[Row]) -> None:
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
            chunk[0].error = _error_text(exc)
            return
        elapsed = (time.perf_counter() - t0) / len(chunk)
        for index, (row, output) in enumerate(zip(chunk, outputs, strict=True)):
            row.started_at = started_at
            row.elapsed_s = elapsed
            row.text = output.text
            if output.pixels is not None:
                row.set_result_array(output.pixels)
            if turn_outputs:  # intermediate turns; the last turn is the row's result
                row.set_turn_arrays([turn[index].pixels for turn in turn_outputs[:-1]])
        self.metrics.model_call(ctx.name, ctx.task, ctx.settings, [row.text for row in chunk],
                                time.perf_counter() - t0, len(ctx.turns))

    def _run_task(self, ctx: StepContext, chunk: list[Row]) -> tuple[list[TaskOutput], list[list[TaskOutput]]]:
        inputs = [TaskInput(prompt=row.prompt, seed=row.seed, media=row.input_array()) for row in chunk]
        if not ctx.turns:
            return self.backend.run(ctx.task, inputs, ctx.settings), []
        # Multi-turn edit: each turn edits the previous turn's output; every turn is kept.
        turn_outputs: list[list[TaskOutput]] = []
        for instruction in ctx.turns:
            for task_input in inputs:
                task_input.prompt = instruction
            outputs = self.backend.run(ctx.task, inputs, ctx.settings)
            turn_outputs.append(outputs)
            for task_input, output in zip(inputs, outputs, strict=True):
                task_input.media = output.pixels
        return turn_outputs[-1], turn_outputs


def _output_row(row: Row, ctx: StepContext) -> dict:
    """A row of the step's Parquet dataset (`rows.OUTPUT_SCHEMA`), media columns still unset."""
    params = ctx.params.model_dump(mode="json", exclude_none=True)
    return {
        "row_id": row.row_id,
        "step": ctx.name,
        "task": ctx.task.name,
        "prompt": row.prompt,
        "image": row.image,
        "video": row.video,
        "input_row": row.input_row,
        "text": row.text,
        "params": json.dumps(params, sort_keys=True),
        "seed": row.seed,
        "model_id": row.model_id,
        "model_revision": row.model_revision,
        "backend": row.backend,
        "started_at": row.started_at,
        "elapsed_s": row.elapsed_s,
        "error": row.error,
    }


def _write_pixels(ctx: StepContext, name: str, pixels: np.ndarray) -> dict:
    """Encodes one result (PNG for [H, W, 3], MP4/MKV for [T, H, W, 3]) and writes it under the step's media."""
    if pixels.ndim == 3:
        uri = sinks.write_media(ctx.output_uri, name, media.encode_png(pixels), "png")
        return {"media_uri": uri, "height": pixels.shape[0], "width": pixels.shape[1], "frames": 1, "fps": None}
    data, ext = media.encode_video(pixels, ctx.params.fps, ctx.video_codec)
    uri = sinks.write_media(ctx.output_uri, name, data, ext)
    return {
        "media_uri": uri,
        "frames": pixels.shape[0],
        "height": pixels.shape[1],
        "width": pixels.shape[2],
        "fps": ctx.params.fps,
    }


def _write_result_media(row: Row, ctx: StepContext, out: dict) -> None:
    out.update(_write_pixels(ctx, row.row_id, row.result_array()))
    turn_uris = [
        _write_pixels(ctx, f"{row.row_id}-turn{index + 1}", pixels)["media_uri"]
        for index, pixels in enumerate(row.turn_arrays())
    ]
    if ctx.turns:  # every turn's output, the last being the row's result
        out["turn_media_uris"] = turn_uris + [out["media_uri"]]


def finish_rows(batch: pa.Table, steps: dict[str, StepContext]) -> pa.Table:
    """CPU stage: encode and write media, then commit each step's rows as one atomic Parquet part."""
    by_step: dict[str, list[dict]] = defaultdict(list)
    for row in rows_from_table(batch):
        ctx = steps[row.step]
        out = _output_row(row, ctx)
        if not out["error"] and ctx.task.output != "text":
            try:
                _write_result_media(row, ctx, out)
            except Exception as exc:
                out["error"] = _error_text(exc)
        by_step[ctx.name].append(out)
    committed = []
    for step_name, outputs in by_step.items():
        sinks.write_part(steps[step_name].output_uri, outputs)
        committed.extend({"step": step_name, "row_id": r["row_id"], "error": r["error"]} for r in outputs)
    return pa.Table.from_pylist(committed, schema=COMMIT_SCHEMA)
