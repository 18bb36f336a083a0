"""The row contract: what a row is at each hop of the pipeline, with one name per meaning.

    sources ──SOURCE_SCHEMA──▶ prepare ──PREPARED_SCHEMA──▶ model actor ──RESULT_SCHEMA──▶ finish
    finish ──OUTPUT_SCHEMA (Parquet, one dataset per step)──▶ sink;  finish ──COMMIT_SCHEMA──▶ driver

Between stages rows travel as Arrow tables with these schemas; inside a stage they are `Row`
objects (typed attributes, not string keys). Each schema is a projection of `Row`'s fields.
Decoded pixels travel as raw uint8 bytes plus a shape, which Arrow carries without copies.

Names that mean one thing each:
* `seed_override`: a seed the INPUT row asks for (its `seed` column, or the one `columns.seed` maps);
* `seed`: the seed the row was actually generated with (written to the output);
* `max_new_tokens_override`: an understanding row's own cap on new tokens; the output's `params` record
  the cap actually used.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

_SHAPE = pa.list_(pa.int32())


@dataclass
class Row:
    """One row in flight. A stage that cannot handle a row sets `error` and passes it on."""

    row_id: str  # stable across runs; never contains '/'
    step: str
    prompt: str | None = None  # prompt, instruction or question, after templating
    image: str | None = None  # input image path/URI
    video: str | None = None  # input video path/URI
    seed_override: int | None = None
    max_new_tokens_override: int | None = None  # understanding: the row's own cap (its `max_new_tokens` column)
    input_row: str | None = None  # the original input row as JSON (provenance)
    error: str | None = None
    # prepare
    seed: int | None = None  # the seed used
    pixels: bytes | None = None  # decoded input media, uint8
    pixels_shape: list[int] | None = None
    # model
    text: str | None = None
    result_pixels: bytes | None = None
    result_shape: list[int] | None = None
    turn_pixels: list[bytes] | None = None  # multi-turn edits: every turn but the last
    turn_shapes: list[list[int]] | None = None
    model_id: str | None = None
    model_revision: str | None = None
    backend: str | None = None
    started_at: str | None = None  # ISO 8601, UTC
    elapsed_s: float | None = None  # model seconds, shared out over the batch

    def input_array(self) -> np.ndarray | None:
        """The decoded input media: uint8 [H, W, 3] (image) or [T, H, W, 3] (video)."""
        return None if self.pixels is None else _array(self.pixels, self.pixels_shape)

    def set_input_array(self, array: np.ndarray) -> None:
        self.pixels, self.pixels_shape = _bytes(array)

    def result_array(self) -> np.ndarray | None:
        return None if self.result_pixels is None else _array(self.result_pixels, self.result_shape)

    def set_result_array(self, array: np.ndarray) -> None:
        self.result_pixels, self.result_shape = _bytes(array)

    def turn_arrays(self) -> list[np.ndarray]:
        pairs = zip(self.turn_pixels or [], self.turn_shapes or [], strict=True)
        return [_array(data, shape) for data, shape in pairs]

    def set_turn_arrays(self, arrays: list[np.ndarray]) -> None:
        encoded = [_bytes(a) for a in arrays]
        self.turn_pixels = [data for data, _ in encoded]
        self.turn_shapes = [shape for _, shape in encoded]


def _array(data: bytes, shape: list[int] | None) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _bytes(array: np.ndarray) -> tuple[bytes, list[int]]:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return array.tobytes(), list(array.shape)


_TYPES: dict[str, pa.DataType] = {
    "row_id": pa.string(),
    "step": pa.string(),
    "prompt": pa.string(),
    "image": pa.string(),
    "video": pa.string(),
    "seed_override": pa.int64(),
    "max_new_tokens_override": pa.int64(),
    "input_row": pa.string(),
    "error": pa.string(),
    "seed": pa.int64(),
    "pixels": pa.large_binary(),
    "pixels_shape": _SHAPE,
    "text": pa.string(),
    "result_pixels": pa.large_binary(),
    "result_shape": _SHAPE,
    "turn_pixels": pa.list_(pa.large_binary()),
    "turn_shapes": pa.list_(_SHAPE),
    "model_id": pa.string(),
    "model_revision": pa.string(),
    "backend": pa.string(),
    "started_at": pa.string(),
    "elapsed_s": pa.float64(),
}
assert set(_TYPES) == {f.name for f in fields(Row)}, "every Row field needs an Arrow type"


def _schema(*names: str) -> pa.Schema:
    return pa.schema([pa.field(name, _TYPES[name]) for name in names])


_SOURCE = ("row_id", "step", "prompt", "image", "video", "seed_override", "max_new_tokens_override", "input_row",
           "error")
SOURCE_SCHEMA = _schema(*_SOURCE)
PREPARED_SCHEMA = _schema(*_SOURCE, "seed", "pixels", "pixels_shape")
RESULT_SCHEMA = _schema(
    *_SOURCE, "seed", "text", "result_pixels", "result_shape", "turn_pixels", "turn_shapes",
    "model_id", "model_revision", "backend", "started_at", "elapsed_s",
)
# What the driver sees of each committed row: enough to count, never media.
COMMIT_SCHEMA = _schema("step", "row_id", "error")

# One Parquet dataset per step; what users read.
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("step", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("image", pa.string()),  # input image
        pa.field("video", pa.string()),  # input video
        pa.field("input_row", pa.string()),  # the original input row as JSON
        pa.field("text", pa.string()),  # x2t answer / caption
        pa.field("media_uri", pa.string()),  # generated image or video
        # multi-turn edits: every turn's media, the last one being `media_uri`
        pa.field("turn_media_uris", pa.list_(pa.string())),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("frames", pa.int32()),
        pa.field("fps", pa.float64()),
        pa.field("params", pa.string()),  # the parameters actually used, as JSON
        pa.field("seed", pa.int64()),  # the seed actually used
        pa.field("model_id", pa.string()),
        pa.field("model_revision", pa.string()),
        pa.field("backend", pa.string()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("elapsed_s", pa.float64()),
        pa.field("error", pa.string()),  # null on success
    ]
)


def rows_from_table(table: pa.Table) -> list[Row]:
    """The rows of a stage's input table (any projection of `Row`'s fields)."""
    return [Row(**record) for record in table.to_pylist()]


def rows_to_table(rows: list[Row], schema: pa.Schema) -> pa.Table:
    """`rows` as a table with `schema` (which must be a projection of `Row`)."""
    columns: dict[str, list[Any]] = {name: [getattr(r, name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def source_table(records: list[dict[str, Any]]) -> pa.Table:
    """Source rows given as dicts of SOURCE_SCHEMA fields (missing fields are null)."""
    return pa.Table.from_pylist(
        [{name: record.get(name) for name in SOURCE_SCHEMA.names} for record in records], schema=SOURCE_SCHEMA
    )
