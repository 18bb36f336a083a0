"""Step inputs → canonical rows: formats, content-derived ids, column mapping (nested paths), templates,
row errors, samples, from_step, S3, and the streaming Dataset the pipeline reads them through."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lance_ray.io import storage, tables
from lance_ray.io.media import decode_image
from lance_ray.pipeline import sinks, sources
from lance_ray.pipeline.sinks import write_part
from lance_ray.pipeline.sources import SourceError, media_row_id, open_source
from lance_ray.spec import Job
from lance_ray.spec.rows import SOURCE_SCHEMA

DATASETS = Path(__file__).resolve().parent.parent / "datasets"


def make_job(base: Path, *steps: dict, output: str | None = None) -> Job:
    data = {"name": "t", "output": output or str(base / "out"), "steps": list(steps)}
    return Job.model_validate(data, context={"base_dir": str(base)})


def rows_of(job: Job, name: str | None = None, upstream: dict | None = None) -> list[dict]:
    step = job.steps[0] if name is None else job.step(name)
    return list(open_source(step, job, upstream).iter_rows())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def content_id(record: dict | str) -> str:
    """The documented rule for a row without an id: 16 hex digits of the SHA-256 of its canonical JSON
    (sorted keys, values as read); a line that is not a record: of its text."""
    text = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- samples


def test_prompts_jsonl_with_mapped_ids_and_seeds():
    job = make_job(
        DATASETS,
        {"name": "g", "task": "t2i", "input": {"path": "prompts.jsonl", "columns": {"row_id": "id"}}},
    )
    rows = rows_of(job)
    source_lines = [json.loads(line) for line in (DATASETS / "prompts.jsonl").read_text().splitlines()]
    assert [r["row_id"] for r in rows] == [s["id"] for s in source_lines]
    assert [r["seed_override"] for r in rows] == [s["seed"] for s in source_lines]
    assert [r["prompt"] for r in rows] == [s["prompt"] for s in source_lines]
    assert all(r.get("error") is None and r.get("image") is None for r in rows)
    assert json.loads(rows[0]["input_row"]) == source_lines[0]


def test_edits_jsonl_media_paths_are_relative_to_the_table():
    job = make_job(DATASETS, {"name": "e", "task": "image_edit", "input": {"path": "edits.jsonl"}})
    rows = rows_of(job)
    source_lines = [json.loads(line) for line in (DATASETS / "edits.jsonl").read_text().splitlines()]
    assert [r["row_id"] for r in rows] == [content_id(line) for line in source_lines]  # `id` is not mapped
    assert [r["prompt"] for r in rows] == [s["instruction"] for s in source_lines]  # unmapped: 'instruction'
    for row, line in zip(rows, source_lines, strict=True):
        assert row["image"] == str(DATASETS / line["image"])
        assert decode_image(row["image"]).ndim == 3


def test_questions_csv_keeps_strings(tmp_path):
    job = make_job(DATASETS, {"name": "q", "task": "x2t_image", "input": {"path": "questions.csv"}})
    rows = rows_of(job)
    with open(DATASETS / "questions.csv", newline="") as f:
        source = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == [s["question"] for s in source]
    assert [r["row_id"] for r in rows] == [content_id(line) for line in source]  # CSV cells stay strings

    (tmp_path / "ids.csv").write_text("id,prompt\n007,hello\n")
    job = make_job(
        tmp_path, {"name": "g", "task": "t2i", "input": {"path": "ids.csv", "columns": {"row_id": "id"}}}
    )
    assert rows_of(job)[0]["row_id"] == "007"

    (tmp_path / "ragged.csv").write_text("prompt\nhello,extra,cells\n")
    job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": "ragged.csv"}})
    row = rows_of(job)[0]
    assert row["prompt"] == "hello" and json.loads(row["input_row"])["_extra_cells"] == ["extra", "cells"]


def test_image_directory_glob_and_list_give_the_same_stable_ids(tmp_path):
    shutil.copytree(DATASETS / "images", tmp_path / "images")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".hidden.png").write_bytes(b"")
    (tmp_path / "images" / ".thumbs").mkdir()
    shutil.copy(DATASETS / "images" / "tiles_256x256.png", tmp_path / "images" / ".thumbs" / "t.png")
    by_dir = make_job(tmp_path, {"name": "c", "task": "x2t_image", "input": {"path": "images"}})
    by_glob = make_job(tmp_path, {"name": "c", "task": "x2t_image", "input": {"path": "images/*"}})
    rows = rows_of(by_dir)
    names = sorted(p.name for p in (DATASETS / "images").iterdir())
    assert [Path(r["image"]).name for r in rows] == names
    assert [r["row_id"] for r in rows] == [media_row_id(n) for n in names]
    assert rows == rows_of(by_glob)
    assert [r["row_id"] for r in rows] == [r["row_id"] for r in rows_of(by_dir)]  # stable across reads
    assert all("/" not in r["row_id"] and r.get("error") is None for r in rows)

    nested = make_job(tmp_path, {"name": "c", "task": "x2t_image", "input": {"path": "."}})
    nested_ids = [r["row_id"] for r in rows_of(nested)]
    assert nested_ids == [media_row_id(f"images/{n}") for n in names]
    assert len(set(nested_ids)) == len(names)


def test_list_of_inputs_shares_one_root(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_jsonl(tmp_path / sub / "p.jsonl", [{"prompt": f"from {sub}"}])
    job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": ["a/p.jsonl", "b/p.jsonl"]}})
    rows = rows_of(job)
    assert [r["prompt"] for r in rows] == ["from a", "from b"]
    ids = [r["row_id"] for r in rows]
    assert ids == [content_id({"prompt": "from a"}), content_id({"prompt": "from b"})]

    (tmp_path / "a" / "README.md").write_text("# not a table")
    folder = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": "a", "format": "jsonl"}})
    assert [r["prompt"] for r in rows_of(folder)] == ["from a"]


def test_mixed_directory_picks_what_the_task_reads():
    captions = make_job(DATASETS, {"name": "c", "task": "x2t_video", "input": {"path": "."}})
    assert {Path(r["video"]).suffix for r in rows_of(captions)} == {".mp4"}
    prompts = make_job(DATASETS, {"name": "g", "task": "t2i", "input": {"path": "."}})
    texts = {json.loads(r["input_row"]).get("id") for r in rows_of(prompts)}
    assert {t[0] for t in texts} == {"e", "p", "q"}  # the rows of edits.jsonl, prompts.jsonl, questions.csv


def test_parquet_input_and_limit(tmp_path):
    table = pa.table({"caption": ["a cat", "a dog", "a fox"], "s": [1, 2, 3]})
    pq.write_table(table, tmp_path / "data.parquet")
    job = make_job(
        tmp_path,
        {
            "name": "g",
            "task": "t2i",
            "input": {"path": "data.parquet", "columns": {"prompt": "caption", "seed": "s"}, "limit": 2},
        },
    )
    source = open_source(job.steps[0], job)
    rows = list(source.iter_rows())
    assert [(r["row_id"], r["prompt"], r["seed_override"]) for r in rows] == [
        (content_id({"caption": "a cat", "s": 1}), "a cat", 1),
        (content_id({"caption": "a dog", "s": 2}), "a dog", 2),
    ]
    assert source.count() == 2 and source.estimate_rows() == tables.RowCount(2)  # from the footer, exact


def test_inline_rows_and_templates(tmp_path):
    job = make_job(
        tmp_path,
        {
            "name": "g",
            "task": "t2i",
            "input": {
                "rows": [{"subject": "a cat"}, {"subject": "a dog", "seed": 5}],
                "prompt": "A photo of {{ subject }}.",
            },
        },
    )
    rows = rows_of(job)
    assert [(r["row_id"], r["prompt"], r.get("seed_override")) for r in rows] == [
        (content_id({"subject": "a cat"}), "A photo of a cat.", None),
        (content_id({"subject": "a dog", "seed": 5}), "A photo of a dog.", 5),
    ]


def test_unusable_rows_become_error_rows(tmp_path):
    write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "ok", "subject": "cat", "s": "3"},
            {"id": "no-subject", "s": "1"},  # the template names a missing column
            {"id": "bad-seed", "subject": "dog", "s": "three"},
            {"id": "no-seed", "subject": "fox"},  # a mapped column is missing
            "{not json",
            "[1, 2]",
        ],
    )
    job = make_job(
        tmp_path,
        {
            "name": "g",
            "task": "t2i",
            "input": {"path": "p.jsonl", "prompt": "{{ subject }}", "columns": {"row_id": "id", "seed": "s"}},
        },
    )
    rows = {r["row_id"]: r for r in rows_of(job)}
    not_json, not_object = content_id("{not json\n"), content_id("[1, 2]\n")  # ids from the lines' text
    assert list(rows) == ["ok", "no-subject", "bad-seed", "no-seed", not_json, not_object]
    assert rows["ok"].get("error") is None and (rows["ok"]["prompt"], rows["ok"]["seed_override"]) == ("cat", 3)
    assert "'subject' is undefined" in rows["no-subject"]["error"]
    assert "the row's columns: id, s" in rows["no-subject"]["error"]  # what it has, beside what it lacks
    assert "not an integer" in rows["bad-seed"]["error"]
    assert "no seed: column 's' is missing" in rows["no-seed"]["error"]
    assert "line 5: invalid JSON" in rows[not_json]["error"] and "not a JSON object" in rows[not_object]["error"]


def test_empty_prompt_and_missing_media_are_row_errors(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": "   "}, {"prompt": ""}, {"other": 1}])
    job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": "p.jsonl"}})
    errors = [r.get("error") for r in rows_of(job)]
    assert errors[0] is None
    assert all(e and "non-empty prompt" in e for e in errors[1:3])
    assert errors[3] == ("task t2i needs a prompt: looked for column 'prompt' / 'instruction' / 'question' "
                         "(the row's columns: other)")

    write_jsonl(tmp_path / "e.jsonl", [{"instruction": "make it blue"}])
    job = make_job(tmp_path, {"name": "e", "task": "image_edit", "input": {"path": "e.jsonl"}})
    assert "needs an input image" in rows_of(job)[0]["error"]

    write_jsonl(tmp_path / "q.jsonl", [{"image": "x.png"}])  # understanding: the question may be empty
    job = make_job(tmp_path, {"name": "q", "task": "x2t_image", "input": {"path": "q.jsonl"}})
    row = rows_of(job)[0]
    assert row.get("error") is None and row["image"] == str(tmp_path / "x.png")


def test_ids_are_sanitised_and_duplicates_rejected(tmp_path):
    write_jsonl(
        tmp_path / "p.jsonl", [{"id": "../../etc/passwd", "prompt": "x"}, {"id": "a/b", "prompt": "y"}]
    )
    job = make_job(
        tmp_path, {"name": "g", "task": "t2i", "input": {"path": "p.jsonl", "columns": {"row_id": "id"}}}
    )
    ids = [r["row_id"] for r in rows_of(job)]
    assert ids == [storage.safe_token("../../etc/passwd"), storage.safe_token("a/b")]
    assert all("/" not in i and ".." not in i for i in ids)

    write_jsonl(
        tmp_path / "d.jsonl",
        [{"id": "x", "prompt": "1"}, {"id": "y", "prompt": "2"}, {"id": "x", "prompt": "3"}],
    )
    job = make_job(
        tmp_path, {"name": "g", "task": "t2i", "input": {"path": "d.jsonl", "columns": {"row_id": "id"}}}
    )
    with pytest.raises(SourceError, match="duplicate row_id 'x'"):
        rows_of(job)


def test_bad_inputs_raise_source_error(tmp_path):
    job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": "nowhere.jsonl"}})
    with pytest.raises(SourceError, match="no such file"):
        rows_of(job)
    (tmp_path / "empty").mkdir()
    job = make_job(tmp_path, {"name": "c", "task": "x2t_image", "input": {"path": "empty"}})
    with pytest.raises(SourceError, match="no .*files found"):
        rows_of(job)
    (tmp_path / "data.xyz").write_text("?")
    job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": "data.xyz"}})
    with pytest.raises(SourceError, match="input.format"):
        rows_of(job)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": "broken.parquet"}})
    with pytest.raises(SourceError, match="cannot read as parquet"):
        rows_of(job)


def test_from_step_reads_committed_ok_rows(tmp_path):
    job = make_job(
        tmp_path,
        {"name": "gen", "task": "t2i", "input": {"rows": [{"prompt": "p"}]}},
        {"name": "edit", "task": "image_edit", "input": {"from_step": "gen", "prompt": "Make it blue."}},
        {
            "name": "cap",
            "task": "x2t_image",
            "input": {"from_step": "edit", "prompt": "Was it {{ prompt }}?"},
        },
        {"name": "regen", "task": "t2i", "input": {"from_step": "cap", "columns": {"prompt": "text"}}},
        {"name": "bare", "task": "image_edit", "input": {"from_step": "gen"}},
        {
            "name": "reuse",
            "task": "image_edit",
            "input": {"from_step": "gen", "columns": {"prompt": "prompt", "seed": "seed"}},
        },
    )
    gen_out = job.step("gen").output_path(job)
    write_part(gen_out, [
        {"row_id": "r1", "step": "gen", "task": "t2i", "prompt": "a cat", "media_uri": "/m/r1.png", "seed": 11},
        {"row_id": "r2", "step": "gen", "task": "t2i", "prompt": "a dog", "error": "boom"},
    ])  # fmt: skip
    edit = rows_of(job, "edit")
    assert [(r["row_id"], r["image"], r["prompt"]) for r in edit] == [("r1", "/m/r1.png", "Make it blue.")]
    assert edit[0].get("seed_override") is None  # the upstream's seed is not this step's per-row seed
    bare = rows_of(job, "bare")  # nor is its prompt this step's instruction
    assert "needs an instruction: set input.prompt, or map a column" in bare[0]["error"]
    reuse = rows_of(job, "reuse")
    assert (reuse[0]["prompt"], reuse[0]["seed_override"], reuse[0].get("error")) == ("a cat", 11, None)

    edit_out = str(tmp_path / "elsewhere")  # `upstream` overrides the configured output path
    write_part(edit_out, [{"row_id": "r1", "step": "edit", "task": "image_edit", "prompt": "Make it blue.",
                           "image": "/m/r1.png", "media_uri": "/m/r1-edit.png"}])  # fmt: skip
    cap = rows_of(job, "cap", upstream={"edit": edit_out})
    assert [(r["row_id"], r["image"], r["prompt"]) for r in cap] == [
        ("r1", "/m/r1-edit.png", "Was it Make it blue.?")
    ]

    cap_out = job.step("cap").output_path(job)
    write_part(
        cap_out,
        [
            {
                "row_id": "r1",
                "step": "cap",
                "task": "x2t_image",
                "image": "/m/r1-edit.png",
                "text": "A blue cat.",
            }
        ],
    )
    regen = rows_of(job, "regen")
    assert [(r["row_id"], r["prompt"], r["image"]) for r in regen] == [
        ("r1", "A blue cat.", "/m/r1-edit.png")
    ]


def test_rows_stream_from_a_read_task_that_skips_committed_rows(tmp_path, ray_local, monkeypatch):
    import ray

    write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"prompt {i}", "seed": i} for i in range(600)] + [{"prompt": ""}]
    )
    job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": "p.jsonl"}})
    source = open_source(job.steps[0], job)
    assert source.estimate_rows() == tables.RowCount(601)  # a line count: exact, nothing parsed
    rows = list(source.iter_rows())
    done, failed = rows[0:600:3], rows[1]
    write_part(source.output_uri, [{"row_id": r["row_id"], "step": "g", "task": "t2i"} for r in done])
    write_part(source.output_uri, [{"row_id": failed["row_id"], "step": "g", "task": "t2i", "error": "boom"}])

    def projected(selected: list[dict]) -> list[dict]:
        return [{name: r.get(name) for name in SOURCE_SCHEMA.names} for r in selected]

    # The read task's body: blocks of READ_BLOCK_ROWS, committed rows (failed ones too) left out, a tally.
    events = str(tmp_path / "events")
    blocks = list(sources.read_step_rows(source, sinks.ParquetSink(source.output_uri, ""), retry_failed=False,
                                         events_uri=events))
    assert len(blocks) > 1 and all(b.num_rows <= sources.dataset.READ_BLOCK_ROWS for b in blocks)
    table = pa.concat_tables(blocks)
    assert table.schema.equals(SOURCE_SCHEMA)
    assert table.to_pylist() == projected([r for r in rows if r not in done and r is not failed])
    assert sources.read_tally(events, "g") == (601, 201)
    assert table.column("error").to_pylist()[-1] is not None  # the empty prompt travels as an error row

    # Through Ray, retrying failed rows: the input is read in the read task, never in the driver.
    def no_reading_here(*args, **kwargs):
        raise AssertionError("the driver read the input")

    monkeypatch.setattr(sources.step, "read_records", no_reading_here)
    dataset = sources.to_dataset(source, sinks.ParquetSink(source.output_uri, ""), retry_failed=True)
    streamed = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    assert streamed.to_pylist() == projected([r for r in rows if r not in done])
    assert sources.committed_count(sinks.ParquetSink(source.output_uri, ""), retry_failed=True) == len(done)  # in a Ray task


def test_s3_inputs(s3_server, tmp_path):
    bucket = f"src-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.filesystem_for(f"s3://{bucket}")
    fs.mkdir(bucket)
    fs.put(str(DATASETS / "images"), f"{bucket}/data/images", recursive=True)
    fs.put(str(DATASETS / "edits.jsonl"), f"{bucket}/data/edits.jsonl")

    job = make_job(
        tmp_path, {"name": "c", "task": "x2t_image", "input": {"path": f"s3://{bucket}/data/images"}}
    )
    rows = rows_of(job)
    names = sorted(p.name for p in (DATASETS / "images").iterdir())
    assert [r["image"] for r in rows] == [f"s3://{bucket}/data/images/{n}" for n in names]
    assert [r["row_id"] for r in rows] == [media_row_id(n) for n in names]  # same ids as a local copy
    np.testing.assert_array_equal(
        decode_image(rows[0]["image"]), decode_image(str(DATASETS / "images" / names[0]))
    )

    glob = make_job(
        tmp_path, {"name": "c", "task": "x2t_image", "input": {"path": f"s3://{bucket}/data/images/*.jpg"}}
    )
    assert [r["row_id"] for r in rows_of(glob)] == [media_row_id(n) for n in names if n.endswith(".jpg")]

    edits = make_job(
        tmp_path, {"name": "e", "task": "image_edit", "input": {"path": f"s3://{bucket}/data/edits.jsonl"}}
    )
    first = rows_of(edits)[0]
    assert first["row_id"] == content_id(json.loads((DATASETS / "edits.jsonl").read_text().splitlines()[0]))
    assert first["image"] == f"s3://{bucket}/data/images/sunset_320x240.jpg"
    assert decode_image(first["image"]).shape == (240, 320, 3)


def test_json_files_and_nested_column_paths(tmp_path):
    records = [
        {"additional_info": {"prompt": "make it blue"}, "interleave_array": ["x", "in0.png", "target0.png"]},
        {"additional_info": {"prompt": "make it red"}, "interleave_array": ["y", "in1.png", "target1.png"]},
        7,
    ]
    (tmp_path / "edits.json").write_text(json.dumps(records))
    columns = {"instruction": "additional_info.prompt", "image": "interleave_array[1]"}
    job = make_job(tmp_path, {"name": "e", "task": "image_edit", "input": {"path": "edits.json", "columns": columns}})
    rows = rows_of(job)
    assert [(r["prompt"], r["image"]) for r in rows[:2]] == [
        ("make it blue", str(tmp_path / "in0.png")), ("make it red", str(tmp_path / "in1.png"))]
    assert rows[2]["error"] == "item 2: not a JSON object" and rows[2]["row_id"] == content_id("7")

    keyed = {"0040": records[0], "../0041": records[1]}  # an object of records: the key is the row id
    (tmp_path / "keyed.data").write_text(json.dumps(keyed))
    job = make_job(tmp_path, {"name": "e", "task": "image_edit",
                              "input": {"path": "keyed.data", "format": "json", "columns": columns}})
    assert [r["row_id"] for r in rows_of(job)] == ["0040", storage.safe_token("../0041")]

    (tmp_path / "dotted.jsonl").write_text(json.dumps({"a.b": "the literal key", "a": {"b": "the path"}}) + "\n")
    job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": "dotted.jsonl", "columns": {"prompt": "a.b"}}})
    assert rows_of(job)[0]["prompt"] == "the literal key"  # a key that exists wins over the path

    (tmp_path / "scalar.json").write_text('{"prompt": "a record, not records"}')
    job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": "scalar.json"}})
    with pytest.raises(SourceError, match="expected an array of records, or an object whose values are all records"):
        rows_of(job)


def test_from_step_streams_parts_and_the_newest_version_decides(tmp_path):
    job = make_job(
        tmp_path,
        {"name": "gen", "task": "t2i", "input": {"rows": [{"prompt": "p"}]}},
        {"name": "cap", "task": "x2t_image", "input": {"from_step": "gen"}},
    )
    gen_out = job.step("gen").output_path(job)

    def part(*rows: tuple[str, str | None]) -> None:
        write_part(gen_out, [{"row_id": row_id, "step": "gen", "task": "t2i", "media_uri": f"/m/{row_id}.png",
                              "error": error} for row_id, error in rows])

    part(("r1", None), ("r2", "boom"), ("r3", None))
    part(("r2", None))  # retried: now fine
    part(("r3", "failed on a later try"))  # the newest version of r3 failed: it is not an input any more
    assert sorted(r["row_id"] for r in rows_of(job, "cap")) == ["r1", "r2"]
    source = open_source(job.step("cap"), job)
    before = source.fingerprint()
    part(("r4", None))
    assert source.fingerprint() != before  # new upstream parts: the step has work again


def test_large_remote_tables_are_counted_from_their_head(s3_server, tmp_path, monkeypatch):
    from lance_ray.pipeline.planner import format_plan, make_plan
    from lance_ray.pipeline.runner import count_step_rows

    bucket = f"count-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.filesystem_for(f"s3://{bucket}")
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/p.jsonl", "".join(json.dumps({"prompt": f"p{i:04d}"}) + "\n" for i in range(300)).encode())
    monkeypatch.setattr(tables, "_SMALL_REMOTE", 1000)  # larger remote tables are not read whole to count
    job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": f"s3://{bucket}/p.jsonl"}})
    counts = count_step_rows(job)
    assert counts == {"g": tables.RowCount(300, exact=False)}  # from the first MiB, labelled as estimated
    plan = format_plan(make_plan(job, 0, {"g": 300}, frozenset({"g"})))
    assert "rows    ~300" in plan
    assert open_source(job.steps[0], job).count() == 300



def test_cheap_counts_match_the_rows_read(tmp_path):
    (tmp_path / "p.jsonl").write_text('\n{"prompt": "a"}\n  \n\n{"prompt": "b"}\nnot json\n\t\n{"prompt": "c"}')
    (tmp_path / "plain.csv").write_text("prompt\na\n\nb\nc\n")
    (tmp_path / "quoted.csv").write_text('prompt,seed\n"two\nlines",1\nb,2\n')
    for name, rows in (("p.jsonl", 4), ("plain.csv", 3), ("quoted.csv", 2)):
        job = make_job(tmp_path, {"name": "g", "task": "t2i", "input": {"path": name}})
        source = open_source(job.steps[0], job)
        assert source.estimate_rows() == tables.RowCount(rows) and source.count() == rows, name
