"""Rules that relate several fields of a job: a param the task does not read, a preset of the wrong
family, an input without what the task needs, `turns` on a task without turns, `from_step` links.

The checks read the raw document (plain dicts and lists, as loaded from YAML) rather than validated
models, so they run in the same pass as pydantic's field validation: a step with one bad value is
still checked for everything else, and every problem carries the path it is about. Each check
tolerates values of the wrong type (pydantic reports those) by skipping what it cannot read.

`job_problems(data)` returns `Problem`s with paths from the document root; the loader turns paths
into `file:line:col`, and `Job` (built from Python data) turns them into one message.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import TYPE_CHECKING, Any, NamedTuple

from lance_ray.models.lance import PRESETS, PROMPT_COLUMNS, TASKS, Params, TaskSpec, presets_of
from lance_ray.spec.inputs import MISSING, column_value, parse_seed, prompt_problem
from lance_ray.spec.suites import SUITES
from lance_ray.spec.templates import prompt_template_columns

if TYPE_CHECKING:
    from lance_ray.spec.models import Job

_INPUT_KINDS = ("rows", "path", "from_step")


class Problem(NamedTuple):
    path: tuple[Any, ...]  # where in the document, e.g. ("steps", 0, "params", "frames")
    message: str
    at_key: bool = False  # point at the key rather than its value

    def under(self, *prefix: Any) -> Problem:
        return self._replace(path=prefix + self.path)


def job_problems(data: Any) -> list[Problem]:
    """Every cross-field problem of a job document (a dict; anything else has none to report)."""
    if not isinstance(data, dict):
        return []
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list):
        return []
    problems: list[Problem] = []
    for i, raw in enumerate(raw_steps):
        if isinstance(raw, dict):
            problems += [p.under("steps", i) for p in _step_problems(raw)]
    problems += _defaults_problems(_dict(data.get("defaults")), raw_steps)
    problems += [p.under("steps") for p in _graph_problems(raw_steps)]
    problems += [p.under("steps") for p in _output_format_problems(raw_steps)]
    return problems


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _task(raw_step: dict) -> TaskSpec | None:
    task = raw_step.get("task")
    return TASKS.get(task) if isinstance(task, str) else None


def _a(family: str) -> str:
    return "an image" if family == "image" else "a video"


def _defaults_problems(defaults: dict, raw_steps: list[Any]) -> list[Problem]:
    """A preset in `defaults` must suit every step that inherits it."""
    preset = defaults.get("preset")
    if not isinstance(preset, str) or preset not in PRESETS:
        return []
    for raw in raw_steps:
        task = _task(_dict(raw))
        if task is None or _dict(_dict(raw).get("params")).get("preset") is not None:
            continue
        if PRESETS[preset].family != task.family:
            message = (
                f"preset '{preset}' is not {_a(task.family)} preset, but step '{raw.get('name')}' "
                f"({task.name}) inherits it; set that step's params.preset to one of: "
                + ", ".join(presets_of(task.family))
            )
            return [Problem(("defaults", "preset"), message)]
    return []


def _step_problems(raw: dict) -> list[Problem]:
    task = _task(raw)
    if task is None:
        return []  # an unknown task is pydantic's to report; nothing else can be judged
    problems: list[Problem] = []
    params = _dict(raw.get("params"))
    for key in sorted(k for k in params if isinstance(k, str)):
        if key in Params.model_fields and key not in task.params and params[key] is not None:
            users = ", ".join(t.name for t in TASKS.values() if key in t.params)
            message = f"param '{key}' does not apply to task {task.name} (it is used by: {users})"
            problems.append(Problem(("params", key), message, at_key=True))
    preset = params.get("preset")
    if isinstance(preset, str) and preset in PRESETS and PRESETS[preset].family != task.family:
        message = (
            f"preset '{preset}' is not {_a(task.family)} preset (task {task.name}); "
            f"use one of: {', '.join(presets_of(task.family))}"
        )
        problems.append(Problem(("params", "preset"), message))
    if raw.get("turns") is not None and not task.multi_turn:
        multi = " and ".join(t.name for t in TASKS.values() if t.multi_turn)
        problems.append(Problem(("turns",), f"'turns' is only for {multi}, not {task.name}", at_key=True))
    for i, turn in enumerate(raw.get("turns") or []):
        if isinstance(turn, str) and (problem := prompt_problem(task, turn, "this instruction")):
            problems.append(Problem(("turns", i), problem))
    if isinstance(raw.get("input"), dict):
        problems += [p.under("input") for p in _input_problems(raw["input"], task, raw.get("turns") is not None)]
    return problems


def _needs_prompt(task: TaskSpec, inp: dict, has_turns: bool) -> bool:
    """Whether rows must bring their own prompt column (no turns, no input.prompt)."""
    return task.prompt_required and not has_turns and inp.get("prompt") is None


def _input_problems(inp: dict, task: TaskSpec, has_turns: bool) -> list[Problem]:
    given = [k for k in _INPUT_KINDS if inp.get(k) is not None]
    if not given:
        return [Problem((), "input needs exactly one of: rows, path, from_step")]
    if len(given) > 1:
        message = f"input needs exactly one of rows, path, from_step (got {' and '.join(given)})"
        return [Problem((given[1],), message, at_key=True)]
    kind = given[0]
    columns = _dict(inp.get("columns"))
    problems: list[Problem] = []
    mapped = [c for c in PROMPT_COLUMNS if columns.get(c) is not None]
    if len(mapped) > 1:
        message = f"map only one of columns.{' / columns.'.join(PROMPT_COLUMNS)}"
        problems.append(Problem(("columns", mapped[1]), message, at_key=True))
    if inp.get("prompt") is not None and mapped:
        message = f"give either input.prompt or columns.{mapped[0]}, not both"
        problems.append(Problem(("prompt",), message, at_key=True))
    if has_turns and (inp.get("prompt") is not None or mapped):
        where = ("prompt",) if inp.get("prompt") is not None else ("columns", mapped[0])
        message = "'turns' gives the instructions; remove the prompt/instruction from the input"
        problems.append(Problem(where, message, at_key=True))
    fmt = inp.get("format", "auto")
    if kind == "from_step" and fmt != "auto":
        problems.append(Problem(("format",), "format does not apply to from_step inputs", at_key=True))
    if kind == "from_step" and inp.get("media_root") is not None:
        problems.append(Problem(("media_root",), "media_root does not apply to from_step inputs", at_key=True))
    suite = SUITES.get(inp["suite"]) if isinstance(inp.get("suite"), str) else None
    if suite is not None and kind != "path":
        message = f"suite {suite.name} reads the benchmark's prompt file: give it as input.path (not {kind})"
        problems.append(Problem(("suite",), message, at_key=True))
    if suite is not None and suite.task != task.name:
        message = f"suite {suite.name} is a {suite.task} benchmark; this step's task is {task.name}"
        problems.append(Problem(("suite",), message))
    if kind == "path" and fmt in ("images", "videos"):
        media = fmt[:-1]
        if task.input_media is not None and media != task.input_media:
            message = f"task {task.name} cannot read {fmt} (it needs {_a(task.input_media)})"
            problems.append(Problem(("format",), message))
        if _needs_prompt(task, inp, has_turns):
            message = f"task {task.name} needs a prompt, and a folder of {fmt} has no columns: set input.prompt"
            problems.append(Problem((), message))
    if kind == "rows" and isinstance(inp["rows"], list):
        problems += _rows_problems(inp, task, has_turns)
    return problems


def _rows_problems(inp: dict, task: TaskSpec, has_turns: bool) -> list[Problem]:
    """Inline rows are known at load time: check each row has the columns the task will read, and a
    usable seed when it brings one."""
    columns = _dict(inp.get("columns"))
    needed: list[tuple[str, tuple[str, ...]]] = []  # (what, column names that provide it)
    if task.input_media is not None:
        mapped = columns.get(task.input_media)
        needed.append((_a(task.input_media), (mapped if isinstance(mapped, str) else task.input_media,)))
    if _needs_prompt(task, inp, has_turns):
        column = next((columns[c] for c in PROMPT_COLUMNS if isinstance(columns.get(c), str)), None)
        needed.append(("a prompt", (column,) if column else PROMPT_COLUMNS))
    template = inp.get("prompt")
    try:
        template_columns = sorted(prompt_template_columns(template)) if isinstance(template, str) else []
    except Exception:  # a template that does not parse is reported by its own field check
        template_columns = []
    seed_column = columns.get("seed") if isinstance(columns.get("seed"), str) else "seed"
    problems: list[Problem] = []
    for i, row in enumerate(inp["rows"]):
        if not isinstance(row, dict):
            continue
        for what, names in needed:
            if not any(_has(row, c) for c in names):
                listed = " / ".join(repr(c) for c in names)
                problems.append(Problem(("rows", i), f"row {i} has no {listed} column (task {task.name} needs {what})"))
        missing = [c for c in template_columns if c not in row]
        if missing:
            message = f"row {i} lacks column(s) {', '.join(missing)} used by the prompt template"
            problems.append(Problem(("rows", i), message))
        seed = _value(row, seed_column)
        if seed is not MISSING and seed is not None:
            try:
                parse_seed(seed)
            except ValueError as e:
                problems.append(Problem(("rows", i), f"row {i}: {e}"))
    return problems


def _value(row: dict, column: str) -> object:
    try:
        return column_value(row, column)
    except ValueError:  # a bad column path is its own field's problem
        return MISSING


def _has(row: dict, column: str) -> bool:
    return _value(row, column) is not MISSING


def _graph_problems(steps: list[Any]) -> list[Problem]:
    """Step names and from_step references."""
    problems: list[Problem] = []
    index: dict[str, int] = {}
    for i, raw in enumerate(steps):
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and name in index:
            problems.append(Problem((i, "name"), f"duplicate step name '{name}' (also step {index[name]})"))
        elif isinstance(name, str):
            index[name] = i
    for i, raw in enumerate(steps):
        ref = _from_step(raw)
        if ref is None:
            continue
        where = (i, "input", "from_step")
        if ref not in index:
            known = ", ".join(index) or "none"
            problems.append(Problem(where, f"from_step '{ref}' is not a step of this job (steps: {known})"))
        elif index[ref] == i:
            problems.append(Problem(where, f"step '{ref}' cannot read its own output"))
        elif index[ref] > i:
            cycle = _cycle_through(steps, index, i)
            hint = f" (this forms a cycle: {' -> '.join(cycle)})" if cycle else ""
            message = f"from_step '{ref}' refers to a later step; a step can only read an earlier step's output{hint}"
            problems.append(Problem(where, message))
        else:
            task, producer = _task(raw), _task(_dict(steps[index[ref]]))
            if task and producer and task.input_media and task.input_media not in producer.carries:
                message = (
                    f"task {task.name} needs {_a(task.input_media)}, but step '{ref}' ({producer.name}) "
                    "has none in its rows"
                )
                problems.append(Problem(where, message))
    return problems


def _from_step(raw: Any) -> str | None:
    ref = _dict(_dict(raw).get("input")).get("from_step")
    return ref if isinstance(ref, str) else None


def _cycle_through(steps: list[Any], index: dict[str, int], start: int) -> list[str]:
    """Follow from_step links from `start`; the names along the way if they come back to it."""
    names = [steps[start]["name"]]
    current = start
    for _ in range(len(steps)):
        ref = _from_step(steps[current])
        if ref is None or ref not in index:
            return []
        names.append(ref)
        current = index[ref]
        if current == start:
            return names
    return []


# -- outputs -----------------------------------------------------------------------------------------------


def _output_format(raw_step: Any) -> tuple[str, bool]:
    """(format, merge_into) of a raw step's output; the defaults where it does not say."""
    output = _dict(_dict(raw_step).get("output"))
    fmt = output.get("format", "parquet")
    return (fmt if isinstance(fmt, str) else "parquet"), output.get("merge_into") is True


def _output_format_problems(steps: list[Any]) -> list[Problem]:
    """merge_into only for steps that write text; from_step reads only Parquet outputs (the only format
    whose media are files a later step can open, and whose rows are the step's own)."""
    problems: list[Problem] = []
    index = {raw["name"]: i for i, raw in enumerate(steps) if isinstance(raw, dict) and isinstance(raw.get("name"), str)}
    for i, raw in enumerate(steps):
        task = _task(_dict(raw))
        if task is not None and _output_format(raw)[1] and task.output != "text":
            message = (f"merge_into adds text columns to a Lance dataset; task {task.name} writes "
                       f"{_a(task.output)}: give it its own output (format: lance without merge_into)")
            problems.append(Problem((i, "output", "merge_into"), message))
        ref = _from_step(raw)
        if ref in index and index[ref] < i:
            fmt, merge = _output_format(steps[index[ref]])
            if fmt != "parquet" or merge:
                written = "columns merged into a Lance dataset" if merge else f"format {fmt}"
                message = (f"from_step reads Parquet outputs only; step '{ref}' writes {written}: let it write "
                           "Parquet (the default) and add a later step for the other format")
                problems.append(Problem((i, "input", "from_step"), message))
    return problems


_GLOB_MAGIC = re.compile(r"[*?[]")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_SCHEME_ALIASES = {"s3a": "s3", "gcs": "gs", "abfss": "abfs", "file": "file"}


def output_path_problems(job: Job, document: Any = None) -> list[Problem]:
    """Where outputs are (paths resolved, so this runs on a `Job`): no two steps share an output or nest
    one inside the other, no output lies inside an input folder or glob root (each re-run would read
    the last run's outputs as new rows), no step reads from inside its own output.

    Paths point into the job `document` (the raw data, when known): at a step's `output.path` when it
    has one, else at the job's `output` (or the step's name when the document has no `output`); at
    `input.path` for an input inside its own output.
    """
    has_root = not isinstance(document, dict) or "output" in document
    problems: list[Problem] = []
    outputs = [(i, step, step.output_path(job), _location(step.output_path(job))) for i, step in enumerate(job.steps)]

    def where(i: int) -> tuple[Any, ...]:
        if job.steps[i].output.path is not None:
            return ("steps", i, "output", "path")
        return ("output",) if has_root else ("steps", i, "name")

    for later, (j, step_j, out_j, loc_j) in enumerate(outputs):
        for i, step_i, out_i, loc_i in outputs[:later]:
            if step_i.name == step_j.name:
                continue  # a duplicate name, reported as such
            relation = _relation(loc_j, loc_i)
            if relation:
                at = j if job.steps[j].output.path is not None or job.steps[i].output.path is None else i
                message = (f"steps '{step_j.name}' and '{step_i.name}' write to {out_j} and {out_i}: "
                           f"{relation}; two steps never share an output (give one its own output.path)")
                problems.append(Problem(where(at), message))
    for k, reader in enumerate(job.steps):
        for root in _input_roots(reader.input.path or []):
            loc_in = _location(root)
            for j, step_j, out_j, loc_j in outputs:
                if loc_j == loc_in or _inside(loc_j, loc_in):
                    message = (f"step '{step_j.name}' writes to {out_j}, inside the input folder {root} of step "
                               f"'{reader.name}': each run would read the last run's outputs as new rows; "
                               "put outputs outside every input folder")
                    problems.append(Problem(where(j), message))
                elif j == k and _inside(loc_in, loc_j):
                    message = (f"step '{reader.name}' reads {root}, inside its own output {out_j}: each run "
                               "would read its own outputs back")
                    problems.append(Problem(("steps", k, "input", "path"), message))
    return list(dict.fromkeys(problems))


def _location(path: str) -> tuple[str, str]:
    """(scheme, normalised path) of a local path or URI, comparable with `_inside`."""
    match = _SCHEME.match(path)
    if match and match.group(1).lower() != "file":
        scheme = match.group(1).lower()
        return _SCHEME_ALIASES.get(scheme, scheme), posixpath.normpath("/" + match.group(2)).rstrip("/")
    local = match.group(2) if match else path
    return "file", os.path.realpath(os.path.expanduser(local))


def _inside(path: tuple[str, str], folder: tuple[str, str]) -> bool:
    return path[0] == folder[0] and path[1].startswith(folder[1].rstrip("/") + "/")


def _relation(a: tuple[str, str], b: tuple[str, str]) -> str | None:
    if a == b:
        return "the same folder"
    if _inside(a, b) or _inside(b, a):
        return "one inside the other"
    return None


def _input_roots(paths: list[str]) -> list[str]:
    """The folders an input reads from: each folder, and each glob's folder before its first wildcard
    (a plain file is no folder: nothing is written inside it)."""
    roots = []
    for path in paths:
        if _GLOB_MAGIC.search(path):
            head = []
            for part in path.split("/"):
                if _GLOB_MAGIC.search(part):
                    break
                head.append(part)
            roots.append("/".join(head) or "/")
        elif _SCHEME.match(path) and not path.startswith("file://"):
            roots.append(path)  # an object-store prefix: a folder unless it names one object
        elif os.path.isdir(path):
            roots.append(path)
    return roots
