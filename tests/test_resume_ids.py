"""Resume keys rows by content, never by position: rows inserted or reordered between two real runs are each
done exactly once; identical rows get distinct, stable ids; outputs written with the old positional ids
are not redone; a run with nothing left to do finishes without starting Ray."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lance_ray.errors import RunError
from lance_ray.pipeline import runner
from lance_ray.pipeline.runner import run_job
from lance_ray.pipeline.sinks import read_manifest, read_step_output, write_part
from lance_ray.pipeline.sources import open_source
from lance_ray.spec import load_job_text


def caption_job(tmp_path: Path, **input_fields: object):
    fields = ", ".join(f"{k}: {json.dumps(v)}" for k, v in {"path": "prompts.jsonl", **input_fields}.items())
    return load_job_text(f"""\
name: resume
models: {{image: {{source: lance-tiny, backend: debug}}}}
output: {tmp_path / 'out'}
steps:
  - name: draw
    task: t2i
    input: {{{fields}}}
    params: {{height: 16, width: 16}}
""", "resume.yaml", tmp_path)


def write_prompts(tmp_path: Path, prompts: list[str]) -> None:
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def committed_prompts(tmp_path: Path) -> Counter:
    return Counter(r["prompt"] for r in read_step_output(str(tmp_path / "out" / "draw")).to_pylist())


def test_inserted_reordered_and_repeated_rows_are_done_exactly_once(tmp_path: Path, ray_local: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = ["a lighthouse", "a red kite", "a red kite", "a teapot", "a glacier"]
    write_prompts(tmp_path, first)
    summary = run_job(caption_job(tmp_path), progress=False)
    assert [(s.rows, s.ok, s.skipped) for s in summary.steps] == [(5, 5, 0)]
    ids = [r["row_id"] for r in open_source(caption_job(tmp_path).steps[0], caption_job(tmp_path)).iter_rows()]
    assert ids[2] == ids[1] + "-1" and len(set(ids)) == 5  # the repeated row: same digest, next occurrence

    # Insert rows in the middle, reorder the rest, add another copy of the repeated row.
    second = ["a glacier", "a red kite", "a moth", "a teapot", "a red kite", "a lighthouse", "a red kite", "a dune"]
    write_prompts(tmp_path, second)
    summary = run_job(caption_job(tmp_path), progress=False)
    assert [(s.rows, s.ok, s.failed, s.skipped) for s in summary.steps] == [(8, 3, 0, 5)]
    assert committed_prompts(tmp_path) == Counter(second)  # every row once: none skipped, none done twice

    # Nothing left: the third run neither starts Ray nor reads a row, and says so in its summary.
    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray started for a run with nothing to do")

    monkeypatch.setattr(runner, "init_ray", no_ray)
    summary = run_job(caption_job(tmp_path), progress=False)
    assert [(s.rows, s.ok, s.skipped) for s in summary.steps] == [(8, 0, 8)]
    assert read_manifest(str(tmp_path / "out" / "draw"))["rows"] == 8

    # A changed input (or --retry-failed with failed rows, or --overwrite) is work again: Ray is needed.
    write_prompts(tmp_path, [*second, "a new row"])
    with pytest.raises(AssertionError, match="Ray started"):
        run_job(caption_job(tmp_path), progress=False)
    assert runner.completed_run(caption_job(tmp_path)) is None


def test_outputs_with_positional_ids_are_not_redone(tmp_path: Path, ray_local: None) -> None:
    """lance-ray 0.1 named a table row `<table>-<index>`; a re-run over such an output skips those rows."""
    write_prompts(tmp_path, ["one", "two", "three"])
    output = str(tmp_path / "out" / "draw")
    write_part(output, [{"row_id": f"prompts-{i}", "step": "draw", "task": "t2i", "prompt": p}
                        for i, p in enumerate(["one", "two"])])
    summary = run_job(caption_job(tmp_path), progress=False)
    assert [(s.rows, s.ok, s.skipped) for s in summary.steps] == [(3, 1, 2)]
    assert committed_prompts(tmp_path) == Counter(["one", "two", "three"])


def test_samples_per_prompt_ids_and_seeds(tmp_path: Path) -> None:
    write_prompts(tmp_path, ["a", "b"])
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "seed": 100}\n')
    job = caption_job(tmp_path, samples_per_prompt=3)
    rows = list(open_source(job.steps[0], job).iter_rows())
    base = [r["row_id"].rsplit("-", 1)[0] for r in rows]
    assert [r["row_id"] for r in rows] == [f"{b}-{n}" for b in dict.fromkeys(base) for n in range(3)]
    assert [r["seed_override"] for r in rows] == [42, 43, 44, 100, 101, 102]  # seed + n (step seed 42, row's 100)


def test_an_id_repeated_in_a_large_input_stops_the_run_with_its_name(tmp_path: Path, ray_local: None) -> None:
    """Validation catches repeated ids in the rows it reads; past those, the read task does, and the run
    fails with the id (exit 3), not with a Ray traceback."""
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": i if i != 15 else 3, "prompt": f"p{i}"}) + "\n" for i in range(20)))
    with pytest.raises(RunError) as info:
        run_job(caption_job(tmp_path, columns={"row_id": "id"}), progress=False)
    assert str(info.value) == ("step draw: duplicate row_id '3' (input row 15); ids must be unique within a step: "
                               "fix the id column or map another one (rows committed before it are kept)")
