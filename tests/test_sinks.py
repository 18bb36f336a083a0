"""The sinks without Ray: atomic parts, media names, settling superseded rows, manifest, reset; local and S3.

Readers other than lance-ray's own (pandas, DuckDB) check what "exactly once" means for users.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lance_ray import __version__, resolve_media_uri
from lance_ray.io import storage
from lance_ray.pipeline.sinks import (
    EncodedMedia,
    OutputRow,
    ParquetSink,
    committed_row_ids,
    part_name,
    read_manifest,
    read_step_output,
)
from lance_ray.spec.rows import OUTPUT_SCHEMA

PNG = EncodedMedia(b"\x89PNG fake", "png")


def out_row(row_id: str, media: EncodedMedia | None = None, turns: list[EncodedMedia] | None = None,
            **extra) -> OutputRow:
    values = {"row_id": row_id, "step": "gen", "task": "t2i", "prompt": f"prompt of {row_id}", **extra}
    return OutputRow(values, media, turns)


def parts_on_disk(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("part-*.parquet"))


def ids_seen_by_pandas(folder: Path) -> list[str]:
    return sorted(pd.read_parquet(folder)["row_id"])


def ids_seen_by_duckdb(folder: Path) -> list[str]:
    rows = duckdb.sql(f"select row_id from read_parquet('{folder}/*.parquet')").fetchall()
    return sorted(r[0] for r in rows)


def test_write_part_roundtrip_and_schema(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path / "gen"), "gen")
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    sink.write_part([
        out_row("a", text=None, width=64, height=48, frames=1, seed=7, params={"steps": 30}, started_at=started,
                elapsed_s=1.5),
        out_row("b", error="ValueError: boom", started_at="2026-01-02T03:04:05+00:00"),
    ])
    (part,) = (tmp_path / "gen").glob("part-*.parquet")
    assert sorted(os.listdir(tmp_path / "gen")) == [part.name]
    table = pq.read_table(part)
    assert table.schema.equals(OUTPUT_SCHEMA)
    got = {r["row_id"]: r for r in table.to_pylist()}
    assert got["a"]["params"] == json.dumps({"steps": 30})
    assert got["a"]["started_at"] == started and got["b"]["started_at"] == started
    assert (got["a"]["width"], got["a"]["seed"], got["a"]["error"]) == (64, 7, None)
    assert got["b"]["error"] == "ValueError: boom" and got["b"]["width"] is None


def test_write_part_rejects_unknown_columns_duplicates_and_nothing(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path), "gen")
    with pytest.raises(ValueError, match="unknown output columns"):
        sink.write_part([out_row("a", captoin="typo")])
    with pytest.raises(ValueError, match="duplicate"):
        sink.write_part([out_row("a"), out_row("a")])
    with pytest.raises(ValueError):
        sink.write_part([])
    assert not os.listdir(tmp_path)


def test_a_retried_batch_replaces_its_own_part(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path), "gen")
    assert part_name(["a", "b"]) == part_name(["b", "a"]) != part_name(["a", "c"])
    sink.write_part([out_row("a", text="first"), out_row("b")])
    sink.write_part([out_row("b"), out_row("a", text="retried")])  # Ray ran the same batch again
    assert parts_on_disk(tmp_path) == [part_name(["a", "b"])]
    assert {r["row_id"]: r["text"] for r in sink.read().to_pylist()} == {"a": "retried", "b": None}


def test_crash_mid_write_leaves_no_visible_part_and_prepare_cleans_up(tmp_path: Path, monkeypatch) -> None:
    sink = ParquetSink(str(tmp_path), "gen")
    sink.write_part([out_row("kept")])

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    for target in ("replace", "fsync"):  # before the rename, and while the temp file is being written
        with monkeypatch.context() as m:
            m.setattr(storage.os, target, crash)
            with pytest.raises(OSError, match="simulated crash"):
                sink.write_part([out_row("lost")])
        assert sorted(os.listdir(tmp_path)) == [part_name(["kept"])]  # and no temp file left behind

    # A process killed outright leaves its hidden temp file: readers never see it, prepare removes it,
    # and a file of the user's that only looks similar stays.
    ghost = tmp_path / f".{part_name(['ghost'])}.tmp-{uuid.uuid4().hex}"
    ghost.write_bytes(b"PAR1 half a parquet file")
    (tmp_path / "__media__").mkdir()
    media_ghost = tmp_path / "__media__" / f".ghost.png.tmp-{uuid.uuid4().hex}"
    media_ghost.write_bytes(b"half")
    lookalike = tmp_path / ".notes.tmp-mine"
    lookalike.write_text("keep me")
    assert sink.committed_ids() == {"kept"} and ids_seen_by_pandas(tmp_path) == ["kept"]
    sink.prepare()
    assert not ghost.exists() and not media_ghost.exists() and lookalike.exists()


def test_media_go_beside_the_rows_with_relative_uris(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    sink = ParquetSink(str(out), "gen")
    turns = [EncodedMedia(b"turn one", "png"), EncodedMedia(b"turn two", "png")]
    sink.write_part([out_row("a", PNG), out_row("e", PNG, turns=turns), out_row("bad", error="boom")])
    stored = {r["row_id"]: r for r in pq.read_table(next(out.glob("part-*.parquet"))).to_pylist()}
    assert stored["a"]["media_uri"] == "__media__/a.png" and stored["a"]["turn_media_uris"] is None
    assert stored["e"]["turn_media_uris"] == ["__media__/e~turn1.png", "__media__/e~turn2.png", "__media__/e.png"]
    assert stored["bad"]["media_uri"] is None
    # The folder moves as a whole: relative URIs resolve against wherever it is now.
    moved = tmp_path / "moved"
    out.rename(moved)
    row = pd.read_parquet(moved).set_index("row_id").loc["e"]
    assert [Path(resolve_media_uri(str(moved), u)).read_bytes() for u in row["turn_media_uris"]] == [
        b"turn one", b"turn two", PNG.data]
    # lance-ray's own reader hands out resolved paths.
    read = {r["row_id"]: r for r in read_step_output(str(moved)).to_pylist()}
    assert read["a"]["media_uri"] == str(moved / "__media__" / "a.png")
    assert resolve_media_uri(str(moved), "s3://b/x.png") == "s3://b/x.png"
    assert resolve_media_uri(str(moved), "/abs/x.png") == "/abs/x.png" and resolve_media_uri("x", None) is None


@pytest.mark.parametrize(
    "row_id",
    ["../../etc/passwd", "/etc/passwd", "..", ".", "", "a\x00b", "x/../../y", "C:\\Windows\\x", "~root", "é" * 300,
     ".hidden", "a~turn1"],
)
def test_media_names_never_escape_the_media_folder(tmp_path: Path, row_id: str) -> None:
    out = tmp_path / "step"
    ParquetSink(str(out), "gen").write_part([out_row(row_id, PNG)])
    media_dir = out / "__media__"
    (name,) = os.listdir(media_dir)
    assert len(name) <= storage.MAX_TOKEN_LEN + 4 and not name.startswith(".") and "\x00" not in name
    assert set(os.listdir(out)) == {"__media__", part_name([row_id])}
    assert set(os.listdir(tmp_path)) == {"step"}


def test_turn_media_never_collide_with_another_rows_media(tmp_path: Path) -> None:
    """Issue 12 #12: `<row_id>-turn<N>` was also the media name of a row whose id is literally that."""
    ids = ["h1", "h1-turn1", "h1_turn1", "h1.turn1", "h1~turn1", "h1 turn1", "a b", "a_b-" + storage.short_hash("a b")]
    sink = ParquetSink(str(tmp_path), "edit")
    rows = [out_row(i, EncodedMedia(f"final {i}".encode(), "png"), turns=[EncodedMedia(f"turn {i}".encode(), "png")])
            for i in ids]
    sink.write_part(rows)
    files = os.listdir(tmp_path / "__media__")
    assert len(files) == 2 * len(ids)  # nothing overwritten
    for row in sink.read().to_pylist():
        turn, final = row["turn_media_uris"]
        assert Path(final).read_bytes() == f"final {row['row_id']}".encode()
        assert Path(turn).read_bytes() == f"turn {row['row_id']}".encode()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=40), min_size=2, max_size=8, unique=True), st.booleans())
def test_file_stems_are_one_to_one(ids: list[str], dots: bool) -> None:
    names = [storage.file_stem(i, dots=dots) for i in ids] + [storage.turn_stem(i, 1, dots=dots) for i in ids]
    assert len(set(names)) == len(names)
    for name in names:
        assert name and not name.startswith(".") and "/" not in name and "\x00" not in name
        assert dots or "." not in name


def test_a_retry_leaves_every_row_once_for_every_reader(tmp_path: Path) -> None:
    """Issue 12 #5: after --retry-failed the folder held the old error part and the new part."""
    first = ParquetSink(str(tmp_path), "gen")
    first.prepare()
    first.write_part([out_row("a", error="timeout"), out_row("b", text="kept")])
    first.commit({"step": "gen"})
    retry = ParquetSink(str(tmp_path), "gen")  # the next run
    retry.prepare()
    assert retry.committed_ids(include_errors=False) == {"b"}
    retry.write_part([out_row("a", text="fixed")])
    assert ids_seen_by_pandas(tmp_path) == ["a", "a", "b"]  # while the step runs, both copies exist ...
    manifest = retry.commit({"step": "gen"})
    assert ids_seen_by_pandas(tmp_path) == ids_seen_by_duckdb(tmp_path) == ["a", "b"]  # ... not after
    rows = pd.read_parquet(tmp_path).set_index("row_id")
    assert rows.loc["a", "text"] == "fixed" and pd.isna(rows.loc["a", "error"]) and rows.loc["b", "text"] == "kept"
    assert (manifest["rows_ok"], manifest["rows_failed"]) == (2, 0)
    assert manifest["parts"] == parts_on_disk(tmp_path)


def test_the_current_runs_part_wins_whatever_the_clock_says(tmp_path: Path) -> None:
    old = ParquetSink(str(tmp_path), "gen")
    old.write_part([out_row("a", error="timeout")])
    (old_part,) = tmp_path.glob("part-*.parquet")
    os.utime(old_part, (4_000_000_000, 4_000_000_000))  # an old part stamped in the future (clock skew)
    run = ParquetSink(str(tmp_path), "gen")
    run.prepare()
    run.write_part([out_row("a", text="fixed"), out_row("b")])
    run.commit({})
    rows = pq.read_table(tmp_path).to_pylist()
    assert {r["row_id"]: r["text"] for r in rows} == {"a": "fixed", "b": None} and len(rows) == 2


def test_a_run_killed_mid_settle_is_settled_by_the_next(tmp_path: Path) -> None:
    """Killed after the new copy was written and before the old one was replaced: the next prepare finishes."""
    sink = ParquetSink(str(tmp_path), "gen")
    sink.write_part([out_row("a", error="timeout"), out_row("b"), out_row("c")])
    (old,) = tmp_path.glob("part-*.parquet")
    os.utime(old, (1_000_000, 1_000_000))
    sink.write_part([out_row("a", text="fixed")])
    assert ids_seen_by_duckdb(tmp_path) == ["a", "a", "b", "c"]
    ParquetSink(str(tmp_path), "gen").prepare()
    assert ids_seen_by_duckdb(tmp_path) == ["a", "b", "c"]
    assert pd.read_parquet(tmp_path).set_index("row_id").loc["a", "text"] == "fixed"
    # and a copy left by a crash between writing the settled part and removing the old one:
    settled = ParquetSink(str(tmp_path), "gen")
    (kept,) = [p for p in tmp_path.glob("part-*.parquet") if "b" in pq.read_table(p).column("row_id").to_pylist()]
    (tmp_path / "part-00000000000000000001.parquet").write_bytes(kept.read_bytes())
    settled.prepare()
    assert ids_seen_by_pandas(tmp_path) == ["a", "b", "c"]


def test_manifest_counts_parts_and_legacy_location(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    sink = ParquetSink(str(out), "gen")
    sink.prepare()
    sink.write_part([out_row("a"), out_row("b", error="bad")])
    sink.write_part([out_row("c")])
    manifest = sink.commit({"step": "gen", "task": "t2i", "model_id": "lance-tiny"})
    assert read_manifest(str(out)) == manifest
    assert (out / "__lance_ray__" / "manifest.json").exists()
    assert manifest["step"] == "gen" and manifest["format"] == "parquet"
    assert (manifest["rows_ok"], manifest["rows_failed"]) == (2, 1)
    assert manifest["parts"] == sorted([part_name(["a", "b"]), part_name(["c"])])
    assert manifest["lance_ray_version"] == __version__
    # An output written before __lance_ray__/ had its manifest beside the parts: still read, and replaced
    (out / "__lance_ray__" / "manifest.json").unlink()
    (out / "_manifest.json").write_text(json.dumps({"step": "old"}))
    assert read_manifest(str(out)) == {"step": "old"}
    sink.commit({"step": "gen"})
    assert not (out / "_manifest.json").exists() and read_manifest(str(out))["step"] == "gen"


def test_overwrite_removes_only_what_lance_ray_wrote(tmp_path: Path) -> None:
    """Issue 12 #2: --overwrite erased a user's own media/ folder."""
    out = tmp_path / "existing"
    (out / "media").mkdir(parents=True)
    (out / "media" / "holiday.jpg").write_bytes(b"the user's photo")
    (out / "__media__").mkdir()
    (out / "__media__" / "mine.png").write_bytes(b"the user's, in our folder")
    (out / "notes.txt").write_text("mine")
    theirs = pa.Table.from_pylist([{"id": 1}])
    pq.write_table(theirs, out / "part-00000-5e1f.snappy.parquet")  # a Parquet part of the user's own
    sink = ParquetSink(str(out), "gen")
    sink.prepare()
    sink.write_part([out_row("a", PNG, turns=[PNG]), out_row("b", error="bad")])
    sink.commit({})
    # an output of an earlier version: media in media/ named by absolute URIs, manifest beside the parts
    legacy = out / "media" / "old.png"
    legacy.write_bytes(b"written by lance-ray 0.0")
    table = pa.Table.from_pylist([{"row_id": "old", "step": "gen", "task": "t2i", "media_uri": str(legacy)}],
                                 schema=OUTPUT_SCHEMA)
    pq.write_table(table, out / part_name(["old"]))
    (out / "_manifest.json").write_text("{}")

    sink.reset()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "__media__/mine.png", "media/holiday.jpg", "notes.txt", "part-00000-5e1f.snappy.parquet"]
    assert sink.committed_ids() == set() and read_manifest(str(out)) is None
    ParquetSink(str(tmp_path / "never-written"), "gen").reset()  # nothing to do


def test_old_outputs_still_resume(tmp_path: Path) -> None:
    """Parts of an older schema (no turn_media_uris) with absolute media URIs count as committed."""
    old_schema = pa.schema([f for f in OUTPUT_SCHEMA if f.name != "turn_media_uris"])
    media = tmp_path / "media" / "old.png"
    media.parent.mkdir()
    media.write_bytes(b"png")
    old = pa.Table.from_pylist([{"row_id": "old", "step": "gen", "task": "t2i", "text": "kept",
                                 "media_uri": str(media)}], schema=old_schema)
    pq.write_table(old, tmp_path / part_name(["old"]))
    sink = ParquetSink(str(tmp_path), "gen")
    sink.prepare()
    sink.write_part([out_row("new", PNG, turns=[PNG])])
    rows = {r["row_id"]: r for r in sink.read().to_pylist()}
    assert rows["old"]["text"] == "kept" and rows["old"]["turn_media_uris"] is None
    assert rows["old"]["media_uri"] == str(media)
    assert len(rows["new"]["turn_media_uris"]) == 2
    assert committed_row_ids(str(tmp_path)) == {"old", "new"}


def test_s3_parts_media_manifest_settle_and_reset(s3_server: str) -> None:
    bucket = f"sink-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.filesystem_for(f"s3://{bucket}")
    fs.mkdir(bucket)
    out = f"s3://{bucket}/runs/gen"
    sink = ParquetSink(out, "gen")
    sink.prepare()
    assert sink.committed_ids() == set()
    sink.write_part([out_row("a", PNG, text="x"), out_row("b", error="bad")])
    sink.commit({"step": "gen"})
    stored = pd.read_parquet(f"{out}/{part_name(['a', 'b'])}", storage_options={
        "client_kwargs": {"endpoint_url": s3_server}}).set_index("row_id")
    assert stored.loc["a", "media_uri"] == f"{out}/__media__/a.png"  # a full URI on object stores
    assert fs.cat(f"{bucket}/runs/gen/__media__/a.png") == PNG.data
    assert ParquetSink(out, "gen").committed_ids(include_errors=False) == {"a"}

    retry = ParquetSink(out, "gen")
    retry.prepare()
    retry.write_part([out_row("b", PNG, text="fixed")])
    manifest = retry.commit({"step": "gen"})
    fs.invalidate_cache()
    parts = [p for p in fs.ls(f"{bucket}/runs/gen") if p.endswith(".parquet")]
    ids = [i for p in parts for i in pq.read_table(p, filesystem=fs).column("row_id").to_pylist()]
    assert sorted(ids) == ["a", "b"] and (manifest["rows_ok"], manifest["rows_failed"]) == (2, 0)
    assert read_manifest(out)["rows_ok"] == 2

    retry.reset()
    fs.invalidate_cache()
    assert retry.committed_ids() == set() and not fs.exists(f"{bucket}/runs/gen/__media__/a.png")
    assert read_manifest(out) is None
