"""Job spec: loading, validation errors with positions, defaults, paths, schema and docs."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from lance_ray import spec
from lance_ray.models.lance.presets import PRESETS
from lance_ray.spec import (
    DEFAULT_MODEL_SOURCE,
    TASKS,
    Job,
    JobSpecError,
    SpecProblem,
    compile_prompt_template,
    load_job,
    load_job_text,
    prompt_template_columns,
)
from lance_ray.spec.schema import job_json_schema

REPO = Path(__file__).resolve().parents[1]
BAD_JOBS = sorted((Path(__file__).parent / "bad_jobs").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (\d+):(\d+): (.+)$", re.M)


def load(text: str, base_dir: Path | str = "/jobs", env: dict[str, str] | None = None) -> Job:
    return load_job_text(text, "job.yaml", base_dir, env or {})


def problems_of(text: str, env: dict[str, str] | None = None) -> list[SpecProblem]:
    with pytest.raises(JobSpecError) as info:
        load(text, env=env)
    return info.value.problems


# --------------------------------------------------------------------------------------------
# Bad job files: each ends with `# expect: LINE:COL: message fragment` lines, one per problem.


def test_there_are_enough_bad_job_files() -> None:
    assert len(BAD_JOBS) >= 20


@pytest.mark.parametrize("path", BAD_JOBS, ids=lambda p: p.stem)
def test_bad_job_file(path: Path) -> None:
    expected = [(int(line), int(col), fragment) for line, col, fragment in EXPECT.findall(path.read_text())]
    assert expected, f"{path.name} declares no expected problems"
    with pytest.raises(JobSpecError) as info:
        load_job(path, env={})
    got = info.value.problems
    assert len(got) == len(expected), str(info.value)
    for problem, (line, col, fragment) in zip(got, expected, strict=True):
        assert (problem.line, problem.col) == (line, col), str(info.value)
        assert fragment in problem.message, str(info.value)
        assert str(problem) == f"{path}:{line}:{col}: {problem.message}"
    assert str(info.value).splitlines() == [str(p) for p in got]


def test_problems_are_sorted_and_all_reported() -> None:
    text = "name: x\nsteps:\n  - name: b\n    task: t2i\n    input: {rows: [{prompt: p}]}\n    params: {frames: 3}\n"
    text += (
        "  - name: c\n    task: t2v\n    input: {rows: [{prompt: p}]}\n    params: {steps: 0, height: 8}\n"
    )
    got = problems_of(text)
    assert [(p.line, p.col) for p in got] == sorted((p.line, p.col) for p in got)
    assert [p.message.split(":")[0] for p in got] == [
        "steps[0].params.frames",
        "steps[1].params.steps",
        "steps[1].params.height",
    ]


def test_step_with_a_bad_value_still_gets_cross_field_checks() -> None:
    # `height` is rejected by pydantic; the irrelevant `frames` and the row without a prompt are
    # still found, but nothing is invented about the dropped value.
    text = """\
name: x
steps:
  - name: a
    task: t2i
    input: {rows: [{prompt: p}, {title: q}]}
    params: {height: 8, frames: 5}
"""
    messages = [p.message for p in problems_of(text)]
    assert len(messages) == 3
    assert any("row 1 has no" in m for m in messages)
    assert any("'frames' does not apply" in m for m in messages)
    assert any("greater than or equal to 16" in m for m in messages)


def test_cannot_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError) as info:
        load_job(tmp_path / "nope.yaml")
    assert info.value.problems[0].line == 1
    assert "cannot read job file" in str(info.value)


def test_python_construction_runs_the_same_cross_checks() -> None:
    raw = {
        "name": "x",
        "steps": [
            {"name": "a", "task": "t2i", "input": {"rows": [{"prompt": "p"}]}, "params": {"frames": 4}}
        ],
    }
    with pytest.raises(ValidationError, match="'frames' does not apply to task t2i"):
        Job.model_validate(raw)
    raw["steps"][0]["params"] = {}
    assert Job.model_validate(raw).steps[0].task == "t2i"


# --------------------------------------------------------------------------------------------
# Inputs


def step_input(job: Job) -> spec.InputSpec:
    return job.steps[0].input


def one_step(task: str, input_yaml: str, extra: str = "") -> str:
    return f"name: j\nsteps:\n  - name: s\n    task: {task}\n    input: {input_yaml}\n{extra}"


def test_inline_rows() -> None:
    job = load(one_step("t2i", "{rows: [{prompt: a}, {prompt: b, seed: 3}]}"))
    inp = step_input(job)
    assert inp.kind == "rows"
    assert inp.rows == [{"prompt": "a"}, {"prompt": "b", "seed": 3}]


@pytest.mark.parametrize(
    ("written", "resolved"),
    [
        ("prompts.jsonl", ["/jobs/prompts.jsonl"]),
        ("../data/*.csv", ["/data/*.csv"]),
        ("./images/", ["/jobs/images"]),
        ("/abs/table.parquet", ["/abs/table.parquet"]),
        ("s3://bucket/prefix/", ["s3://bucket/prefix/"]),
        (
            "[a.jsonl, s3://b/c.parquet, 'gs://d/*.png']",
            ["/jobs/a.jsonl", "s3://b/c.parquet", "gs://d/*.png"],
        ),
    ],
)
def test_input_paths_are_lists_resolved_against_the_job_file(written: str, resolved: list[str]) -> None:
    job = load(one_step("x2t_image", f"{{path: {written}}}"))
    assert step_input(job).kind == "path"
    assert step_input(job).path == resolved


def test_home_directory_is_expanded() -> None:
    job = load(one_step("x2t_image", "{path: ~/images, format: images}"))
    assert step_input(job).path == [os.path.join(os.path.expanduser("~"), "images")]


def test_media_folder_and_from_step_inputs() -> None:
    text = """\
name: j
steps:
  - name: caption
    task: x2t_video
    input: {path: clips/, format: videos, limit: 5, prompt: "What happens?"}
  - name: edit
    task: video_edit
    input: {from_step: caption, prompt: "make it night"}
"""
    job = load(text)
    assert job.step("caption").input.format == "videos"
    assert job.step("caption").input.limit == 5
    assert job.step("edit").input.kind == "from_step"
    assert job.step("edit").input.from_step == "caption"


def test_column_mapping_satisfies_task_requirements() -> None:
    text = one_step(
        "i2v", "{path: t.csv, columns: {image: first_frame, prompt: caption, row_id: id, seed: s}}"
    )
    columns = step_input(load(text)).columns
    assert (columns.image, columns.prompt, columns.row_id, columns.seed) == (
        "first_frame",
        "caption",
        "id",
        "s",
    )
    assert columns.prompt_column() == "caption"


def test_x2t_question_is_optional_and_edits_may_use_turns() -> None:
    load(one_step("x2t_image", "{rows: [{image: a.png}]}"))
    job = load(one_step("image_edit", "{rows: [{image: a.png}]}", "    turns: [blue, red]\n"))
    assert job.steps[0].turns == ["blue", "red"]


def test_turns_conflict_with_a_prompt_source() -> None:
    (problem,) = problems_of(
        one_step("image_edit", "{rows: [{image: a.png}], prompt: x}", "    turns: [blue]\n")
    )
    assert "'turns' gives the instructions" in problem.message


def test_only_one_prompt_column_may_be_mapped() -> None:
    (problem,) = problems_of(one_step("image_edit", "{path: t.csv, columns: {prompt: a, instruction: b}}"))
    assert "map only one of" in problem.message
    assert (problem.line, problem.col) == (5, 47)


# --------------------------------------------------------------------------------------------
# Environment interpolation


def test_env_interpolation_types_and_defaults() -> None:
    text = """\
name: ${JOB_NAME}
output: "${ROOT:-/tmp/out}/${JOB_NAME}"
steps:
  - name: s
    task: t2i
    input: {path: "${DATA}/p.jsonl"}
    params:
      steps: ${STEPS}
      seed: ${SEED:-7}
      cfg_scale: ${CFG:-4.5}
"""
    job = load(text, env={"JOB_NAME": "nightly", "DATA": "s3://b/d", "STEPS": "12", "CFG": ""})
    assert job.name == "nightly"
    assert job.output == "/tmp/out/nightly"
    assert job.steps[0].input.path == ["s3://b/d/p.jsonl"]
    params = job.steps[0].params
    assert (params.steps, params.seed, params.cfg_scale) == (12, 7, 4.5)  # empty CFG takes the default


def test_quoted_env_reference_stays_a_string() -> None:
    text = one_step("t2i", "{rows: [{prompt: a}]}", '    params: {steps: "${STEPS}"}\n')
    (problem,) = problems_of(text, env={"STEPS": "12"})
    assert problem.message.endswith("expected an integer (got '12')")


def test_dollar_escape_and_os_environ_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANCE_SPEC_TEST_ROOT", "/from/environ")
    text = 'name: j\noutput: "${LANCE_SPEC_TEST_ROOT}/out"\n'
    text += "steps:\n  - {name: s, task: t2i, input: {rows: [{x: 1}], prompt: 'costs $$5 or $${PRICE}'}}\n"
    job = load_job_text(text, "job.yaml", "/jobs")  # env=None reads os.environ
    assert job.output == "/from/environ/out"
    assert job.steps[0].input.prompt == "costs $5 or ${PRICE}"


# --------------------------------------------------------------------------------------------
# Models, params and output paths


def test_model_refs_defaults_and_kinds(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    text = """\
name: j
models:
  image: {source: ./ckpt, precision: float32, device: cpu}
  video: lance-tiny
steps:
  - {name: s, task: t2i, input: {rows: [{prompt: a}]}}
"""
    job = load(text, base_dir=tmp_path)
    image, video = job.model_for("image"), job.model_for("video")
    assert (image.kind, image.source, image.precision, image.device) == (
        "local",
        str(tmp_path / "ckpt"),
        "float32",
        "cpu",
    )
    assert (video.kind, video.source, video.precision, video.backend) == (
        "tiny",
        "lance-tiny",
        "bfloat16",
        "lance",
    )
    default = load(one_step("t2i", "{rows: [{prompt: a}]}")).model_for("video")
    assert (default.kind, default.source) == ("hub", DEFAULT_MODEL_SOURCE)
    with pytest.raises(KeyError):
        job.model_for("audio")


@pytest.mark.parametrize(
    ("source", "kind", "resolved"),
    [
        ("bytedance-research/Lance", "hub", "bytedance-research/Lance"),
        ("s3://bucket/lance", "uri", "s3://bucket/lance"),
        ("lance-tiny", "tiny", "lance-tiny"),
        ("checkpoints/lance/v1", "local", "/jobs/checkpoints/lance/v1"),
        ("../lance", "local", "/lance"),
        ("/models/lance", "local", "/models/lance"),
    ],
)
def test_model_source_kinds(source: str, kind: str, resolved: str) -> None:
    job = load(
        f"name: j\nmodels: {{image: {{source: {source}}}}}\n"
        + "steps:\n  - {name: s, task: t2i, input: {rows: [{prompt: a}]}}\n"
    )
    assert (job.models.image.kind, job.models.image.source) == (kind, resolved)


def test_task_registry_agrees_with_presets() -> None:
    assert sorted(t.family for t in TASKS.values()) == ["image"] * 3 + ["video"] * 4
    for task in TASKS.values():
        assert PRESETS[task.defaults["preset"]].family == task.family
        assert task.output != "text" or not task.prompt_required  # a caption needs no question
    assert {p.family for p in PRESETS.values()} == {"image", "video"}


def test_params_for_applies_reference_defaults_per_task() -> None:
    tasks_yaml = "\n".join(
        f"  - {{name: {task.replace('_', '-')}, task: {task}, input: {{rows: [{{prompt: a, image: i.png, video: v.mp4}}]}}}}"
        for task in TASKS
    )
    job = load(f"name: j\nsteps:\n{tasks_yaml}\n")
    got = {s.task: s.params_for(job).model_dump(exclude_none=True) for s in job.steps}
    denoise = {"steps": 30, "shift": 3.5, "cfg_scale": 4.0, "cfg_interval": [0.4, 1.0], "cfg_renorm_min": 0.0,
               "fp8": False, "step_cache": 0.0, "cfg_parallel": False}  # speed modes: off
    seeding = {"seed": 42, "seed_mode": "per_row"}
    decode = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0}
    assert got["t2i"] == {**denoise, **seeding, "preset": "image_768res", "height": 768, "width": 768}
    assert got["t2v"] == {
        **denoise, **seeding, "preset": "video_480p", "height": 480, "width": 848, "frames": 49, "fps": 12,
    }  # fmt: skip
    assert got["i2v"] == {**denoise, **seeding, "preset": "video_480p", "frames": 49, "fps": 12}
    assert got["image_edit"] == {**denoise, **seeding, "preset": "image_768res"}
    assert got["video_edit"] == {**denoise, **seeding, "preset": "video_480p", "fps": 12}
    assert got["x2t_image"] == {**decode, **seeding, "preset": "image_768res"}
    assert got["x2t_video"] == {**decode, **seeding, "preset": "video_480p"}


def test_params_merge_step_over_defaults_over_task() -> None:
    text = """\
name: j
defaults: {seed: 5, steps: 12, frames: 17, max_new_tokens: 99, preset: video_360p}
steps:
  - name: clip
    task: t2v
    input: {rows: [{prompt: a}]}
    params: {steps: 20, width: 640}
  - name: caption
    task: x2t_video
    input: {from_step: clip}
"""
    job = load(text)
    clip = job.step("clip").params_for(job)
    assert (clip.seed, clip.steps, clip.frames, clip.preset) == (5, 20, 17, "video_360p")
    assert (clip.height, clip.width) == (352, 640)  # height from the inherited preset, width from the step
    assert clip.max_new_tokens is None  # a default the task does not use is not applied
    caption = job.step("caption").params_for(job)
    assert (caption.max_new_tokens, caption.seed, caption.steps, caption.frames) == (99, 5, None, None)


def test_output_paths_and_run_context() -> None:
    text = """\
name: nightly
output: out/{run_date}
steps:
  - {name: a, task: t2i, input: {rows: [{prompt: x}]}}
  - {name: b, task: t2i, input: {rows: [{prompt: x}]}, output: "s3://bkt/{run_id}/b"}
  - {name: c, task: t2v, input: {rows: [{prompt: x}]}, output: {path: ./c, video_codec: ffv1}}
"""
    job = load(text)
    assert job.step("a").output_path(job) == "/jobs/out/{run_date}/a"
    assert job.step("c").output_path(job) == "/jobs/c"
    assert job.step("c").output.video_codec == "ffv1"
    run = job.with_run_context(run_date="2026-11-22", run_id="r7")
    assert run.step("a").output_path(run) == "/jobs/out/2026-11-22/a"
    assert run.step("b").output_path(run) == "s3://bkt/r7/b"
    assert job.output == "/jobs/out/{run_date}"  # the original is unchanged


def test_default_output_root_and_uri_join(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(one_step("t2i", "{rows: [{prompt: a}]}"))
    job = load_job(path)
    assert job.source_path == str(path)
    assert job.output == str(tmp_path / "outputs" / "j")
    assert job.with_run_context("d", "r").source_path == str(path)
    assert load(one_step("t2i", "{rows: [{prompt: a}]}")).source_path is None
    remote = load(
        "name: j\noutput: s3://b/root\n" + one_step("t2i", "{rows: [{prompt: a}]}").split("\n", 1)[1]
    )
    assert remote.steps[0].output_path(remote) == "s3://b/root/s"


def test_step_lookup_and_schedule() -> None:
    text = "name: j\nschedule: {cron: '*/15 2-4 * * 1-5', timezone: Asia/Tokyo}\nray: {address: auto}\n"
    text += "steps:\n  - {name: s, task: t2i, input: {rows: [{prompt: a}]}, resources: {gpus: 2, batch_size: 4}}\n"
    job = load(text)
    assert job.step("s").family == "image"
    assert (job.step("s").resources.gpus, job.step("s").resources.batch_size) == (2, 4)
    assert job.schedule is not None
    assert (job.schedule.cron, job.schedule.timezone) == ("*/15 2-4 * * 1-5", "Asia/Tokyo")
    assert (job.schedule.overlap, job.schedule.catch_up) == ("skip", "latest")
    assert job.ray.address == "auto"
    with pytest.raises(KeyError):
        job.step("missing")


# --------------------------------------------------------------------------------------------
# Prompt templates


def test_prompt_template_rendering_and_columns() -> None:
    text = "A {{ style | default('photo') }} of {{ subject }}{% if extra %}, {{ extra }}{% endif %}"
    assert prompt_template_columns(text) == {"style", "subject", "extra"}
    assert prompt_template_columns("a constant prompt") == set()
    template = compile_prompt_template(text)
    assert template.render(subject="a cat", extra="") == "A photo of a cat"
    with pytest.raises(jinja2.UndefinedError):
        compile_prompt_template("{{ subject }}").render()


def test_template_over_inline_rows_is_checked() -> None:
    ok = one_step("t2i", "{rows: [{subject: cat}], prompt: 'a {{ subject }}'}")
    assert load(ok).steps[0].input.prompt == "a {{ subject }}"


# --------------------------------------------------------------------------------------------
# Generated schema and the field reference


def test_committed_schema_and_tables_are_current() -> None:
    committed = json.loads((REPO / "specs" / "job.schema.json").read_text())
    assert committed == job_json_schema(), "regenerate: python -m lance_ray.spec.schema --write"
    out = subprocess.run([sys.executable, "-m", "lance_ray.spec.schema", "--check"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_schema_command_prints_the_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lance_ray.spec.schema", "--print"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert json.loads(out.stdout) == job_json_schema()


def readme_jobs() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", (REPO / "specs" / "README.md").read_text(), re.S)


def test_readme_examples_load_and_cover_every_task() -> None:
    blocks = readme_jobs()
    tasks = set()
    for i, block in enumerate(blocks):
        job = load_job_text(block, f"specs/README.md#example{i}", REPO / "specs", env={})
        tasks |= {s.task for s in job.steps}
        for step in job.steps:
            step.params_for(job)
        # the schema must accept what the loader accepts (no env references in typed fields here)
        jsonschema.validate(yaml.safe_load(block), job_json_schema())
    assert tasks == set(TASKS)
    assert len(blocks) >= 8


def test_readme_documents_every_field() -> None:
    readme = (REPO / "specs" / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", readme, re.M))
    models = [
        spec.Job,
        spec.ModelRef,
        spec.ModelsSpec,
        spec.Step,
        spec.InputSpec,
        spec.ColumnMap,
        spec.Params,
    ]
    models += [spec.OutputSpec, spec.Resources, spec.ScheduleSpec, spec.RaySpec]
    fields = {name for model in models for name in model.model_fields}
    assert fields - documented == set()
    assert set(TASKS) <= documented


# --------------------------------------------------------------------------------------------
# YAML features and process boundaries


def test_anchors_and_merge_keys_share_settings() -> None:
    text = """\
name: j
x-common: &common {steps: 12, seed: 3}
steps:
  - name: a
    task: t2i
    input: {rows: [{prompt: a}]}
    params:
      <<: *common
      seed: 4
"""
    with pytest.raises(JobSpecError) as info:
        load(text)  # `x-common` is not a job key ...
    assert [(p.line, p.col) for p in info.value.problems] == [(2, 1)]
    job = load(
        text.replace("x-common: &common {steps: 12, seed: 3}\n", "defaults: &common {steps: 12, seed: 3}\n")
    )
    params = job.steps[0].params  # ... but anchors and merges work, and a merged key may be overridden
    assert (params.steps, params.seed) == (12, 4)


def test_errors_and_jobs_survive_pickling(tmp_path: Path) -> None:
    err = JobSpecError([SpecProblem("j.yaml", 3, 5, "bad"), SpecProblem("j.yaml", 1, 2, "worse")])
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems
    assert str(again) == "j.yaml:1:2: worse\nj.yaml:3:5: bad"
    path = tmp_path / "job.yaml"
    path.write_text(one_step("t2i", "{rows: [{prompt: a}]}"))
    job = load_job(path)
    copy = pickle.loads(pickle.dumps(job))
    assert copy == job
    assert copy.source_path == str(path)


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_job_files_are_valid(path: Path) -> None:
    job = load_job(path)
    for step in job.steps:
        assert step.params_for(job).seed is not None


# --------------------------------------------------------------------------------------------
# Template limits: every failure is a jinja2.TemplateError for that row, raised before the cost


@pytest.mark.parametrize(("template", "message"), [
    ("{{ subject * 10**8 }}", "repeating a value 100,000,000 times"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "100,000 steps"),
    ("{% set s = 'x' * 99999 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "100,000 steps"),
    ("{{ 'x'|center(10**9) }}", "|center(1000000000)"),
    ("{{ 'x'.ljust(10**9) }}", "str.ljust(1000000000)"),
    ("{{ '{:>999999999}'.format(1) }}", "format widths"),
    ("{{ '{:{}}'.format(1, 10**9) }}", "format widths"),
    ("{{ '%999999999s' % 1 }}", "format widths"),
    ("{{ 2 ** (10 ** 8) }}", "bits"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{{ 10 ** 5000 }}", "Exceeds the limit (4300 digits)"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "grows past 1,000,000"),
    ("{% set ns = namespace(v=[1]) %}{% for i in range(60) %}{% set ns.v = [ns.v, ns.v] %}{% endfor %}{{ ns.v }}",
     "grows past 1,000,000"),
    ("{% set l = [1] %}{% for i in range(60) %}{{ l.extend(l) or '' }}{% endfor %}", "grows past 1,000,000"),
    ("{% set s = 'x' * 99999 %}{{ s.replace('', s) }}", "replace() would build"),
    ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}", "100,000 steps"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses too deeply"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
    ("{{ 'abc'.translate({97: 'x'}) }}", "not available"),
    ("{{ nope }}", "'nope' is undefined"),
])
def test_template_limits_fail_the_row_cleanly(template: str, message: str) -> None:
    with pytest.raises(jinja2.TemplateError) as error:
        compile_prompt_template(template).render(subject="a cat")
    assert message in str(error.value)


def test_bounded_templates_still_render_ordinary_prompts() -> None:
    template = compile_prompt_template(
        "{% for t in tags %}{{ t|upper }}{{ ', ' if not loop.last }}{% endfor %}: {{ '%s-%03d'|format(name, n) }}"
        " {{ (name ~ ' ') * 3 }}{{ 2 ** 64 }} {{ ' '.join(tags) }} {{ '{:>5}'.format(n) }}"
        " {{ 'order 1234567: %s'|format(name) }}"
    )
    rendered = template.render(tags=["a", "b"], name="x", n=7)
    assert rendered == "A, B: x-007 x x x 18446744073709551616 a b     7 order 1234567: x"


def test_the_render_deadline_is_a_limit_too(monkeypatch) -> None:
    from lance_ray.spec import templates

    monkeypatch.setattr(templates, "MAX_RENDER_SECONDS", -1.0)  # every step is past the deadline
    with pytest.raises(templates.TemplateLimitError, match="longer than -1 s"):
        compile_prompt_template("{% for i in range(3) %}{{ i }}{% endfor %}").render()


@pytest.mark.parametrize("params", [{"shift": float("inf")}, {"cfg_scale": float("-inf")},
                                    {"temperature": float("nan")}, {"cfg_interval": [0.0, float("inf")]},
                                    {"cfg_renorm_min": float("nan")}, {"top_p": float("nan")}])
def test_non_finite_params_are_refused_from_python_too(params: dict) -> None:
    from lance_ray.spec import Params

    with pytest.raises(ValidationError, match="finite number"):
        Params(**params)


def test_infinity_from_the_environment_is_refused() -> None:
    text = one_step("t2i", "{rows: [{prompt: p}]}", "    params:\n      shift: ${SHIFT}\n")
    (problem,) = problems_of(text, env={"SHIFT": ".inf"})
    assert "finite number" in problem.message and (problem.line, problem.col) == (7, 14)
