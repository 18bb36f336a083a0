"""Fuzzed job documents (hypothesis): loading one gives a `Job` or a `JobSpecError`, nothing else.

Three generators, each run `EXAMPLES` times (environment variable LANCE_RAY_FUZZ_EXAMPLES; CI uses the
default, `python -m benchmarks.fuzz_jobs` runs 10,000+ documents and prints the figures):
* YAML token soup: anchors, aliases, merge keys, tags, flow/block mixes, env references, control
  characters, scalars that resolve to odd types;
* a valid job with random values put at random places (huge and non-finite numbers, wrong types,
  templates, paths, deep structures);
* random Jinja prompt templates, validated and then rendered against rows.

For a document that loads, every step's effective params must also resolve and serialise as strict
JSON (no Infinity or NaN can get into the `params` column). For one that does not, every line of the
error must be `fuzz.yaml:LINE:COL: message`.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter
from typing import Any

import jinja2
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lance_ray.spec import JobSpecError, compile_prompt_template, load_job_text

EXAMPLES = int(os.environ.get("LANCE_RAY_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROBLEM_LINE = re.compile(r"^fuzz\.yaml:\d+:\d+: \S")
ENV = {"STEPS": "4", "INF": ".inf", "EMPTY": "", "WORD": "cat", "DOC": "a: [1"}

OUTCOMES: Counter[str] = Counter()  # what the generators produced, read by benchmarks/fuzz_jobs.py


def check_document(text: str) -> None:
    """Loading `text` gives a Job whose params are strict JSON, or a JobSpecError of well-formed lines."""
    try:
        job = load_job_text(text, "fuzz.yaml", "/fuzz", ENV)
    except JobSpecError as error:
        lines = str(error).splitlines()
        assert lines and all(PROBLEM_LINE.match(line) for line in lines), str(error)
        OUTCOMES["refused"] += 1
        return
    for step in job.steps:
        json.dumps(step.params_for(job).model_dump(mode="json"), allow_nan=False)
        step.output_path(job)
    job.with_run_context("2026-01-01", "run")
    OUTCOMES["loaded"] += 1


# ------------------------------------------------------------------------------ YAML token soup

TOKENS = [
    "name: j", "name:", "steps:", "models:", "defaults:", "output:", "schedule:", "ray:", "image:", "video:",
    "source:", "lance-tiny", "backend: debug", "task: t2i", "task: x2t_image", "task: image_edit", "input:",
    "rows:", "path:", "from_step: a", "prompt:", "params:", "steps: 30", "shift: .inf", "cfg_scale:",
    "seed:", "cron: '* * * * *'", "turns:", "resources:", "gpus: -1", "columns:", "format: images",
    "- name: a", "- ", "-", "  ", "    ", "\n", "\n  ", "\n    ", "\t", " ", ":", ": ", ",", "[", "]", "{", "}",
    "?", "? ", "|", ">", "#", "# c", "'", '"', "&a ", "&b ", "*a", "*b", "<<: *a", "<<: ", "!!str ", "!!int ",
    "!!float ", "!!binary ", "!!set ", "!!omap ", "!!python/object:os.system ", "!custom ", "%YAML 1.1\n",
    "---\n", "...\n", "~", "null", "true", "yes", "0x1F", "0o17", "1_000", "1e3", "1.5e999", ".nan", "-.inf",
    "9" * 30, "2024-02-30", "2001-12-14t21:59:43.10-05:00", "12:30:45", "${STEPS}", "${INF}", "${EMPTY}",
    "${NOPE}", "${NOPE:-x}", "${", "$$", "${DOC}", "'{{ x }}'", '"{{ x * 99999999 }}"', "'{% for %}'",
    "\x00", "\x01", "\x1b", "\x85", "\u2028", "\ufeff", "\ud7ff", "é", "日本",
]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_yaml_token_soup(tokens: list[str]) -> None:
    check_document("".join(tokens))


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    check_document(text)


# ------------------------------------------------------------- a valid job, mutated in places

BASE_JOB: dict[str, Any] = {
    "name": "fuzz",
    "models": {"image": {"source": "lance-tiny", "backend": "debug"}, "video": "lance-tiny"},
    "defaults": {"seed": 1},
    "output": "out",
    "steps": [
        {"name": "draw", "task": "t2i", "input": {"rows": [{"prompt": "a cat", "seed": 3}]},
         "params": {"steps": 4, "height": 64, "width": 64}, "resources": {"batch_size": 2}},
        {"name": "look", "task": "x2t_image", "input": {"from_step": "draw", "prompt": "Describe {{ prompt }}"},
         "params": {"max_new_tokens": 8}},
        {"name": "edit", "task": "image_edit", "input": {"path": "imgs", "format": "images"},
         "turns": ["make it blue"], "output": {"path": "edits/{run_date}", "video_codec": "ffv1"}},
    ],
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**62, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["t2i", "x2t_video", "lance-tiny", "image_768res", "{{ x }}", "{{ 1/0 }}", "${STEPS}",
                     "${INF}", "${NOPE}", "s3://b/k", "../..", "/dev/zero", "{run_date}", "{oops}", "a\x00b",
                     "0 2 * * *", "Mars/Phobos", "ffv1", "official", "-1", ".inf", "*", ""]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(
        ["name", "task", "input", "rows", "prompt", "params", "steps", "seed", "path", "from_step"])),
        inner, max_size=4)), max_leaves=12)


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, prefix + (index,))
    return found


@FUZZ
@given(st.data())
def test_valid_job_with_random_values(data: st.DataObject) -> None:
    job = copy.deepcopy(BASE_JOB)
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(_paths(job)))
        value = data.draw(values)
        if not path:
            job = value
            continue
        parent = job
        for part in path[:-1]:
            parent = parent[part]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            parent[data.draw(st.text(max_size=10))] = value  # a new key beside the chosen one
        else:
            parent[path[-1]] = value
    check_document(yaml.safe_dump(job, allow_unicode=True, sort_keys=False))


# --------------------------------------------------------------------------------- templates

TEMPLATE_TOKENS = [
    "{{", "}}", "{%", "%}", "{#", "#}", " ", "x", "y", "name", "'a'", "10", "99999", "**", "*", "/", "//", "%",
    "~", "+", "|", "join", "center(", "list", "length", "upper", "replace(", "format(", "(", ")", "[", "]",
    ",", ".", "for i in", "range(", "endfor", "if", "else", "endif", "set", "=", "namespace(", "macro f()",
    "endmacro", "f()", "loop", "recursive", "is", "defined", "nosuch", "__class__", "attr(", "cycler",
    "lipsum(", "{:>", "0}", "'%99999999s'", "\n", "\x00",
]


# Expressions built by a small grammar, so that most of them compile and then stress the render limits.
ATOMS = ["x", "y", "name", "'ab'", "0", "7", "99999", "10**6", "[1, 2]", "range(99999)", "namespace(v=x)",
         "{'k': y}", "none", "loop"]
expressions = st.recursive(st.sampled_from(ATOMS), lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["*", "**", "+", "~", "%", "/", "//", "-"]), inner).map(" ".join).map("({})".format),
    st.tuples(inner, st.sampled_from(["join", "list", "length", "center(99999999)", "replace('a', y)", "format(x)",
                                      "batch(3)", "string", "int", "reverse", "sum", "unique", "tojson", "indent(9)"]))
    .map("{0[0]}|{0[1]}".format),
    st.tuples(inner, st.sampled_from(["upper", "split", "zfill(9999999)", "ljust(7)", "format(y, y)"]))
    .map("{0[0]}.{0[1]}".format).map(lambda call: call if "(" in call else call + "()"),
    inner.map("[{0}, {0}]".format),
), max_leaves=8)
statements = st.one_of(
    expressions.map("{{{{ {} }}}}".format),
    st.tuples(expressions, expressions).map("{{% for i in {0[0]} %}}{{{{ {0[1]} }}}}{{% endfor %}}".format),
    st.tuples(expressions, expressions).map("{{% set ns = namespace(v={0[0]}) %}}{{% for i in range(30) %}}"
                                            "{{% set ns.v = [ns.v, {0[1]}] %}}{{% endfor %}}{{{{ ns.v|length }}}}".format),
    st.lists(st.sampled_from(TEMPLATE_TOKENS), max_size=25).map("".join),
)


@FUZZ
@given(statements, st.sampled_from([0, 1, -3, "ab", [1, 2], None, 10**30, "x" * 1000]))
def test_random_prompt_templates(template: str, x: Any) -> None:
    quoted = json.dumps(template)  # a JSON string is a valid double-quoted YAML scalar
    check_document(f"name: t\nmodels: {{image: lance-tiny}}\nsteps:\n  - name: s\n    task: t2i\n"
                   f"    input:\n      rows: [{{x: 1}}]\n      prompt: {quoted}\n")
    try:
        compiled = compile_prompt_template(template)
    except jinja2.TemplateSyntaxError:
        OUTCOMES["template refused"] += 1
        return
    try:
        compiled.render({"x": x, "y": "word", "name": "n"})
        OUTCOMES["template rendered"] += 1
    except jinja2.TemplateError:  # the one error type a row can get from its template
        OUTCOMES["template row error"] += 1
