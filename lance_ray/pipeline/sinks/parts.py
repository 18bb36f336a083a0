"""What the Parquet and WebDataset sinks share: a step's rows as immutable parts, each row in one part.

Each part is one file written whole-or-nothing (`storage.write_bytes_atomic`) and named from the set
of row ids it holds, so a batch that Ray retries replaces its own part instead of adding a copy.

A row can still be committed twice: `--retry-failed` commits the new version of a failed row in a
new part while an old part holds the error, and a run killed right after that leaves both. Settling
(`prepare` before a step, `commit` after it) removes such copies: for each row id the newest copy
wins — a part written by the current run beats every part that was there when the step started,
otherwise the later-modified file wins — and each part holding a superseded copy is replaced by one
without it: the new part is written first, then the old one removed. A crash in between leaves
identical copies, which the next settle removes. At rest every row is in exactly one part, for any
reader.
"""

from __future__ import annotations

import hashlib
import re
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from lance_ray.io import storage
from lance_ray.pipeline.sinks.base import OutputRow, Sink, error_counts
from lance_ray.spec.rows import OUTPUT_SCHEMA


@dataclass
class Part:
    uri: str
    name: str
    modified: float  # epoch seconds
    rows: list[tuple[str, str | None]] = field(default_factory=list)  # (row_id, error), in file order


def part_name(row_ids: Iterable[str], prefix: str = "part-", suffix: str = ".parquet", salt: str = "") -> str:
    """A part's file name, a function of the set of row ids it holds (order does not matter).

    `salt` gives parts that settling rewrites a name no batch can have, so a worker's part and a
    settled part never replace each other."""
    digest = hashlib.sha256((salt + "\n".join(sorted(row_ids))).encode("utf-8", "surrogatepass")).hexdigest()
    return f"{prefix}{digest[:20]}{suffix}"


class PartSink(Sink):
    """A sink whose committed rows are the parts `<prefix><hash><suffix>` directly in its folder."""

    prefix: ClassVar[str]
    suffix: ClassVar[str]

    def __init__(self, uri: str, step: str):
        super().__init__(uri, step)
        # Driver only (dropped when pickled): the parts present when the step started, and their index as
        # `prepare` left it (reused by the one `committed_ids` call that follows, unless this object wrote since).
        self._started_with: set[str] | None = None
        self._index_cache: list[Part] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_started_with"] = state["_index_cache"] = None
        return state

    # -- what each format provides ------------------------------------------------------------------------

    @abstractmethod
    def _encode(self, rows: list[OutputRow]) -> bytes:
        """One part's bytes for `rows` (a format that keeps media beside its parts writes them here)."""

    @abstractmethod
    def _read_index(self, data: bytes) -> list[tuple[str, str | None]]:
        """(row_id, error) of every row of a part, in order."""

    @abstractmethod
    def _subset(self, data: bytes, keep: set[str]) -> bytes:
        """A part's bytes holding only the rows whose ids are in `keep`."""

    @abstractmethod
    def _read_table(self, data: bytes) -> pa.Table:
        """A part's rows in `OUTPUT_SCHEMA` (media URIs as stored)."""

    def _resolve_media(self, table: pa.Table) -> pa.Table:
        return table

    def _owned_files(self, parts: list[Part]) -> list[str]:
        """Files besides the parts that this sink wrote for committed rows (removed by `reset`)."""
        return []

    def _own_dirs(self) -> list[str]:
        """Folders this sink writes files into (stale temp files are cleaned there)."""
        return [self.uri, self.bookkeeping_uri]

    # -- writer role --------------------------------------------------------------------------------------

    def write_part(self, rows: list[OutputRow]) -> None:
        if not rows:
            raise ValueError("write_part needs at least one row")
        ids = [row.row_id for row in rows]
        if len(set(ids)) != len(ids):
            raise ValueError("write_part: duplicate row ids in one batch")
        data = self._encode(rows)
        self._index_cache = None
        storage.write_bytes_atomic(self.part_uri(ids), data)

    def part_uri(self, row_ids: Iterable[str], salt: str = "") -> str:
        return storage.join_uri(self.uri, part_name(row_ids, self.prefix, self.suffix, salt))

    # -- driver role --------------------------------------------------------------------------------------

    def prepare(self) -> None:
        for folder in self._own_dirs():
            storage.remove_stale_temp_files(folder)
        self._index_cache = self._settle_parts(self._index(), started_with=None)
        self._started_with = {part.name for part in self._index_cache}

    def committed_ids(self, include_errors: bool = True) -> set[str]:
        parts = self._index_cache if self._index_cache is not None else self._index()
        self._index_cache = None  # parts change as the step runs: only the call right after `prepare` reuses it
        latest: dict[str, str | None] = {}
        for part in _oldest_first(parts, self._started_with):
            latest.update(part.rows)
        return {row_id for row_id, error in latest.items() if include_errors or error is None}

    def is_empty(self) -> bool:
        return not self._list_parts()

    def read(self) -> pa.Table:
        parts = _oldest_first(self._list_parts(), self._started_with)
        tables = [self._read_table(storage.read_bytes(part.uri)) for part in parts]
        table = pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()
        return self._resolve_media(_keep_last(table))

    def iter_parts_newest_first(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Each committed part's rows (media URIs resolved), newest part first, one part in memory at a
        time: a reader that keeps each row id's first version sees what `read` returns."""
        for part in reversed(_oldest_first(self._list_parts(), self._started_with)):
            table = self._resolve_media(self._read_table(storage.read_bytes(part.uri)))
            yield table if columns is None else table.select(columns)

    def part_names(self) -> list[str]:
        """The committed parts' file names, oldest first."""
        return [part.name for part in _oldest_first(self._list_parts(), self._started_with)]

    def reset(self) -> None:
        parts = self._index()
        for uri in [*self._owned_files(parts), *(part.uri for part in parts)]:
            storage.remove(uri)
        self._remove_manifest()
        self._index_cache = self._started_with = None

    def _settle(self) -> dict[str, Any]:
        parts = self._settle_parts(self._index(), started_with=self._started_with)
        return {
            **error_counts([error for part in parts for _, error in part.rows]),
            "parts": sorted(part.name for part in parts),
        }

    # -- parts --------------------------------------------------------------------------------------------

    def _list_parts(self) -> list[Part]:
        """This sink's parts: exactly the names `part_name` makes (a user's `part-00000-….parquet` is not one)."""
        pattern = re.compile(re.escape(self.prefix) + r"[0-9a-f]{20}" + re.escape(self.suffix))
        return [
            Part(storage.join_uri(self.uri, name), name, storage.modified_at(entry))
            for entry in storage.list_files(self.uri)
            if pattern.fullmatch(name := entry["name"].rstrip("/").rsplit("/", 1)[-1])
        ]

    def _index(self) -> list[Part]:
        parts = self._list_parts()
        for part in parts:
            part.rows = self._read_index(storage.read_bytes(part.uri))
        return parts

    def _settle_parts(self, parts: list[Part], started_with: set[str] | None) -> list[Part]:
        """Make every row id appear in one part (the newest copy wins); returns the parts left."""
        winner: dict[str, str] = {}
        for part in _oldest_first(parts, started_with):
            for row_id, _ in part.rows:
                winner[row_id] = part.name
        settled: list[Part] = []
        for part in parts:
            kept = [(row_id, error) for row_id, error in part.rows if winner[row_id] == part.name]
            if len(kept) == len(part.rows):
                settled.append(part)
                continue
            if kept:  # write the part without the superseded rows first, then remove the old one
                ids = {row_id for row_id, _ in kept}
                uri = self.part_uri(ids, salt="settled")
                storage.write_bytes_atomic(uri, self._subset(storage.read_bytes(part.uri), ids))
                settled.append(Part(uri, uri.rsplit("/", 1)[-1], part.modified, kept))
                if uri == part.uri:
                    continue
            storage.remove(part.uri)
        return settled


def _oldest_first(parts: list[Part], started_with: set[str] | None) -> list[Part]:
    """Parts in commit order: those a running step started with before those it wrote, then by
    modification time (then name, for a stable order)."""
    return sorted(parts, key=lambda p: (started_with is not None and p.name not in started_with, p.modified, p.name))


def _keep_last(table: pa.Table) -> pa.Table:
    """Keep the last occurrence of each row_id (the table is ordered oldest part first)."""
    last: dict[str, int] = {}
    for i, row_id in enumerate(table.column("row_id").to_pylist()):
        last[row_id] = i
    if len(last) == table.num_rows:
        return table
    return table.take(sorted(last.values()))
