"""The committing Parquet sink: atomic parts, media files, manifest, resume bookkeeping; local and S3."""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lance_ray import __version__
from lance_ray.io import storage
from lance_ray.pipeline import sinks
from lance_ray.pipeline.sinks import (
    committed_row_ids,
    part_name,
    read_manifest,
    read_step_output,
    reset,
    write_manifest,
    write_media,
    write_part,
)
from lance_ray.spec.rows import OUTPUT_SCHEMA


def out_row(row_id: str, **extra) -> dict:
    return {"row_id": row_id, "step": "gen", "task": "t2i", "prompt": f"prompt of {row_id}", **extra}


def visible_files(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory))


def test_write_part_roundtrip_and_schema(tmp_path):
    out = str(tmp_path / "gen")
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    rows = [
        out_row(
            "a",
            text=None,
            width=64,
            height=48,
            frames=1,
            fps=None,
            seed=7,
            params={"steps": 30},
            started_at=started,
            elapsed_s=1.5,
        ),
        out_row("b", error="ValueError: boom", started_at="2026-01-02T03:04:05+00:00"),
    ]
    uri = write_part(out, rows)
    assert visible_files(out) == [os.path.basename(uri)]
    table = pq.read_table(uri)
    assert table.schema.equals(OUTPUT_SCHEMA)
    got = {r["row_id"]: r for r in table.to_pylist()}
    assert got["a"]["params"] == json.dumps({"steps": 30})
    assert got["a"]["started_at"] == started and got["b"]["started_at"] == started
    assert (got["a"]["width"], got["a"]["seed"], got["a"]["error"]) == (64, 7, None)
    assert got["b"]["error"] == "ValueError: boom" and got["b"]["width"] is None


def test_write_part_rejects_unknown_columns_and_duplicates(tmp_path):
    with pytest.raises(ValueError, match="unknown output columns"):
        write_part(str(tmp_path), [out_row("a", captoin="typo")])
    with pytest.raises(ValueError, match="duplicate"):
        write_part(str(tmp_path), [out_row("a"), out_row("a")])
    with pytest.raises(ValueError):
        write_part(str(tmp_path), [])
    assert not os.listdir(tmp_path)


def test_part_names_depend_only_on_the_row_id_set(tmp_path):
    out = str(tmp_path)
    assert part_name(["a", "b"]) == part_name(["b", "a"]) != part_name(["a", "c"])
    first = write_part(out, [out_row("a", text="first"), out_row("b")])
    retried = write_part(out, [out_row("b"), out_row("a", text="retried")])  # a retried batch
    assert first == retried
    assert len(visible_files(out)) == 1
    texts = {r["row_id"]: r["text"] for r in read_step_output(out).to_pylist()}
    assert texts == {"a": "retried", "b": None}


def test_newest_part_wins_on_read(tmp_path):
    out = str(tmp_path)
    old = write_part(out, [out_row("a", error="timeout"), out_row("b")])
    new = write_part(out, [out_row("a", text="fixed")])
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    table = read_step_output(out)
    assert sorted(table.column("row_id").to_pylist()) == ["a", "b"]
    row_a = [r for r in table.to_pylist() if r["row_id"] == "a"][0]
    assert (row_a["text"], row_a["error"]) == ("fixed", None)
    assert committed_row_ids(out) == {"a", "b"}
    assert committed_row_ids(out, include_errors=False) == {"a", "b"}
    os.utime(old, (3_000_000, 3_000_000))  # now the error row is the newest version of "a"
    assert committed_row_ids(out, include_errors=False) == {"b"}


def test_crash_mid_write_leaves_no_visible_part(tmp_path, monkeypatch):
    out = str(tmp_path)
    write_part(out, [out_row("kept")])

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    for target in ("replace", "fsync"):  # before the rename, and while the temp file is being written
        with monkeypatch.context() as m:
            m.setattr(storage.os, target, crash)
            with pytest.raises(OSError, match="simulated crash"):
                write_part(out, [out_row("lost")])
        assert visible_files(out) == [part_name(["kept"])]  # and no temp file left behind

    # A process killed outright leaves its hidden temp file; readers never see it.
    (tmp_path / f".{part_name(['ghost'])}.tmp-{uuid.uuid4().hex}").write_bytes(b"PAR1 half a parquet file")
    assert committed_row_ids(out) == {"kept"}
    assert read_step_output(out).num_rows == 1


@pytest.mark.parametrize(
    "row_id",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "..",
        ".",
        "",
        "a\x00b",
        "x/../../y",
        "C:\\Windows\\x",
        "~root",
        "é" * 300,
    ],
)
def test_media_names_never_escape_the_output_dir(tmp_path, row_id):
    out = tmp_path / "step"
    uri = write_media(str(out), row_id, b"data", "png")
    media_dir = os.path.realpath(out / "media")
    assert os.path.dirname(os.path.realpath(uri)) == media_dir
    assert os.listdir(media_dir) == [os.path.basename(uri)]
    name = os.path.basename(uri)
    assert len(name) <= storage.MAX_TOKEN_LEN + 4 and not name.startswith(".") and "\x00" not in name
    assert set(os.listdir(tmp_path)) == {"step"}


def test_media_names_are_stable_and_distinct(tmp_path):
    out = str(tmp_path)
    ids = ["a/b", "a_b", "a?b", "a b", "plain-id_1.x"]
    uris = [write_media(out, i, i.encode(), "mp4") for i in ids]
    assert len(set(uris)) == len(ids)
    assert uris[-1].endswith("/media/plain-id_1.x.mp4")  # safe ids are used as they are
    assert uris == [sinks.media_uri(out, i, ".MP4") for i in ids]
    for bad in ("", "png/../x", "p g", "verylongextension"):
        with pytest.raises(ValueError):
            write_media(out, "a", b"", bad)


def test_manifest_reset_and_unrelated_files(tmp_path):
    out = tmp_path / "gen"
    write_part(str(out), [out_row("a"), out_row("b", error="bad")])
    write_part(str(out), [out_row("c")])
    write_media(str(out), "a", b"png bytes", "png")
    write_manifest(str(out), {"step": "gen", "task": "t2i", "model_id": "lance-tiny", "elapsed_s": 1.0})
    manifest = read_manifest(str(out))
    assert manifest["step"] == "gen" and manifest["model_id"] == "lance-tiny"
    assert (manifest["rows_ok"], manifest["rows_failed"]) == (2, 1)
    assert manifest["parts"] == sorted([part_name(["a", "b"]), part_name(["c"])])
    assert manifest["lance_ray_version"] == __version__
    (out / "notes.txt").write_text("mine")
    reset(str(out))
    assert visible_files(out) == ["notes.txt"]
    assert committed_row_ids(str(out)) == set() and read_manifest(str(out)) is None
    assert read_step_output(str(out)).num_rows == 0
    reset(str(tmp_path / "never-written"))  # nothing to do


def test_s3_parts_media_manifest_and_resume(s3_server):
    bucket = f"sink-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.filesystem_for(f"s3://{bucket}")
    fs.mkdir(bucket)
    out = f"s3://{bucket}/runs/gen"
    assert committed_row_ids(out) == set()
    part = write_part(out, [out_row("a", text="x"), out_row("b", error="bad")])
    assert part == f"{out}/{part_name(['a', 'b'])}"
    media = write_media(out, "../a", b"\x89PNG fake", "png")
    assert media.startswith(f"{out}/media/") and ".." not in media
    write_manifest(out, {"step": "gen"})

    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/gen"))
    assert names == sorted(["_manifest.json", "media", part_name(["a", "b"])])
    assert fs.cat(media.removeprefix("s3://")) == b"\x89PNG fake"
    assert committed_row_ids(out) == {"a", "b"}
    assert committed_row_ids(out, include_errors=False) == {"a"}
    assert read_step_output(out).column("text").to_pylist() == ["x", None]
    assert read_manifest(out)["rows_failed"] == 1

    reset(out)
    fs.invalidate_cache()
    assert committed_row_ids(out) == set()
    assert not fs.exists(f"{bucket}/runs/gen/media")


def test_parts_from_an_older_schema_still_read(tmp_path):
    old_schema = pa.schema([f for f in OUTPUT_SCHEMA if f.name != "turn_media_uris"])
    old = pa.Table.from_pylist([out_row("old", text="kept")], schema=old_schema)
    pq.write_table(old, tmp_path / part_name(["old"]))
    write_part(str(tmp_path), [out_row("new", turn_media_uris=["t1.png", "t2.png"])])
    rows = {r["row_id"]: r for r in read_step_output(str(tmp_path)).to_pylist()}
    assert rows["old"]["text"] == "kept" and rows["old"]["turn_media_uris"] is None
    assert rows["new"]["turn_media_uris"] == ["t1.png", "t2.png"]
    assert committed_row_ids(str(tmp_path)) == {"old", "new"}
