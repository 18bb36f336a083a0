"""The default sink: a folder that is a Parquet dataset every reader opens, media in a folder they skip.

    <step output>/
        part-<hash>.parquet      the rows (`OUTPUT_SCHEMA`), one part per committed batch
        __media__/<name>.png     generated images / videos (.mp4, .mkv), one per row (and per edit turn)
        __lance_ray__/           lance-ray's bookkeeping: manifest.json, lock

`pandas.read_parquet(dir)`, `pyarrow.dataset.dataset(dir)`, Spark's `read.parquet(dir)`, DuckDB's
`read_parquet('dir/*.parquet')` and `datasets.load_dataset("parquet", data_dir=dir)` read the folder
as it is: pyarrow and Spark skip names starting with `_` or `.`, Hugging Face `datasets` skips folders
starting with `__` and names starting with `.` (temp files of atomic writes are `.…tmp-…`).

`media_uri` is relative to the step's output folder for local outputs (`__media__/<name>.png`: the
folder can be moved or copied) and a full URI on object stores; `storage.resolve_media_uri` (also
`lance_ray.resolve_media_uri`) turns it into a path. Media files are named from the row id alone
(`storage.file_stem`), so a row that runs again writes over its own file and nothing else.

Outputs of earlier versions (media in `media/` with absolute `media_uri`, `_manifest.json`) keep
resuming: their parts are `part-*.parquet` too, and their media count as theirs.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lance_ray.io import storage
from lance_ray.pipeline.sinks.base import LEGACY_MANIFEST_NAME, EncodedMedia, OutputRow, conform, output_table
from lance_ray.pipeline.sinks.parts import Part, PartSink

MEDIA_DIR = "__media__"
LEGACY_MEDIA_DIR = "media"


class ParquetSink(PartSink):
    format = "parquet"
    prefix = "part-"
    suffix = ".parquet"

    @property
    def media_dir_uri(self) -> str:
        return storage.join_uri(self.uri, MEDIA_DIR)

    def write_media(self, stem: str, media: EncodedMedia) -> str:
        """Write one media file atomically; returns the `media_uri` to store (relative when local)."""
        name = f"{stem}.{media.ext}"
        storage.write_bytes_atomic(storage.join_uri(self.media_dir_uri, name), media.data)
        return posixpath.join(MEDIA_DIR, name) if storage.is_local(self.uri) else storage.join_uri(
            self.media_dir_uri, name)

    def _encode(self, rows: list[OutputRow]) -> bytes:
        values = []
        for row in rows:
            out = dict(row.values)
            if row.media is not None:  # media first: a committed row's media always exist
                out["media_uri"] = self.write_media(storage.file_stem(row.row_id), row.media)
                if row.turns is not None:
                    out["turn_media_uris"] = [
                        self.write_media(storage.turn_stem(row.row_id, turn), media)
                        for turn, media in enumerate(row.turns, start=1)
                    ] + [out["media_uri"]]
            values.append(out)
        return _parquet_bytes(output_table(values))

    def _read_index(self, data: bytes) -> list[tuple[str, str | None]]:
        table = pq.read_table(pa.BufferReader(data), columns=["row_id", "error"])
        return list(zip(table.column("row_id").to_pylist(), table.column("error").to_pylist(), strict=True))

    def _subset(self, data: bytes, keep: set[str]) -> bytes:
        table = pq.read_table(pa.BufferReader(data))
        return _parquet_bytes(table.filter(pc.is_in(table.column("row_id"), pa.array(sorted(keep)))))

    def _read_table(self, data: bytes) -> pa.Table:
        return conform(pq.read_table(pa.BufferReader(data)))

    def _resolve_media(self, table: pa.Table) -> pa.Table:
        """`media_uri` / `turn_media_uris` as paths or full URIs (what lance-ray's own readers need)."""
        media = [storage.resolve_media_uri(self.uri, uri) for uri in table.column("media_uri").to_pylist()]
        turns = [
            None if uris is None else [storage.resolve_media_uri(self.uri, uri) for uri in uris]
            for uris in table.column("turn_media_uris").to_pylist()
        ]
        table = table.set_column(table.schema.get_field_index("media_uri"), "media_uri", pa.array(media, pa.string()))
        index = table.schema.get_field_index("turn_media_uris")
        return table.set_column(index, table.schema.field(index), pa.array(turns, table.schema.field(index).type))

    def _owned_files(self, parts: list[Part]) -> list[str]:
        """The media files committed rows name, if they lie in this output's media folders."""
        owned: list[str] = []
        folders = [self.media_dir_uri, storage.join_uri(self.uri, LEGACY_MEDIA_DIR)]
        for part in parts:
            table = self._resolve_media(self._read_table(storage.read_bytes(part.uri)))
            for uri in table.column("media_uri").to_pylist() + [
                u for uris in table.column("turn_media_uris").to_pylist() if uris for u in uris
            ]:
                if uri and any(_inside(uri, folder) for folder in folders):
                    owned.append(uri)
        return owned

    def _own_dirs(self) -> list[str]:
        return [*super()._own_dirs(), self.media_dir_uri, storage.join_uri(self.uri, LEGACY_MEDIA_DIR)]

    def commit(self, summary: dict[str, Any]) -> dict[str, Any]:
        manifest = super().commit(summary)
        # Earlier versions kept the manifest beside the parts, where folder readers trip on it.
        storage.remove(storage.join_uri(self.uri, LEGACY_MANIFEST_NAME))
        return manifest

    def reset(self) -> None:
        super().reset()
        storage.remove(storage.join_uri(self.uri, LEGACY_MANIFEST_NAME))
        storage.remove_empty_dir(self.media_dir_uri)
        storage.remove_empty_dir(storage.join_uri(self.uri, LEGACY_MEDIA_DIR))


def _inside(uri: str, folder: str) -> bool:
    """Whether `uri` names a file directly in `folder` (no `..` tricks: the parent must match exactly)."""
    if storage.is_local(uri) != storage.is_local(folder):
        return False
    if storage.is_local(uri):
        return posixpath.dirname(posixpath.normpath(uri)) == posixpath.normpath(folder)
    return uri.rsplit("/", 1)[0] == folder.rstrip("/")


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
