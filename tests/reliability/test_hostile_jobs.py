"""Hostile job files through `lance-ray validate`: each gets `file:line:col: message` lines and exit 2,
never a traceback, and costs milliseconds (an alias bomb is refused without being expanded)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hostile_jobs import CASES, JobCase

from lance_ray.cli import main
from lance_ray.spec import JobSpecError, load_job, yaml_positions
from lance_ray.spec.yaml_positions import load_yaml

BAD_JOBS = sorted((Path(__file__).parents[1] / "bad_jobs").glob("*.yaml"))


def test_there_are_at_least_40_hostile_job_files() -> None:
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


def _validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clear_refusal(path: Path, code: int, out: str, err: str) -> None:
    assert code == 2, (code, out, err)
    assert out == "" and err.endswith("\n") and "Traceback" not in err
    for line in err.splitlines():
        assert re.match(rf"^{re.escape(str(path))}:\d+:\d+: \S", line), line


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_job_file_is_refused_clearly(case: JobCase, tmp_path: Path, capsys) -> None:
    path = case.write(tmp_path)
    code, out, err = _validate(path, capsys)
    _assert_clear_refusal(path, code, out, err)
    assert case.problem in err, err


@pytest.mark.parametrize("path", BAD_JOBS, ids=lambda p: p.stem)
def test_every_bad_job_file_is_refused_clearly(path: Path, capsys) -> None:
    _assert_clear_refusal(path, *_validate(path, capsys))


def test_an_alias_bomb_is_refused_without_expanding_it(monkeypatch) -> None:
    built = []
    original = yaml_positions._Builder.build
    monkeypatch.setattr(yaml_positions._Builder, "build", lambda self, *a: built.append(1) or original(self, *a))
    bomb = next(c for c in CASES if c.name == "billion_laughs").content.decode()
    loaded = load_yaml(bomb, {})
    assert loaded.data is None and built == []
    ((mark, message),) = loaded.problems
    assert "aliases would expand this document by" in message and mark.line == 8  # the anchor repeated most


def test_a_file_just_under_the_alias_limit_still_loads() -> None:
    # 9 rows aliased 9 times: legitimate sharing stays allowed.
    text = "name: x\nr: &r [" + ", ".join(["{prompt: p}"] * 9) + "]\nrr: &rr [" + ", ".join(["*r"] * 9) + "]\n"
    loaded = load_yaml(text + "steps: []\n", {})
    assert loaded.problems == [] and len(loaded.data["rr"]) == 9


def test_template_failing_at_render_time_is_a_row_error_for_plan(tmp_path: Path, capsys) -> None:
    """`plan` counts rows by rendering their prompts: a template that fails for one row (here a division
    by a column that is 0) must cost that row, not the command."""
    path = tmp_path / "render.yaml"
    path.write_text(
        "name: render\nmodels: {image: {source: lance-tiny, backend: debug}}\nsteps:\n"
        "  - name: s\n    task: t2i\n    input:\n      rows: [{n: 1}, {n: 0}, {n: 2}]\n"
        "      prompt: \"one in {{ 10 // n }}\"\n"
    )
    assert main(["plan", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert re.search(r"\bs\b.*\b3\b", out), out  # all three rows are planned

    from lance_ray.pipeline.sources import open_source

    job = load_job(path)
    rows = list(open_source(job.steps[0], job).iter_rows())
    assert [r.get("prompt") for r in rows] == ["one in 10", None, "one in 5"]
    assert "ZeroDivisionError" in rows[1]["error"] and rows[0].get("error") is None


def test_load_job_raises_only_the_spec_error(tmp_path: Path) -> None:
    """The Python API gives the same refusals as one exception type."""
    for case in CASES:
        folder = tmp_path / case.name
        folder.mkdir()
        with pytest.raises(JobSpecError):
            load_job(case.write(folder), env={})
