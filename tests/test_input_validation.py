"""Inputs are checked before any model work: `validate`, `plan` and `run` read each local table's schema and
a sample of its rows and report mapping mistakes as `file:line:col` at the job's `input` / `columns`
entry, exit 2, nothing started."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lance_ray.cli import main
from lance_ray.pipeline import runner
from lance_ray.spec import JobSpecError, load_job, loader

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "suites" / "benchmarks"


def problems(job: Path) -> list[str]:
    with pytest.raises(JobSpecError) as info:
        load_job(job, check_paths=True)
    return [str(p) for p in info.value.problems]


def test_mapping_mistakes_are_reported_at_the_input_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "captions.jsonl").write_text(json.dumps({"id": "a", "picture": "img/a.png", "text": "x"}) + "\n")
    shutil.copy(FIXTURES / "image_gen/DPG/DPG.jsonl", tmp_path / "dpg.jsonl")
    shutil.copy(FIXTURES / "image_gen/GEdit/GEdit_en.json", tmp_path / "gedit.json")  # its images stay behind
    job = tmp_path / "job.yaml"
    job.write_text("""\
name: mistakes
steps:
  - name: unmapped_prompt
    task: t2i
    input: {path: dpg.jsonl}
  - name: mapped_column_missing
    task: image_edit
    input:
      path: gedit.json
      columns: {instruction: "interleave_array[0]", image: "interleave_array[5]"}
  - name: media_not_found
    task: image_edit
    input:
      path: gedit.json
      columns: {instruction: "interleave_array[0]", image: "interleave_array[1]"}
  - name: unmapped_image
    task: x2t_image
    input: {path: captions.jsonl}
  - name: template_column
    task: t2i
    input: {path: dpg.jsonl, prompt: "{{ subject }} at {{ data }}"}
  - name: suite_wrong_file
    task: t2i
    input: {suite: dpg, path: gedit.json}
  - name: fine
    task: t2i
    input: {path: dpg.jsonl, columns: {prompt: data, row_id: index}}
""")
    found = problems(job)
    expected = [
        ("5:12:", "steps[0].input: task t2i needs a prompt: dpg.jsonl has no column 'prompt' / 'instruction' / "
                  "'question' (its columns: data, index); map one with columns.prompt, or set input.prompt"),
        ("10:60:", "steps[1].input.columns.image: column 'interleave_array[5]' is not in gedit.json (its columns: "
                   "additional_info, element_dtype_array, interleave_array, istarget_in_interleave)"),
        ("15:60:", "steps[2].input.columns.image: none of the 2 image paths read from gedit.json exists (first: "
                   f"{tmp_path / 'benchmarks/image_gen/GEdit/images/0040_input_image.png'}); relative "
                   "paths are relative to the table's folder, or to input.media_root"),
        ("18:12:", "steps[3].input: task x2t_image needs an image: captions.jsonl has no column 'image' (its "
                   "columns: id, picture, text); map it with columns.image"),
        ("21:38:", "steps[4].input.prompt: the prompt template reads 'subject', which dpg.jsonl does not have "
                   "(its columns: data, index)"),
        ("24:20:", "steps[5].input.suite: suite dpg reads the prompt from column 'data' / 'prompt' / 'text', which "
                   "gedit.json does not have"),
    ]
    assert len(found) == len(expected), found
    for line, (where, message) in zip(found, expected, strict=True):
        assert line.startswith(f"{job}:{where} {message}"), line

    # validate, plan and run say the same and stop there: run never reaches Ray
    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for a bad job file")

    monkeypatch.setattr(runner, "init_ray", no_ray)
    for command in ("validate", "plan", "run"):
        assert main([command, str(job)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == found


def test_repeated_ids_and_bad_inline_values(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": i % 3, "prompt": f"p{i}"}) + "\n" for i in range(5)))
    job = tmp_path / "job.yaml"
    job.write_text(f"""\
name: values
steps:
  - name: ids
    task: t2i
    input: {{path: p.jsonl, columns: {{row_id: id}}}}
  - name: inline
    task: t2i
    input:
      rows:
        - {{prompt: fine, seed: 3}}
        - {{prompt: too big, seed: {2**63}}}
        - {{prompt: negative, seed: -1}}
        - {{prompt: text, seed: "seven"}}
  - name: long_turn
    task: image_edit
    input: {{rows: [{{image: {FIXTURES / 'image_gen/GEdit/images/0040_input_image.png'}}}]}}
    turns: ["{'x' * 9000}"]
""")
    found = problems(job)
    assert [p.split(": ", 1)[0].removeprefix(f"{job}:") for p in found] == ["5:46", "11:11", "12:11", "13:11", "17:13"]
    assert "steps[0].input.columns.row_id: row ids must be unique, but p.jsonl repeats 2 of them in column 'id' " \
           "(first: '0')" in found[0]
    assert "row 1: seed 9223372036854775808 is out of range (0 ≤ seed < 2^63)" in found[1]
    assert "row 2: seed -1 is out of range" in found[2] and "row 3: seed 'seven' is not an integer" in found[3]
    assert "steps[2].turns[0]: this instruction is 9000 characters; task image_edit takes at most 8192" in found[4]


def test_inputs_must_be_regular_files(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    job = tmp_path / "job.yaml"
    job.write_text("name: devices\nsteps:\n"
                   "  - {name: zero, task: t2i, input: {path: /dev/zero, format: jsonl}}\n"
                   f"  - {{name: fifo, task: t2i, input: {{path: {fifo}}}}}\n")
    found = problems(job)
    assert len(found) == 2
    assert all("not a regular file (a device, FIFO or socket?); inputs must be regular files" in p for p in found)
    assert found[0].startswith(f"{job}:3:43: steps[0].input.path: /dev/zero: not a regular file")


def test_large_tables_are_judged_by_their_first_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"text": f"t{i}"} for i in range(5)] + [{"prompt": "a prompt at last"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = tmp_path / "job.yaml"
    job.write_text("name: sample\nsteps:\n  - {name: g, task: t2i, input: {path: p.jsonl}}\n")
    assert load_job(job, check_paths=True)  # read whole: some row has a prompt column, the others are row errors
    monkeypatch.setattr(loader, "_FULL_READ_BYTES", 10)
    monkeypatch.setattr(loader, "_SAMPLE_ROWS", 5)
    assert "needs a prompt: p.jsonl has no column 'prompt'" in problems(job)[0]  # its first 5 rows have none
