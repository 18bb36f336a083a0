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

from typing import Any, NamedTuple

from lance_ray.models.lance import PRESETS, PROMPT_COLUMNS, TASKS, Params, TaskSpec, presets_of
from lance_ray.spec.inputs import MISSING, column_value, parse_seed, prompt_problem
from lance_ray.spec.suites import SUITES
from lance_ray.spec.templates import prompt_template_columns

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
