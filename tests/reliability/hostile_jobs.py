"""Hostile job files: what a careless or hostile author can put in one, and the problem each must get.

Each `JobCase` is the bytes of a job file and a fragment of the one problem `lance-ray validate`
must print for it (`file:line:col: message`, exit 2). Files that need the filesystem (a FIFO, a
symlink loop, a folder) are made by `write`. Used by test_hostile_jobs.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class JobCase:
    name: str
    content: bytes | None  # None: `make` creates the path
    problem: str  # fragment of the reported problem
    make: Callable[[Path], None] | None = None

    def write(self, folder: Path) -> Path:
        path = folder / f"{self.name}.yaml"
        if self.make is not None:
            self.make(path)
        else:
            path.write_bytes(self.content or b"")
        return path


def _job(step: str = "", *, top: str = "", task: str = "t2i", inputs: str = "{rows: [{prompt: p}]}") -> bytes:
    """A valid one-step job with `top` lines added at the top level and `step` lines in the step."""
    text = f"name: hostile\nmodels: {{image: lance-tiny, video: lance-tiny}}\n{top}steps:\n"
    text += f"  - name: s\n    task: {task}\n    input: {inputs}\n{step}"
    return text.encode()


def _prompt(template: str) -> bytes:
    """A job whose inline rows carry a column `x` and whose prompt is `template` (YAML-quoted)."""
    quoted = template.replace("\\", "\\\\").replace('"', '\\"')
    return _job(inputs=f'{{rows: [{{x: 1}}], prompt: "{quoted}"}}')


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _symlink_loop(path: Path) -> None:
    other = path.with_name(path.stem + "-other.yaml")
    os.symlink(other.name, path)
    os.symlink(path.name, other)


def _folder(path: Path) -> None:
    path.mkdir()


def _unreadable_device(path: Path) -> None:
    os.symlink("/dev/zero", path)


CASES: list[JobCase] = [
    # --- the file itself
    JobCase("fifo", None, "not a regular file", _fifo),
    JobCase("dev_zero", None, "not a regular file", _unreadable_device),
    JobCase("symlink_loop", None, "symbolic links", _symlink_loop),
    JobCase("folder", None, "a directory", _folder),
    JobCase("too_big", b"name: big\n" + b"# padding\n" * (1_700_000), "larger than 16 MiB"),
    JobCase("latin1", "name: caf\xe9\nsteps: []\n".encode("latin-1"), "not UTF-8"),
    JobCase("utf16", "name: x\nsteps: []\n".encode("utf-16"), "not UTF-8"),
    JobCase("empty", b"", "empty"),
    JobCase("only_comments", b"# nothing here\n", "empty"),
    # --- YAML that used to crash or blow up
    JobCase("control_char", b"name: a\x01b\nsteps: []\n", "U+0001"),
    JobCase("nul_byte", b"name: a\x00b\nsteps: []\n", "U+0000"),
    JobCase("escape_char", b"name: a\x1b[31mred\nsteps: []\n", "U+001B"),
    JobCase("deep_flow_lists", b"name: x\nsteps: " + b"[" * 600 + b"]" * 600 + b"\n", "nested more than"),
    JobCase("deep_flow_maps", b"name: x\nsteps: " + b"{a: " * 300 + b"1" + b"}" * 300 + b"\n", "nested more than"),
    JobCase("deep_block_lists", b"name: x\nsteps:\n" + b"".join(b" " * i + b"-\n" for i in range(200)),
            "nested more than"),
    JobCase("billion_laughs", BILLION_LAUGHS.encode(), "aliases would expand"),
    JobCase("alias_bomb_in_rows", (
        "name: x\nx1: &x1 [{prompt: a}, {prompt: a}, {prompt: a}, {prompt: a}, {prompt: a}, {prompt: a}]\n"
        + "".join(f"x{i + 1}: &x{i + 1} [{', '.join([f'*x{i}'] * 6)}]\n" for i in range(1, 8))
        + "steps: [{name: s, task: t2i, input: {rows: *x8}}]\n").encode(), "aliases would expand"),
    JobCase("merge_key_bomb", (
        "name: x\nm0: &m0 {a0: 1, b0: 1, c0: 1, d0: 1, e0: 1, f0: 1, g0: 1, h0: 1}\n"
        + "".join(f"m{i + 1}: &m{i + 1} [{', '.join([f'*m{i}'] * 8)}]\n" for i in range(7))
        + "steps: [{name: s, task: t2i, input: {rows: [{prompt: p, <<: *m7}]}}]\n").encode(),
        "aliases would expand"),
    JobCase("recursive_alias", b"name: x\nsteps: &s [{name: a, task: t2i, input: {rows: *s}}]\n",
            "an alias refers to a node that contains it"),
    JobCase("undefined_alias", b"name: x\nsteps: *nowhere\n", "undefined alias"),
    JobCase("duplicate_anchor", b"name: &a x\nsteps: &a []\n", "duplicate anchor"),
    JobCase("huge_integer", b"name: x\nsteps: " + b"9" * 5000 + b"\n", "as int"),
    JobCase("impossible_date", b"name: x\nsteps: 2024-13-45\n", "as timestamp"),
    JobCase("python_object_tag", b"name: x\nsteps: !!python/object/apply:os.system ['id']\n", "constructor"),
    JobCase("python_name_tag", b"name: !!python/name:os.system x\nsteps: []\n", "constructor"),
    JobCase("custom_tag", b"name: !vault secret\nsteps: []\n", "constructor"),
    JobCase("bad_base64", b"name: x\nsteps: !!binary '@@@'\n", "base64"),
    JobCase("tab_indent", b"name: x\nsteps:\n\t- name: a\n", "YAML syntax error"),
    JobCase("unterminated_quote", b'name: "x\nsteps: []\n', "YAML syntax error"),
    JobCase("complex_key", b"name: x\n? [a, b]\n: 1\nsteps: []\n", "mapping key must be a scalar"),
    JobCase("two_documents", b"name: x\n---\nname: y\n", "single document"),
    JobCase("scalar_document", b"just a string\n", "expected a mapping"),
    JobCase("huge_key", b"name: x\n" + b"k" * 200_000 + b": 1\nsteps: []\n", "could not find expected ':'"),
    # --- values that must be refused
    JobCase("inf_shift", _job("    params: {shift: .inf}\n"), "finite number"),
    JobCase("inf_cfg_scale", _job("    params: {cfg_scale: .inf}\n"), "finite number"),
    JobCase("inf_temperature", _job("    params: {temperature: .inf}\n", task="x2t_image",
                                    inputs="{rows: [{image: a.png}]}"), "finite number"),
    JobCase("nan_cfg_interval", _job("    params: {cfg_interval: [.nan, 1.0]}\n"), "finite number"),
    JobCase("inf_in_defaults", _job(top="defaults: {shift: -.inf}\n"), "finite number"),
    JobCase("inf_from_env", _job("    params:\n      shift: ${LANCE_RAY_HOSTILE_INF:-.inf}\n"), "finite number"),
    JobCase("seed_past_int64", _job("    params: {seed: 9223372036854775808}\n"), "less than"),
    JobCase("steps_huge", _job("    params: {steps: 1000000000000000000000}\n"), "less than or equal"),
    JobCase("size_negative", _job("    params: {height: -512}\n"), "greater than or equal"),
    # --- prompt templates
    JobCase("template_unknown_filter", _prompt("{{ x|nosuchfilter }}"), "No filter named 'nosuchfilter'"),
    JobCase("template_unknown_test", _prompt("{% if x is nosuchtest %}a{% endif %}"), "No test named"),
    JobCase("template_syntax", _prompt("{% for %}"), "bad prompt template"),
    JobCase("template_too_long", _prompt("a" * 70_000), "longer than"),
    JobCase("template_divides_by_zero", _prompt("{{ 1 / 0 }}"), "ZeroDivisionError"),
    JobCase("template_repeats_a_string", _prompt("{{ 'x' * 10**9 }}"), "1,000,000"),
    JobCase("template_nested_ranges",
            _prompt("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"),
            "steps"),
    JobCase("template_power_tower", _prompt("{{ 2 ** (10 ** 9) }}"), "bits"),
    JobCase("template_format_width", _prompt("{{ '{:>999999999}'.format(1) }}"), "format widths"),
    JobCase("template_sandbox_escape", _prompt("{{ ''.__class__.__mro__[1].__subclasses__() }}"),
            "unsafe"),
    JobCase("template_recursion", _prompt("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"),
            "recurses"),
]
