"""WebDataset sink: tar shards for training hand-off, readable by the `webdataset` package.

    <step output>/
        shard-<hash>.tar     one per committed batch; per row, members sharing one key:
                               <key>.json          the output row (`OUTPUT_SCHEMA` columns)
                               <key>.txt           the generated text (x2t), else the prompt
                               <key>.png|mp4|mkv   the generated image / video
                               <key>.turn<N>.png   a multi-turn edit's earlier turns
        __lance_ray__/       manifest.json, lock

`<key>` is the row id when it is a dot-free safe name, else `storage.file_stem(row_id, dots=False)`
(WebDataset splits a member name at its first dot); the row id itself is in the `.json`. Media live
only in the shards, so `media_uri` is null. Shards are whole-or-nothing parts of `parts.PartSink`:
exactly once after any resume or retry, as for Parquet.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from datetime import datetime

import pyarrow as pa

from lance_ray.io import storage
from lance_ray.pipeline.sinks.base import OutputRow, conform, output_table
from lance_ray.pipeline.sinks.parts import PartSink
from lance_ray.spec.rows import OUTPUT_SCHEMA


class WebDatasetSink(PartSink):
    format = "webdataset"
    prefix = "shard-"
    suffix = ".tar"

    def _encode(self, rows: list[OutputRow]) -> bytes:
        output_table([row.values for row in rows])  # checks the columns as every sink does
        buf = io.BytesIO()
        now = time.time()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for row in rows:
                key = storage.file_stem(row.row_id, dots=False)
                values = {**{name: row.values.get(name) for name in OUTPUT_SCHEMA.names}, "media_uri": None}
                members = [(f"{key}.json", json.dumps(values, default=_json_default, sort_keys=True).encode())]
                text = values.get("text") or values.get("prompt")
                if text:
                    members.append((f"{key}.txt", text.encode()))
                if row.media is not None:
                    members.append((f"{key}.{row.media.ext}", row.media.data))
                for turn, media in enumerate(row.turns or [], start=1):
                    members.append((f"{key}.turn{turn}.{media.ext}", media.data))
                for name, data in members:
                    _add(tar, name, data, now)
        return buf.getvalue()

    def _read_index(self, data: bytes) -> list[tuple[str, str | None]]:
        return [(row["row_id"], row.get("error")) for _, row in _json_members(data)]

    def _subset(self, data: bytes, keep: set[str]) -> bytes:
        keys = {key for key, row in _json_members(data) if row["row_id"] in keep}
        buf = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(data)) as source, \
                tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for member in source:
                if member.isfile() and member.name.split(".", 1)[0] in keys:
                    tar.addfile(member, source.extractfile(member))
        return buf.getvalue()

    def _read_table(self, data: bytes) -> pa.Table:
        return conform(output_table([row for _, row in _json_members(data)]))


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _json_members(data: bytes) -> list[tuple[str, dict]]:
    """(key, output row) of every `<key>.json` member, in order."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                out.append((member.name.split(".", 1)[0], json.loads(tar.extractfile(member).read())))
    return out


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
