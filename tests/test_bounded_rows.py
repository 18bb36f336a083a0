"""One bad row costs one row: templates that raise, hang or flood, seeds out of range, prompts over the task's
cap, media that are devices — each becomes that row's `error` while the job goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lance_ray.io import tables
from lance_ray.models.lance import TASKS
from lance_ray.pipeline.runner import run_job
from lance_ray.pipeline.sinks import read_step_output
from lance_ray.pipeline.sources import open_source
from lance_ray.spec import Job, load_job_text, templates

DATASETS = Path(__file__).resolve().parent.parent / "datasets"
CAP = TASKS["t2i"].max_prompt_chars
TEMPLATE = "{{ subject }} {{ (1 / n) | round }} {{ range(k) | length }} {{ word * times }}"
ROWS = [
    {"case": "ok", "subject": "a cat", "n": 1, "k": 3, "word": "x", "times": 2},
    {"case": "zero_division", "subject": "a dog", "n": 0, "k": 3, "word": "x", "times": 2},
    {"case": "huge_range", "subject": "a fox", "n": 1, "k": 10**9, "word": "x", "times": 2},
    {"case": "huge_string", "subject": "a cow", "n": 1, "k": 3, "word": "x", "times": 10**8},
    {"case": "too_long", "subject": "an owl", "n": 1, "k": 3, "word": "y" * 5000, "times": 2},
    {"case": "seed_too_big", "subject": "a bee", "n": 1, "k": 3, "word": "x", "times": 2, "seed": 2**64},
]


def test_bad_rows_become_error_rows_and_the_run_goes_on(tmp_path: Path, ray_local: None) -> None:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    job = load_job_text(f"""\
name: bounded
models: {{image: {{source: lance-tiny, backend: debug}}}}
output: {tmp_path / 'out'}
steps:
  - name: draw
    task: t2i
    input: {{path: rows.jsonl, prompt: "{TEMPLATE}"}}
    params: {{height: 32, width: 32}}
  - name: look
    task: x2t_image
    input:
      rows:
        - {{image: {DATASETS / 'images' / 'tiles_256x256.png'}}}
        - {{image: /dev/zero}}
""", "bounded.yaml", tmp_path)
    summary = run_job(job, progress=False)
    assert {s.name: (s.rows, s.ok, s.failed) for s in summary.steps} == {"draw": (6, 1, 5), "look": (2, 1, 1)}

    drawn = {json.loads(r["input_row"])["case"]: r for r in read_step_output(str(tmp_path / "out" / "draw")).to_pylist()}
    assert drawn["ok"]["error"] is None and drawn["ok"]["prompt"] == "a cat 1.0 3 xx"
    assert drawn["zero_division"]["error"] == "prompt template: ZeroDivisionError: division by zero"
    assert "Range too big" in drawn["huge_range"]["error"]  # refused before the range is built
    assert "builds more than 1,000,000 characters or items" in drawn["huge_string"]["error"]  # before it allocates
    long_prompt = "an owl 1.0 3 " + "y" * 10_000
    assert drawn["too_long"]["error"] == f"prompt is {len(long_prompt)} characters; task t2i takes at most {CAP}"
    assert drawn["seed_too_big"]["error"] == "seed 18446744073709551616 is out of range (0 ≤ seed < 2^63)"

    looked = {r["image"]: r["error"] for r in read_step_output(str(tmp_path / "out" / "look")).to_pylist()}
    assert looked[str(DATASETS / "images" / "tiles_256x256.png")] is None
    assert "not a regular file" in looked["/dev/zero"]  # reading it would never end


def test_a_runaway_template_costs_its_row_only(tmp_path: Path) -> None:
    """10^10 loop steps in one row's prompt: the step budget stops it (the clock is tested in test_spec)."""
    spin = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"
    job = Job.model_validate({"name": "t", "output": str(tmp_path), "steps": [{
        "name": "g", "task": "t2i",
        "input": {"rows": [{"x": "spin"}, {"x": "fine"}], "prompt": f"{{% if x == 'spin' %}}{spin}{{% endif %}}{{{{ x }}}}"},
    }]})
    rows = list(open_source(job.steps[0], job).iter_rows())
    assert rows[0]["error"] == f"prompt template: the template takes more than {templates.MAX_RENDER_STEPS:,} steps"
    assert rows[1]["error"] is None and rows[1]["prompt"] == "fine"


def test_overlong_and_unreadable_lines_are_row_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables, "MAX_LINE_BYTES", 100)
    long_line = json.dumps({"prompt": "z" * 200})
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "first"}\n' + long_line.encode() + b'\n\xff\xfe\n{"prompt": "last"}\n')
    job = Job.model_validate({"name": "t", "output": str(tmp_path / "out"),
                              "steps": [{"name": "g", "task": "t2i", "input": {"path": str(tmp_path / "p.jsonl")}}]})
    rows = list(open_source(job.steps[0], job).iter_rows())
    assert [r["prompt"] for r in rows] == ["first", None, None, "last"]
    assert rows[1]["error"] == "line 2: longer than 100 bytes"
    assert rows[2]["error"].startswith("line 3: invalid JSON")
