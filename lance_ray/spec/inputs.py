"""What a step reads from each input record: where each canonical field comes from, the prompt, the
checks a row must pass. Shared by the run (the source's read task) and by validation before any work
(the loader's sample of each table), so both judge a row by the same rules.

Columns may be paths into nested records: `additional_info.prompt`, `interleave_array[1]`,
`a.b[0].c` (a key that itself contains `.` or `[` is found by its literal name first).

`RowMapping.map(record)` gives a `MappedRow`: prompt (from a column or the step's template), media
URIs (relative paths resolved against `input.media_root` or the table's folder), the seed the row
asks for, its explicit id, and `error` when the row cannot be used. Error messages name the columns
looked for and the columns the row has.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jinja2

from lance_ray.io.storage import is_local, join_uri
from lance_ray.models.lance import PROMPT_COLUMNS, TaskSpec
from lance_ray.models.lance.params import MAX_NEW_TOKENS, MAX_SEED
from lance_ray.spec.suites import SUITES, Suite
from lance_ray.spec.templates import PromptTemplate, compile_prompt_template, prompt_template_columns

if TYPE_CHECKING:
    from lance_ray.spec.models import ColumnMap, Step

_PATH_PART = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")
_SEED_TEXT = re.compile(r"\s*\+?\d+\s*")
MISSING = object()  # a column path that does not resolve in a record
_LISTED_COLUMNS = 20  # how many of a row's columns an error message lists
MEDIA_SAMPLE = 1000  # rows whose media paths validation checks on disk


@functools.lru_cache(maxsize=1024)  # a step has a handful of columns; every row looks them up
def parse_column_path(text: str) -> tuple[str | int, ...]:
    """`a.b[1]` → ('a', 'b', 1); raises ValueError for anything that is not such a path."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(text):
        match = _PATH_PART.match(text, pos)
        if match is None or (pos == 0 and text.startswith(".")) or (pos > 0 and match.group(1) and text[pos] != "."):
            raise ValueError(f"bad column path {text!r}: expected names joined by '.' and [index] parts, "
                             "e.g. additional_info.prompt or interleave_array[1]")
        parts.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
        pos = match.end()
    if not parts:
        raise ValueError("a column name must not be empty")
    return tuple(parts)


def column_value(record: Mapping[str, Any], path: str) -> Any:
    """The value at a column path, or MISSING. A literal key (even with dots) wins over a path."""
    if path in record:
        return record[path]
    value: Any = record
    for part in parse_column_path(path):
        if isinstance(part, int):
            if not isinstance(value, list | tuple) or part >= len(value):
                return MISSING
        elif not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value


def _present(value: Any) -> bool:
    return value is not MISSING and value is not None and value != ""


def resolve_media(value: str, base: str | None) -> str:
    """Relative media paths are relative to `base` (media_root, or the table's folder); absolute paths
    and URIs stay as written."""
    if base is None or not value or "://" in value or value.startswith(("/", "~")):
        return value
    return os.path.normpath(os.path.join(base, value)) if is_local(base) else join_uri(base, value)


def table_media_base(table_uri: str | None, media_root: str | None) -> str | None:
    if media_root is not None or table_uri is None:
        return media_root
    return os.path.dirname(table_uri) if is_local(table_uri) else table_uri.rsplit("/", 1)[0]


def parse_seed(value: Any) -> int:
    """A row's seed: an integer (or integer text) in [0, 2^63); raises ValueError with the row's message."""
    if isinstance(value, bool) or not (
        isinstance(value, int)
        or (isinstance(value, float) and value.is_integer())
        or (isinstance(value, str) and _SEED_TEXT.fullmatch(value))
    ):
        raise ValueError(f"seed {value!r} is not an integer")
    seed = int(value)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed {seed} is out of range (0 ≤ seed < 2^63)")
    return seed


def parse_max_new_tokens(value: Any) -> int:
    """A row's own caption cap (an input column `max_new_tokens`): an integer in 1..MAX_NEW_TOKENS."""
    if isinstance(value, bool) or not (
        isinstance(value, int)
        or (isinstance(value, float) and value.is_integer())
        or (isinstance(value, str) and _SEED_TEXT.fullmatch(value))
    ) or not 1 <= int(value) <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens {value!r} is not an integer in 1..{MAX_NEW_TOKENS}")
    return int(value)


def prompt_problem(task: TaskSpec, prompt: str | None, what: str | None = None) -> str | None:
    """Why a prompt cannot be used by `task` (too long), or None."""
    if prompt is not None and len(prompt) > task.max_prompt_chars:
        return (f"{what or task.prompt_name} is {len(prompt)} characters; task {task.name} takes at most "
                f"{task.max_prompt_chars}")
    return None


def listed(columns: Iterable[str]) -> str:
    names = sorted(str(c) for c in columns)
    if not names:
        return "none"
    more = len(names) - _LISTED_COLUMNS
    return ", ".join(names[:_LISTED_COLUMNS]) + (f" … ({more} more)" if more > 0 else "")


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _quoted(paths: Iterable[str]) -> str:
    return " / ".join(repr(p) for p in paths)


@dataclass(frozen=True)
class FieldRule:
    """Where one canonical field comes from: the column paths tried in order, and whether a missing
    value is an error (the user or the suite named the column) or simply leaves the field empty."""

    name: str  # prompt | image | video | seed | max_new_tokens | row_id
    columns: tuple[str, ...]
    required: bool
    source: str = "default"  # "columns" (the job's mapping) | "suite" | "default": where the columns come from


@dataclass
class MappedRow:
    prompt: str | None = None
    image: str | None = None
    video: str | None = None
    seed_override: int | None = None
    max_new_tokens_override: int | None = None  # the row's own caption cap (understanding tasks)
    row_id: str | None = None  # the row's own id (its id column), not yet made file-name safe
    error: str | None = None


@dataclass
class RowMapping:
    """What a step reads from each record of its input (see the module doc)."""

    task: TaskSpec
    rules: dict[str, FieldRule]
    template_text: str | None = None
    prompt_required: bool = True
    media_root: str | None = None
    suite: Suite | None = None
    prompt_key: str = "prompt"  # how the job's `columns` names the prompt: prompt | instruction | question
    _template: PromptTemplate | None = field(default=None, repr=False, compare=False)

    @classmethod
    def for_step(cls, step: Step) -> RowMapping:
        inp = step.input
        suite = SUITES[inp.suite] if inp.suite else None
        return cls.build(step.spec, inp.columns, template=inp.prompt, has_turns=bool(step.turns),
                         from_step=inp.from_step is not None, suite=suite, media_root=inp.media_root)

    @classmethod
    def build(cls, task: TaskSpec, columns: ColumnMap, *, template: str | None = None, has_turns: bool = False,
              from_step: bool = False, suite: Suite | None = None, media_root: str | None = None) -> RowMapping:
        """Rows from another step carry that step's own prompt and seed; they only become this step's
        when mapped explicitly (`columns: {prompt: text}`), never by default."""
        defaults: dict[str, tuple[tuple[str, ...], str]] = {
            "prompt": (() if from_step else PROMPT_COLUMNS, "default"),
            "image": (("image",), "default"),
            "video": (("video",), "default"),
            "seed": (() if from_step else ("seed",), "default"),
            "row_id": (("row_id",), "default"),
        }
        if task.output == "text":  # a per-row cap, read from a column of that name (never mapped)
            defaults["max_new_tokens"] = (() if from_step else ("max_new_tokens",), "default")
        if suite is not None:
            defaults["prompt"] = (suite.prompt, "suite")
            defaults["row_id"] = (suite.index, "suite")
            if suite.image:
                defaults["image"] = (suite.image, "suite")
        mapped = {"prompt": columns.prompt_column(), "image": columns.image, "video": columns.video,
                  "seed": columns.seed, "row_id": columns.row_id, "max_new_tokens": None}
        rules = {}
        for name, (paths, source) in defaults.items():
            if mapped[name]:
                rules[name] = FieldRule(name, (mapped[name],), required=True, source="columns")
            else:
                # A suite's prompt and media must be there; its index may fall back to a key or position.
                rules[name] = FieldRule(name, paths, required=source == "suite" and name != "row_id", source=source)
        prompt_key = next((k for k in PROMPT_COLUMNS if getattr(columns, k)), "prompt")
        return cls(task, rules, template, task.prompt_required and not has_turns, media_root, suite, prompt_key)

    @property
    def template(self) -> PromptTemplate | None:
        """Compiled on first use (a compiled template does not pickle: the mapping travels to Ray tasks)."""
        if self._template is None and self.template_text is not None:
            self._template = compile_prompt_template(self.template_text)
        return self._template

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_template": None}

    @property
    def template_columns(self) -> set[str]:
        return set() if self.template_text is None else prompt_template_columns(self.template_text)

    def map(self, record: Mapping[str, Any], table_uri: str | None = None) -> MappedRow:
        """One record → its canonical fields, or `error` saying why the row cannot be used."""
        out = MappedRow()
        errors: list[str] = []
        column_errors = False  # whether to list the row's columns after the errors
        media_base = table_media_base(table_uri, self.media_root)
        for name, rule in self.rules.items():
            if name == "prompt" and self.template_text is not None:
                continue  # the template is the prompt
            value = next((v for c in rule.columns if _present(v := column_value(record, c))), MISSING)
            if value is MISSING:
                if rule.required:
                    errors.append(f"no {name}: column {_quoted(rule.columns)} is missing or empty")
                    column_errors = True
                continue
            if name == "row_id":
                out.row_id = str(value)
            elif name == "seed":
                try:
                    out.seed_override = parse_seed(value)
                except ValueError as e:
                    errors.append(str(e))
            elif name == "max_new_tokens":
                try:
                    out.max_new_tokens_override = parse_max_new_tokens(value)
                except ValueError as e:
                    errors.append(str(e))
            elif name in ("image", "video"):
                setattr(out, name, resolve_media(str(value), media_base))
            else:
                out.prompt = str(value)
        if self.template is not None:
            try:
                out.prompt = self.template.render(record)
            except jinja2.TemplateError as e:  # every failure, limits included (spec/templates.py)
                errors.append(f"prompt template: {e.message or type(e).__name__}")
                column_errors = column_errors or "is undefined" in str(e)
        media = self.task.input_media
        if media and not getattr(out, media) and not self.rules[media].required:
            errors.append(f"task {self.task.name} needs an input {media}: looked for column "
                          f"{_quoted(self.rules[media].columns)}")
            column_errors = True
        if self.prompt_required and not errors and not (out.prompt or "").strip():
            rule, what = self.rules["prompt"], _article(self.task.prompt_name)
            if self.template_text is None and not rule.columns:  # rows of another step bring none by default
                errors.append(f"task {self.task.name} needs {what}: set input.prompt, or map a column of the "
                              "upstream rows with columns.prompt")
            elif self.template_text is None and not any(column_value(record, c) is not MISSING for c in rule.columns):
                errors.append(f"task {self.task.name} needs {what}: looked for column {_quoted(rule.columns)}")
                column_errors = True
            else:
                errors.append(f"task {self.task.name} needs a non-empty {self.task.prompt_name}")
        if (problem := prompt_problem(self.task, out.prompt)) is not None:
            errors.append(problem)
        if errors:
            out.error = "; ".join(errors) + (f" (the row's columns: {listed(record)})" if column_errors else "")
        return out


# -------------------------------------------------------------------------- judging a sample of rows


@dataclass(frozen=True)
class SampleProblem:
    where: tuple[str, ...]  # under the step's `input`: ("columns", "prompt"), ("prompt",), ("path",), ...
    message: str


def sample_problems(mapping: RowMapping, records: list[Mapping[str, Any]], table: str,
                    table_uri: str | None, exists: Any = os.path.exists) -> list[SampleProblem]:
    """Mistakes of the job rather than of single rows, seen in a sample of a table's records: a mapped
    column (or the prompt / media column a task needs) that no sampled record has, template columns no
    record has, and media paths none of which exist locally (a wrong folder or column). Rows that
    merely lack a value are left to become error rows at run time."""
    if not records:
        return []
    problems: list[SampleProblem] = []
    has_columns = f"(its columns: {listed({k for r in records for k in r})})"

    def seen(rule: FieldRule) -> bool:
        return any(column_value(r, c) is not MISSING for r in records for c in rule.columns)

    needs = {"prompt": mapping.prompt_required, "image": mapping.task.input_media == "image",
             "video": mapping.task.input_media == "video"}
    for name, rule in mapping.rules.items():
        if (name == "prompt" and mapping.template_text is not None) or seen(rule):
            continue
        if rule.source == "columns":
            key = mapping.prompt_key if name == "prompt" else name
            problems.append(SampleProblem(("columns", key), f"column {rule.columns[0]!r} is not in {table} "
                                          f"{has_columns}"))
        elif rule.source == "suite" and rule.required:
            suite = mapping.suite.name if mapping.suite else "?"
            problems.append(SampleProblem(("suite",), f"suite {suite} reads the {name} from column "
                                          f"{_quoted(rule.columns)}, which {table} does not have {has_columns}; "
                                          f"map it with columns.{name}"))
        elif rule.source == "default" and needs.get(name):
            hint = "map one with columns.prompt, or set input.prompt" if name == "prompt" else f"map it with columns.{name}"
            problems.append(SampleProblem((), f"task {mapping.task.name} needs {'a prompt' if name == 'prompt' else 'an ' + name}"
                                          f": {table} has no column {_quoted(rule.columns)} {has_columns}; {hint}"))
    ids: dict[str, int] = {}
    for record in records:
        if (key := next((v for c in mapping.rules["row_id"].columns if _present(v := column_value(record, c))),
                        None)) is not None:
            ids[str(key)] = ids.get(str(key), 0) + 1
    repeated = [key for key, n in ids.items() if n > 1]
    if repeated:
        rule = mapping.rules["row_id"]
        where = ("columns", "row_id") if rule.source == "columns" else ("suite",) if rule.source == "suite" else ()
        problems.append(SampleProblem(where, f"row ids must be unique, but {table} repeats {len(repeated)} of them in "
                                      f"column {_quoted(rule.columns)} (first: {repeated[0]!r})"))
    missing_template = sorted(c for c in mapping.template_columns if not any(c in r for r in records))
    if missing_template:
        problems.append(SampleProblem(("prompt",), f"the prompt template reads {_quoted(missing_template)}, which "
                                      f"{table} does not have {has_columns}"))
    media = mapping.task.input_media
    if media is not None:
        paths = [m for r in records[:MEDIA_SAMPLE] if (m := getattr(mapping.map(r, table_uri), media)) and is_local(m)]
        if paths and not any(exists(p) for p in paths):
            rule = mapping.rules[media]
            where = ("columns", media) if rule.source == "columns" else ()
            problems.append(SampleProblem(where, f"none of the {len(paths)} {media} paths read from {table} exists "
                                          f"(first: {paths[0]}); relative paths are relative to the table's folder, "
                                          "or to input.media_root"))
    return problems

