"""Outputs as users read them: every Parquet reader opens a step folder, Lance and WebDataset outputs
read back with their own libraries, exactly once after a retry, what --overwrite leaves, the manifest,
and one run per output. Real local Ray, the `debug` backend (only the pipeline matters here).
"""

from __future__ import annotations

import io
import json
import shutil
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lance_ray import resolve_media_uri
from lance_ray.io import media
from lance_ray.pipeline.runner import run_job
from lance_ray.pipeline.sinks import OutputLocked, read_manifest
from lance_ray.pipeline.sinks.lock import OutputLock
from lance_ray.spec import load_job_text

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"
IMAGES = sorted((DATASETS / "images").iterdir())
pytestmark = pytest.mark.usefixtures("ray_local")


def _job(tmp_path: Path, body: str, name: str = "outputs"):
    text = (f"name: {name}\nmodels:\n  image: {{source: lance-tiny, backend: debug}}\n"
            f"  video: {{source: lance-tiny, backend: debug}}\noutput: {tmp_path / 'out'}\n{textwrap.dedent(body)}")
    return load_job_text(text, f"{name}.yaml", tmp_path)


READERS = {
    "pandas": lambda d: list(pd.read_parquet(d)["row_id"]),
    "pyarrow.parquet": lambda d: pq.read_table(d).column("row_id").to_pylist(),
    "pyarrow.dataset": lambda d: pads.dataset(d).to_table(columns=["row_id"]).column("row_id").to_pylist(),
    "duckdb": lambda d: [r[0] for r in duckdb.sql(f"select row_id from read_parquet('{d}/*.parquet')").fetchall()],
    "datasets": lambda d: __import__("datasets").load_dataset("parquet", data_dir=str(d), split="train",
                                                              cache_dir=str(Path(d).parent / ".hf"))["row_id"],
}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of t2i (media), a multi-turn edit (media per turn) and x2t (text): the outputs the readers open."""
    tmp_path = tmp_path_factory.mktemp("readers")
    job = _job(tmp_path, f"""
        steps:
          - name: gen
            task: t2i
            input: {{path: {DATASETS / 'prompts.jsonl'}, columns: {{row_id: id}}, limit: 4}}
            params: {{height: 32, width: 48}}
          - name: edit
            task: image_edit
            input: {{from_step: gen}}
            turns: ["make it night", "add snow"]
          - name: caption
            task: x2t_image
            input: {{path: {DATASETS / 'images'}, prompt: "Describe it."}}
        """)
    summary = run_job(job, progress=False)
    assert {s.name: (s.ok, s.failed) for s in summary.steps} == {"gen": (4, 0), "edit": (4, 0), "caption": (6, 0)}
    return tmp_path / "out"


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("step,rows", [("gen", 4), ("edit", 4), ("caption", 6)])
def test_every_reader_opens_a_step_folder(written: Path, reader: str, step: str, rows: int) -> None:
    ids = READERS[reader](written / step)
    assert len(ids) == len(set(ids)) == rows


def test_media_uris_are_relative_and_resolve_after_a_move(written: Path, tmp_path: Path) -> None:
    moved = tmp_path / "copied"
    shutil.copytree(written, moved)
    for step in ("gen", "edit"):
        rows = pd.read_parquet(moved / step).to_dict("records")
        for row in rows:
            assert row["media_uri"].startswith("__media__/")
            image = media.decode_image(resolve_media_uri(str(moved / step), row["media_uri"]))
            assert image.shape == (row["height"], row["width"], 3)
    edits = pd.read_parquet(moved / "edit").to_dict("records")
    assert all(len(r["turn_media_uris"]) == 2 and r["turn_media_uris"][-1] == r["media_uri"] for r in edits)
    assert pd.read_parquet(moved / "caption")["media_uri"].isna().all()


@pytest.mark.slow
def test_spark_reads_the_step_folders(written: Path) -> None:
    pyspark = pytest.importorskip("pyspark.sql")
    if shutil.which("java") is None:
        pytest.skip("Spark needs Java")
    spark = (pyspark.SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", "1").getOrCreate())
    try:
        for step, rows in (("gen", 4), ("edit", 4), ("caption", 6)):
            frame = spark.read.parquet(str(written / step))
            ids = [r.row_id for r in frame.select("row_id").collect()]
            assert len(ids) == len(set(ids)) == rows
    finally:
        spark.stop()


def test_lance_and_webdataset_outputs_read_back_with_their_libraries(tmp_path: Path) -> None:
    lance = pytest.importorskip("lance")
    wds = pytest.importorskip("webdataset")
    job = _job(tmp_path, f"""
        steps:
          - name: gen
            task: t2i
            input: {{path: {DATASETS / 'prompts.jsonl'}, columns: {{row_id: id}}, limit: 3}}
            params: {{height: 32, width: 48}}
            output: {{format: lance, path: {tmp_path / 'gallery.lance'}}}
          - name: shards
            task: t2i
            input: {{rows: [{{prompt: "a red house", id: h.1}}, {{prompt: "a blue car", id: c1}}], columns: {{row_id: id}}}}
            params: {{height: 32, width: 48}}
            output: {{format: webdataset}}
          - name: clips
            task: t2v
            input: {{rows: [{{prompt: "waves"}}]}}
            params: {{height: 32, width: 48, frames: 5, fps: 8}}
            output: {{format: webdataset}}
        """)
    summary = run_job(job, progress=False)
    assert [(s.ok, s.failed) for s in summary.steps] == [(3, 0), (2, 0), (1, 0)]

    dataset = lance.dataset(str(tmp_path / "gallery.lance"))
    rows = dataset.to_table(columns=["row_id", "prompt", "width", "height", "error"]).to_pylist()
    assert sorted(r["row_id"] for r in rows) == ["p01", "p02", "p03"]
    assert all(r["error"] is None and (r["width"], r["height"]) == (48, 32) for r in rows)
    blobs = dataset.take_blobs("media", indices=list(range(3)))
    images = [np.asarray(Image.open(io.BytesIO(blob.read()))) for blob in blobs]
    assert all(image.shape == (32, 48, 3) for image in images)
    assert read_manifest(str(tmp_path / "gallery.lance"))["format"] == "lance"

    shards = sorted(str(p) for p in (tmp_path / "out" / "shards").glob("shard-*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("rgb"))
    by_id = {json.loads(s["json"])["row_id"] if isinstance(s["json"], bytes) else s["json"]["row_id"]: s
             for s in samples}
    assert sorted(by_id) == ["c1", "h.1"]
    assert by_id["c1"]["png"].shape == (32, 48, 3) and by_id["c1"]["txt"] == "a blue car"
    clip = next(iter(wds.WebDataset(str(next((tmp_path / "out" / "clips").glob("*.tar"))), shardshuffle=False)))
    assert media.decode_video(_write(tmp_path / "clip.mp4", clip["mp4"])).shape == (5, 32, 48, 3)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_a_second_job_adds_caption_columns_to_a_lance_dataset(tmp_path: Path) -> None:
    lance = pytest.importorskip("lance")
    target = tmp_path / "images.lance"
    first = _job(tmp_path, f"""
        steps:
          - name: caption
            task: x2t_image
            input: {{path: {DATASETS / 'images'}, prompt: "Describe it."}}
            output: {{format: lance, path: {target}}}
        """, name="first")
    assert run_job(first, progress=False).steps[0].ok == len(IMAGES)
    before = lance.dataset(str(target))
    files_before = {f.fragment_id: [(d.path, d.fields) for d in f.data_files()] for f in before.get_fragments()}
    text_before = before.to_table(columns=["row_id", "text"]).to_pylist()

    body = f"""
        steps:
          - name: vqa
            task: x2t_image
            input: {{path: {DATASETS / 'images'}, prompt: "How many people?"}}
            output: {{format: lance, path: {target}, merge_into: true}}
        """
    summary = run_job(_job(tmp_path, body, name="second"), progress=False)
    assert (summary.steps[0].ok, summary.steps[0].failed) == (len(IMAGES), 0)
    after = lance.dataset(str(target))
    assert after.version > before.version
    table = after.to_table(columns=["row_id", "text", "vqa_text", "vqa_prompt", "vqa_error"]).to_pylist()
    assert sorted((r["row_id"], r["text"]) for r in table) == sorted((r["row_id"], r["text"]) for r in text_before)
    assert all(r["vqa_text"].startswith("[debug backend") and r["vqa_prompt"] == "How many people?"
               and r["vqa_error"] is None for r in table)
    for fragment in after.get_fragments():  # the existing columns' files are untouched; the new ones are added
        files = [(d.path, d.fields) for d in fragment.data_files()]
        assert files[: len(files_before[fragment.fragment_id])] == files_before[fragment.fragment_id]
        assert len(files) > len(files_before[fragment.fragment_id])

    again = run_job(_job(tmp_path, body, name="second"), progress=False)  # nothing to do: columns stay
    assert (again.steps[0].ok, again.steps[0].skipped) == (0, len(IMAGES))
    assert lance.dataset(str(target)).to_table(columns=["vqa_text"]).column(0).null_count == 0
    run_job(_job(tmp_path, body, name="second"), progress=False, overwrite=True)
    assert "vqa_text" in lance.dataset(str(target)).schema.names


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "lance"])
def test_retry_failed_leaves_each_row_once(tmp_path: Path, fmt: str) -> None:
    late = tmp_path / "late.png"
    path = f", path: {tmp_path / 'caps.lance'}" if fmt == "lance" else ""
    body = f"""
        steps:
          - name: caps
            task: x2t_image
            input: {{rows: [{{row_id: row-0, image: {IMAGES[0]}}}, {{row_id: row-1, image: {late}}},
                            {{row_id: row-2, image: {IMAGES[1]}}}]}}
            output: {{format: {fmt}{path}}}
        """
    first = run_job(_job(tmp_path, body), progress=False)
    assert (first.steps[0].ok, first.steps[0].failed) == (2, 1)
    shutil.copy(IMAGES[2], late)  # the missing file arrives
    retried = run_job(_job(tmp_path, body), progress=False, retry_failed=True)
    assert (retried.steps[0].ok, retried.steps[0].failed, retried.steps[0].skipped) == (1, 0, 2)
    folder = tmp_path / "out" / "caps"
    if fmt == "parquet":
        for ids in (READERS["pandas"](folder), READERS["duckdb"](folder)):
            assert sorted(ids) == ["row-0", "row-1", "row-2"]
        assert pd.read_parquet(folder)["error"].isna().all()
    elif fmt == "webdataset":
        wds = pytest.importorskip("webdataset")
        samples = list(wds.WebDataset([str(p) for p in folder.glob("*.tar")], shardshuffle=False).decode())
        rows = [s["json"] for s in samples]
        assert sorted(r["row_id"] for r in rows) == ["row-0", "row-1", "row-2"]
        assert all(r["error"] is None for r in rows)
    else:
        lance = pytest.importorskip("lance")
        rows = lance.dataset(str(tmp_path / "caps.lance")).to_table(columns=["row_id", "error"]).to_pylist()
        assert sorted(r["row_id"] for r in rows) == ["row-0", "row-1", "row-2"]
        assert all(r["error"] is None for r in rows)


def test_overwrite_keeps_the_users_files_and_a_rerun_writes_the_manifest(tmp_path: Path) -> None:
    existing = tmp_path / "my-folder"
    (existing / "media").mkdir(parents=True)
    (existing / "media" / "holiday.jpg").write_bytes(b"the user's photo")
    (existing / "README.txt").write_text("the user's notes")
    body = f"""
        steps:
          - name: gen
            task: t2i
            input: {{rows: [{{prompt: a}}, {{prompt: b}}]}}
            params: {{height: 16, width: 16}}
            output: {existing}
        """
    assert run_job(_job(tmp_path, body), progress=False).steps[0].ok == 2
    manifest = existing / "__lance_ray__" / "manifest.json"
    manifest.unlink()  # as if the run had been killed after its last part, before its manifest
    again = run_job(_job(tmp_path, body), progress=False)
    assert (again.steps[0].ok, again.steps[0].skipped) == (0, 2)
    assert json.loads(manifest.read_text())["rows_ok"] == 2
    clean = run_job(_job(tmp_path, body), progress=False, overwrite=True)
    assert (clean.steps[0].ok, clean.steps[0].skipped) == (2, 0)
    assert (existing / "media" / "holiday.jpg").read_bytes() == b"the user's photo"
    assert (existing / "README.txt").read_text() == "the user's notes"
    assert len(list((existing / "__media__").iterdir())) == 2 and len(READERS["duckdb"](existing)) == 2


def test_a_second_run_of_an_output_refuses_while_the_first_holds_it(tmp_path: Path) -> None:
    body = """
        steps:
          - name: gen
            task: t2i
            input: {rows: [{prompt: a}]}
            params: {height: 16, width: 16}
        """
    holder = OutputLock(str(tmp_path / "out" / "gen"), "run-that-holds-it")
    holder.acquire()
    try:
        with pytest.raises(OutputLocked, match="is being written by run run-that-holds-it"):
            run_job(_job(tmp_path, body), progress=False)
        assert not list((tmp_path / "out" / "gen").glob("part-*"))
    finally:
        holder.release()
    assert run_job(_job(tmp_path, body), progress=False).steps[0].ok == 1


def test_the_output_rules_hold_for_outputs_moved_on_the_command_line(tmp_path: Path) -> None:
    """`lance-ray run --output` replaces the root after validation: the rules are checked again, before Ray."""
    from lance_ray.errors import JobFileError
    from lance_ray.pipeline.runner import check_outputs

    (tmp_path / "images").mkdir()
    job = _job(tmp_path, f"""
        steps:
          - name: caption
            task: x2t_image
            input: {{path: {tmp_path / 'images'}, prompt: "Describe it."}}
        """)
    check_outputs(job)
    for output, message in ((str(tmp_path / "images" / "out"), "inside the input folder"),
                            ("memory://results", "does not persist")):
        with pytest.raises(JobFileError, match=message):
            run_job(job.model_copy(update={"output": output}), progress=False)
