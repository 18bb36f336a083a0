"""The Lance and WebDataset sinks without Ray, read back with their own libraries."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest

from lance_ray.errors import RunError
from lance_ray.pipeline.sinks import EncodedMedia, LanceMergeSink, LanceSink, OutputRow, WebDatasetSink

lance = pytest.importorskip("lance")
wds = pytest.importorskip("webdataset")


def out_row(row_id: str, media: bytes | None = None, turns: list[bytes] | None = None, **extra) -> OutputRow:
    values = {"row_id": row_id, "step": "gen", "task": "t2i", "prompt": f"prompt of {row_id}", **extra}
    return OutputRow(values, None if media is None else EncodedMedia(media, "png"),
                     None if turns is None else [EncodedMedia(t, "png") for t in turns])


def lance_rows(uri: Path, *columns: str) -> list[dict]:
    return lance.dataset(str(uri)).to_table(columns=["row_id", *columns]).to_pylist()


def test_lance_sink_upserts_by_row_id(tmp_path: Path) -> None:
    uri = tmp_path / "gen.lance"
    sink = LanceSink(str(uri), "gen")
    sink.prepare()
    batch = [out_row("a", b"A-png", error=None), out_row("b", error="timeout")]
    sink.write_part(batch)
    sink.write_part(batch)  # a retried batch: replaces, never adds
    assert sorted(r["row_id"] for r in lance_rows(uri)) == ["a", "b"]
    assert sink.committed_ids() == {"a", "b"} and sink.committed_ids(include_errors=False) == {"a"}
    sink.write_part([out_row("b", b"B-png")])  # --retry-failed
    rows = {r["row_id"]: r for r in lance_rows(uri, "error")}
    assert len(rows) == 2 and rows["b"]["error"] is None
    dataset = lance.dataset(str(uri))
    index = [r["row_id"] for r in dataset.to_table(columns=["row_id"]).to_pylist()].index("b")
    assert dataset.take_blobs("media", indices=[index])[0].read() == b"B-png"
    manifest = sink.commit({"step": "gen"})
    assert (manifest["rows_ok"], manifest["rows_failed"], manifest["format"]) == (2, 0, "lance")
    assert sink.read().column("row_id").to_pylist() is not None and sink.read().num_rows == 2


def test_lance_sink_keeps_turns_and_versions(tmp_path: Path) -> None:
    uri = tmp_path / "edits.lance"
    sink = LanceSink(str(uri), "edit")
    sink.prepare()
    sink.write_part([out_row("e", b"last", turns=[b"first", b"second"])])
    (row,) = lance_rows(uri, "turn_media")
    assert row["turn_media"] == [b"first", b"second", b"last"]
    version = lance.dataset(str(uri)).version
    sink.reset()  # --overwrite: a new, empty version; the earlier one stays readable
    assert lance.dataset(str(uri)).count_rows() == 0
    assert lance.dataset(str(uri), version=version).count_rows() == 1


def test_lance_sink_writes_only_into_its_own_datasets(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.lance"
    lance.write_dataset(pa.table({"row_id": ["x"], "label": ["cat"]}), str(theirs))
    with pytest.raises(RunError, match="did not create"):
        LanceSink(str(theirs), "gen").prepare()
    LanceSink(str(theirs), "gen").reset()  # not ours: left alone
    assert lance_rows(theirs, "label") == [{"row_id": "x", "label": "cat"}]
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(RunError, match="holds files but no Lance dataset"):
        LanceSink(str(folder), "gen").prepare()
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"]


def test_lance_merge_adds_columns_and_refuses_to_clobber(tmp_path: Path) -> None:
    target = tmp_path / "images.lance"
    with pytest.raises(RunError, match="no Lance dataset"):
        LanceMergeSink(str(target), "vqa").prepare()
    lance.write_dataset(pa.table({"row_id": ["a", "b", "c"], "vqa_text": ["x", "y", "z"]}), str(target))
    with pytest.raises(RunError, match="not add"):
        LanceMergeSink(str(target), "vqa").prepare()  # a column of that name that lance-ray did not add
    lance.write_dataset(pa.table({"row_id": ["a", "b", "c"], "label": ["1", "2", "3"]}), str(target), mode="overwrite")
    sink = LanceMergeSink(str(target), "vqa")
    sink.prepare()
    sink.write_part([out_row("a", task="x2t_image", text="two"), out_row("zz", task="x2t_image", text="stray")])
    manifest = sink.commit({"step": "vqa"})
    assert (manifest["rows_merged"], manifest["rows_not_in_dataset"]) == (1, 1)
    assert sink.read_manifest()["columns"] == ["vqa_error", "vqa_model_id", "vqa_params", "vqa_prompt",
                                               "vqa_started_at", "vqa_text"]
    rows = {r["row_id"]: r for r in lance_rows(target, "label", "vqa_text")}
    assert rows["a"]["vqa_text"] == "two" and rows["b"]["vqa_text"] is None and rows["c"]["label"] == "3"
    again = LanceMergeSink(str(target), "vqa")  # a resumed run: the staged rows count, more get merged
    again.prepare()
    assert again.committed_ids() == {"a", "zz"}
    again.write_part([out_row("b", task="x2t_image", text="three")])
    again.commit({})
    assert {r["row_id"]: r["vqa_text"] for r in lance_rows(target, "vqa_text")} == {"a": "two", "b": "three", "c": None}
    again.reset()
    assert "vqa_text" not in lance.dataset(str(target)).schema.names and lance_rows(target, "label")[0]["label"]


def test_webdataset_shards_read_back_with_webdataset(tmp_path: Path) -> None:
    sink = WebDatasetSink(str(tmp_path / "shards"), "gen")
    sink.prepare()
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 6), (255, 0, 0)).save(png, format="PNG")
    sink.write_part([out_row("plain", png.getvalue()), out_row("has.dots", png.getvalue(), turns=[png.getvalue()]),
                     out_row("bad", error="boom")])
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("shard-*.tar"))
    samples = {s["json"]["row_id"]: s for s in wds.WebDataset(shards, shardshuffle=False).decode("rgb")}
    assert sorted(samples) == ["bad", "has.dots", "plain"]
    assert samples["plain"]["png"].shape == (6, 8, 3) and samples["plain"]["txt"] == "prompt of plain"
    assert samples["has.dots"]["turn1.png"].shape == (6, 8, 3)  # the key holds no dot: turns stay in the sample
    assert "png" not in samples["bad"] and samples["bad"]["json"]["error"] == "boom"
    with tarfile.open(shards[0]) as tar:
        assert all("." in name and "/" not in name for name in tar.getnames())


def test_webdataset_retry_leaves_each_row_once_and_reset(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = WebDatasetSink(str(out), "gen")
    first.prepare()
    first.write_part([out_row("a", error="timeout"), out_row("b", b"png-b")])
    first.commit({})
    retry = WebDatasetSink(str(out), "gen")
    retry.prepare()
    assert retry.committed_ids(include_errors=False) == {"b"}
    retry.write_part([out_row("a", b"png-a")])
    manifest = retry.commit({})
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    rows = [s["json"] for s in wds.WebDataset(shards, shardshuffle=False).decode()]
    assert sorted(r["row_id"] for r in rows) == ["a", "b"] and all(r["error"] is None for r in rows)
    assert (manifest["rows_ok"], len(manifest["parts"])) == (2, 2)
    (out / "notes.txt").write_text("mine")
    retry.reset()
    assert [p.name for p in out.iterdir() if p.is_file()] == ["notes.txt"]
