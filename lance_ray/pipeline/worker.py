"""The stages of a checkpoint group's Ray Data pipeline, in the order rows pass through them.

    prepare_rows   CPU tasks   decode input media (official frame sampling), fix each row's seed
    LanceWorker    actor pool  loads the family's checkpoint once; sub-batches rows by step
    finish_rows    CPU tasks   encode PNG/MP4, commit rows and media to the step's sink

A row that goes wrong at any stage keeps going with `error` set, so it is still written (and counted)
instead of failing the job. Batches travel as Arrow tables in the schemas of `lance_ray.spec.rows`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from lance_ray.io import media, storage
from lance_ray.models.lance import DecodeSettings, GenerationSettings, TaskSpec, sample_frame_indices
from lance_ray.pipeline import metrics
from lance_ray.pipeline.backends import TaskInput, TaskOutput, load_backend
from lance_ray.pipeline.sinks import EncodedMedia, OutputRow, Sink
from lance_ray.pipeline.watchdog import Watchdog
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
    sink: Sink  # where finish_rows commits the step's rows (format per `output.format`)
    video_codec: str = "h264"
    turns: tuple[str, ...] = ()
    timeout_s: float | None = None  # deadline of one model call (the watchdog's)
    # Understanding media resized to the ViT stream in the CPU stage, when the backend takes them so
    # (`Backend.takes_resized_media`; the debug backend never reads pixels: a 32x32 input would become ~768²).
    resize_for_model: bool = True


def row_seed(params: Params, row_id: str, seed_override: int | None) -> int:
    """A row's seed: its own override, else the step seed (official mode) or one derived from it.

    The official script gives every prompt of a run the same noise; for a dataset that means identical
    noise for every row, so by default each row gets a seed derived from (step seed, row_id): stable
    across runs and independent of batching. In official mode the seed is the official run's
    `VALIDATION_DATA_SEED`; the run's other draws (ε of the conditioning media, crop offsets, the noise
    of seed 0) come from its fixed start-up seed, 2025 (`lance_ray.models.lance.official_random`).
    """
    if seed_override is not None:
        return int(seed_override)
    if params.seed_mode == "official":
        return params.seed
    digest = hashlib.sha256(f"{params.seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _decode_input(ctx: StepContext, row: Row) -> np.ndarray | None:
    """The task's input media as uint8 pixels; videos are frame-sampled the official way. Understanding
    rows are also resized to the ViT stream here, on a CPU worker, so the GPU actor only copies and runs
    (`TaskInput.resized`)."""
    task = ctx.task
    kind = task.input_media
    if kind is None:
        return None
    uri = row.image if kind == "image" else row.video
    if not uri:
        raise ValueError(f"task {task.name} needs {'an image' if kind == 'image' else 'a video'}, the row has none")
    if kind == "image":
        pixels = media.decode_image(uri)
    else:
        info = media.probe_video(uri)
        pixels = media.decode_video(uri, sample_frame_indices(info.num_frames, info.fps))
    if _resized_on_cpu(ctx):
        # Imported here: the resize lives beside torch code, and `lance-ray plan` imports this module.
        from lance_ray.models.lance import resize_for_understanding

        return resize_for_understanding(pixels, ctx.settings.preset)
    return pixels


def _resized_on_cpu(ctx: StepContext) -> bool:
    """Understanding media are resized to the ViT stream on the CPU, except in `seed_mode: official`, whose
    crop offsets are the official run's draws, made on the model's side from the full-size media."""
    return ctx.resize_for_model and isinstance(ctx.settings, DecodeSettings) and ctx.settings.seed_mode != "official"


def _within(seconds: float | None, fn, *args):
    """`fn(*args)`, or TimeoutError after `seconds`: a decoder stuck inside a C library cannot be stopped,
    so it is left running on a daemon thread while the row is written as an error and the job goes on."""
    if seconds is None:
        return fn(*args)
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"decoding took longer than {seconds:.0f}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


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
            pixels = _within(ctx.timeout_s, _decode_input, ctx, row)
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
        understanding_only = all(isinstance(ctx.settings, DecodeSettings) for ctx in steps.values())
        self.backend = load_backend(model, family, understanding_only=understanding_only)
        self.steps = steps
        self.batch_sizes = batch_sizes
        self.watchdog = Watchdog(events_uri)
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
        """Ray Data calls this from several threads at once (several batches in flight): the backend
        is thread-safe, and its GPU thread keeps the device busy with rows from all of them."""
        rows = rows_from_table(batch)
        self.metrics.batch_received(row.step for row in rows)
        suspects = self.watchdog.suspects()  # rows that hung an earlier actor: written as errors, not rerun
        for row in rows:
            if not row.error and row.row_id in suspects:
                row.error = suspects[row.row_id]
        # Sub-batches by step (one task, one settings object); LancePipeline groups each sub-batch by
        # shape itself (understanding shares decode slots across rows of any size and length, generation
        # batches same-shape targets).
        by_step: dict[str, list[Row]] = defaultdict(list)
        for row in rows:
            if not row.error:
                by_step[row.step].append(row)
        for step_name, members in by_step.items():
            settings = self.steps[step_name].settings
            # Understanding rows go to the decode engine all at once; generation rows in model batches.
            size = len(members) if isinstance(settings, DecodeSettings) else self.batch_sizes.get(step_name, 1)
            if settings.seed_mode == "official":
                # A model call is one official run; a step's rows are spread over actors and batches and
                # resumed in any order, so each row is its own run, as one official invocation per row.
                size = 1
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
            with self.watchdog.watching([r.row_id for r in chunk], ctx.timeout_s, f"{ctx.name}: {len(chunk)} row(s)"):
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
            row.error = output.error
            row.text = output.text
            if output.pixels is not None:
                row.set_result_array(output.pixels)
            if turn_outputs:  # intermediate turns; the last turn is the row's result
                row.set_turn_arrays([turn[index].pixels for turn in turn_outputs[:-1]])
        self.metrics.model_call(ctx.name, ctx.task, ctx.settings, [row.text for row in chunk],
                                time.perf_counter() - t0, len(ctx.turns))

    def _run_task(self, ctx: StepContext, chunk: list[Row]) -> tuple[list[TaskOutput], list[list[TaskOutput]]]:
        resized = _resized_on_cpu(ctx)  # prepare_rows resized understanding media
        inputs = [TaskInput(prompt=row.prompt, seed=row.seed, media=row.input_array(), resized=resized,
                            max_new_tokens=row.max_new_tokens_override) for row in chunk]
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
    """A row of the step's output (`rows.OUTPUT_SCHEMA`); the sink fills in where its media went."""
    params = ctx.params.model_dump(mode="json", exclude_none=True)
    if row.max_new_tokens_override is not None:  # the cap this row was decoded with
        params["max_new_tokens"] = row.max_new_tokens_override
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


def _encode_pixels(ctx: StepContext, pixels: np.ndarray) -> tuple[EncodedMedia, dict]:
    """One result encoded (PNG for [H, W, 3], MP4/MKV for [T, H, W, 3]) and its size columns."""
    if pixels.ndim == 3:
        sizes = {"height": pixels.shape[0], "width": pixels.shape[1], "frames": 1, "fps": None}
        return EncodedMedia(media.encode_png(pixels), "png"), sizes
    data, ext = media.encode_video(pixels, ctx.params.fps, ctx.video_codec)
    sizes = {"frames": pixels.shape[0], "height": pixels.shape[1], "width": pixels.shape[2], "fps": ctx.params.fps}
    return EncodedMedia(data, ext), sizes


def _encode_result_media(row: Row, ctx: StepContext, out: dict) -> OutputRow:
    """The row with its result encoded, and every earlier turn's for a multi-turn edit; the sink writes them."""
    result, sizes = _encode_pixels(ctx, row.result_array())
    out.update(sizes)
    turns = [_encode_pixels(ctx, pixels)[0] for pixels in row.turn_arrays()] if ctx.turns else None
    return OutputRow(out, result, turns)


def finish_rows(batch: pa.Table, steps: dict[str, StepContext]) -> pa.Table:
    """CPU stage: encode media, then commit each step's rows (and media) as one atomic part of its sink.

    A row whose media cannot be encoded becomes an error row; a sink that cannot write raises (after
    its own retries), as storage trouble is not the row's fault: the batch fails and nothing of it is
    committed."""
    by_step: dict[str, list[OutputRow]] = defaultdict(list)
    for row in rows_from_table(batch):
        ctx = steps[row.step]
        out = _output_row(row, ctx)
        output = OutputRow(out)
        if not out["error"] and ctx.task.output != "text":
            try:
                output = _encode_result_media(row, ctx, out)
            except Exception as exc:
                out["error"] = _error_text(exc)
        by_step[ctx.name].append(output)
    committed = []
    for step_name, outputs in by_step.items():
        steps[step_name].sink.write_part(outputs)
        committed.extend({"step": step_name, "row_id": o.row_id, "error": o.values["error"]} for o in outputs)
    return pa.Table.from_pylist(committed, schema=COMMIT_SCHEMA)
