"""Loading a job file: YAML with positions → validated `Job`, or every problem as `file:line:col`.

One pass, three sources of problems, all reported together in file order:
1. `yaml_positions.load_yaml`: YAML syntax, duplicate keys, `${ENV}` references;
2. pydantic: unknown keys, types, single-field rules (ranges, cron, timezone, templates);
3. `checks.job_problems`: rules that relate fields, on the same raw document (skipping any value
   pydantic already rejected, so one mistake is reported once).
`JobSpecError` carries the list; its `str()` is one `file:line:col: message` line per problem.
Nothing a job file holds makes loading raise anything else: see yaml_positions.py for the limits on
nesting and aliases, templates.py for those on prompt templates; the file itself must be a regular
file of at most MAX_JOB_FILE_BYTES, in UTF-8.

With `check_paths`, local inputs must exist and a local model directory that exists must be a checkpoint
root. A valid file may still get notes (`notes=`): what the run will do differently from what was written
(a t2i/t2v size floored to a multiple of 16) and a hub id that is also a local folder's name.
"""

from __future__ import annotations

import difflib
import glob
import itertools
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from lance_ray.errors import JobFileError
from lance_ray.io.tables import TABLE_FORMATS, SourceError, expand_paths, read_records
from lance_ray.models.lance import resolve_checkpoint
from lance_ray.spec.checks import job_problems, output_path_problems
from lance_ray.spec.inputs import RowMapping, sample_problems
from lance_ray.spec.models import Job, Step, is_uri
from lance_ray.spec.yaml_positions import Mark, PositionMap, load_yaml, position_in

MAX_JOB_FILE_BYTES = 16 * 2**20


# Line breaks (as str.splitlines sees them) and other control characters a message may echo from the
# job file: escaped, so that one problem is always one line.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

_FULL_READ_BYTES = 4 * 1024 * 1024  # tables up to this size are validated whole ...
_SAMPLE_ROWS = 1000  # ... larger ones by their first rows
_SAMPLED_TABLES = 8  # tables validated per step (a step may read thousands of shards)


@dataclass(frozen=True)
class SpecProblem:
    file: str
    line: int
    col: int
    message: str

    def __post_init__(self) -> None:
        one_line = _UNPRINTABLE.sub(lambda m: repr(m.group(0))[1:-1], self.message)
        object.__setattr__(self, "message", one_line)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class JobSpecError(JobFileError):
    """A job file with problems; `problems` lists all of them, in file order."""

    def __init__(self, problems: Iterable[SpecProblem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.col))
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray and multiprocessing pickle exceptions; rebuild from the problems, not the message.
        return (JobSpecError, (self.problems,))


def load_job(path: str | Path, env: Mapping[str, str] | None = None, *, check_paths: bool = False,
             notes: list[SpecProblem] | None = None) -> Job:
    """Load and validate a job file; relative paths in it are resolved against its directory.

    `check_paths` also reports local input paths that do not exist on this machine, mistakes seen in a
    sample of each local input table (an unmapped prompt column, media paths that do not exist ...) and
    local model directories that are not checkpoint roots; the CLI's validate/plan/run turn it on (a file
    can be valid where its inputs are not yet present). `notes`, when given, receives the notes of a
    valid file.
    """
    file = Path(path)
    text = _read_job_file(file, str(path))
    job = load_job_text(text, str(path), file.resolve().parent, env, check_paths=check_paths, notes=notes)
    job._source_path = str(file.resolve())
    return job


def _read_job_file(file: Path, name: str) -> str:
    """The text of a job file: a regular file (not a FIFO, a device or a folder) of at most
    MAX_JOB_FILE_BYTES, in UTF-8."""

    def fail(message: str, where: Mark | None = None) -> JobSpecError:
        where = where or Mark(1, 1)
        return JobSpecError([SpecProblem(name, where.line, where.col, message)])

    try:
        # Checked before opening: opening a FIFO would wait for a writer, reading /dev/zero never ends.
        mode = os.stat(file).st_mode
        if not stat.S_ISREG(mode):
            raise fail(f"cannot read job file: {'a directory' if stat.S_ISDIR(mode) else 'not a regular file'}")
        with open(file, "rb") as f:
            data = f.read(MAX_JOB_FILE_BYTES + 1)
    except OSError as err:
        raise fail(f"cannot read job file: {err.strerror or err}") from None
    if len(data) > MAX_JOB_FILE_BYTES:
        raise fail(_too_big())
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        good = data[: err.start].decode("utf-8")
        where = position_in(good, len(good))
        raise fail(f"the job file is not UTF-8 text (byte 0x{data[err.start]:02x})", where) from None


def _too_big() -> str:
    return (
        f"the job file is larger than {MAX_JOB_FILE_BYTES // 2**20} MiB; put many inline rows in a JSONL, "
        "CSV or Parquet file and give its path as input.path"
    )


def load_job_text(
    text: str,
    filename: str = "<job>",
    base_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    check_paths: bool = False,
    notes: list[SpecProblem] | None = None,
) -> Job:
    """Like `load_job` for text; `filename` is used in messages, `base_dir` for relative paths (default: cwd)."""
    if len(text) > MAX_JOB_FILE_BYTES:  # characters: at least as many bytes
        raise JobSpecError([SpecProblem(filename, 1, 1, _too_big())])
    loaded = load_yaml(text, os.environ if env is None else env)
    positions = loaded.positions

    def problem(loc: tuple[Any, ...], message: str, *, at_key: bool = False) -> SpecProblem:
        mark = positions.locate(loc, at_key=at_key)
        return SpecProblem(filename, mark.line, mark.col, message)

    yaml_problems = [SpecProblem(filename, m.line, m.col, msg) for m, msg in loaded.problems]
    if loaded.data is None:
        raise JobSpecError(yaml_problems)
    context = {"base_dir": os.path.abspath(base_dir or os.getcwd()), "checked_by_loader": True}
    problems: list[SpecProblem] = []
    rejected: list[tuple[Any, ...]] = []  # locations of values pydantic rejected
    job: Job | None = None
    try:
        job = Job.model_validate(loaded.data, context=context)
    except ValidationError as err:
        for e in err.errors(include_url=False):
            problems.append(_pydantic_problem(e, positions, problem))
            rejected.append(tuple(e["loc"]))
    for p in job_problems(loaded.data):
        if not _overlaps(p.path, rejected):  # checks that involve a rejected value would only echo it
            problems.append(
                problem(p.path, f"{_dotted(positions.resolve(p.path))}: {p.message}", at_key=p.at_key)
            )
    if job is not None:  # rules on resolved paths: where outputs are relative to each other and to inputs
        problems += [problem(p.path, f"{_dotted(positions.resolve(p.path))}: {p.message}")
                     for p in output_path_problems(job, loaded.data)]
    if job is not None and check_paths:
        problems += [problem(loc, f"{_dotted(positions.resolve(loc)) or _dotted(loc)}: {message}")
                     for loc, message in _missing_inputs(job, loaded.data)]
        problems += [problem(loc, message) for loc, message in _local_model_problems(job, loaded.data)]
    # A value the loader already flagged (an unset ${VAR}) is garbage: say nothing more about it.
    flagged = {(p.line, p.col) for p in yaml_problems}
    problems = yaml_problems + [p for p in problems if (p.line, p.col) not in flagged]
    if problems or job is None:
        raise JobSpecError(dict.fromkeys(problems))
    if notes is not None:
        found = _floored_sizes(job, loaded.data)
        if check_paths:
            found += _hub_ids_named_like_folders(job, loaded.data, context["base_dir"])
        notes.extend(sorted(dict.fromkeys(problem(loc, message) for loc, message in found),
                            key=lambda n: (n.line, n.col)))
    return job


def _model_loc(data: Any, family: str) -> tuple[Any, ...]:
    """Where a family's model source is written (`models: {image: <source>}` is the short form)."""
    return ("models", family) if isinstance(data["models"][family], str) else ("models", family, "source")


def _written_models(job: Job, data: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """(family, location of its source) of every model the file names and a step uses."""
    written = data.get("models") or {}
    return [(f, _model_loc(data, f)) for f in sorted({step.family for step in job.steps}) if f in written
            and (isinstance(written[f], str) or "source" in written[f])]


def _local_model_problems(job: Job, data: Any) -> list[tuple[tuple[Any, ...], str]]:
    """A local model directory that exists here must be a checkpoint root (`Lance_3B/...` or
    `downloads/Lance_3B/...`). One that does not exist here is left to the run: a job submitted to a cluster
    may name a directory that exists only there."""
    found = []
    for family, loc in _written_models(job, data):
        model = job.model_for(family)
        if model.kind != "local" or model.backend != "lance" or not os.path.isdir(model.source):
            continue
        try:
            resolve_checkpoint(model.source, family)
        except FileNotFoundError as err:
            found.append((loc, f"{_dotted(loc)}: not a Lance checkpoint directory: {err}"))
    return found


def _hub_ids_named_like_folders(job: Job, data: Any, base_dir: str) -> list[tuple[tuple[Any, ...], str]]:
    found = []
    for family, loc in _written_models(job, data):
        source = job.model_for(family).source
        here = os.path.isdir(os.path.join(base_dir, source)) or os.path.isdir(source)  # beside the file, or the cwd
        if job.model_for(family).kind == "hub" and here:
            found.append((loc, f"warning: {source} is read as a Hugging Face repo id, but there is a folder of that "
                               f"name here; write ./{source} for the folder"))
    return found


def _floored_sizes(job: Job, data: Any) -> list[tuple[tuple[Any, ...], str]]:
    """t2i/t2v sizes that the run floors to a multiple of 16 (`TaskSpec.resolve`), where they are written."""
    found = []
    for i, step in enumerate(job.steps):
        resolved = step.params_for(job)
        for name in ("height", "width"):
            if name not in step.spec.params:
                continue
            written = getattr(step.params, name)
            loc = ("steps", i, "params", name)
            if written is None:
                written, loc = getattr(job.defaults, name), ("defaults", name)
            used = getattr(resolved, name)
            if written is not None and written != used:
                found.append((loc, f"note: {name} {written} is floored to {used} (multiple of 16), as the official "
                                   "script does"))
    return found


def _missing_inputs(job: Job, data: Any) -> list[tuple[tuple[Any, ...], str]]:
    """Before any work: local input paths that do not exist, match nothing or are not regular files; and
    for table inputs, a sample of each table judged against what its step reads (`inputs.sample_problems`:
    unmapped or missing prompt / media / mapped columns, template columns, media paths none of which
    exist, repeated ids), each pointing at the job's `input` / `columns` entry.

    URIs (s3://, ...) are read by the run, not here: a job may name a bucket only its cluster can read.
    Model directories are not checked here either, as a job submitted to a cluster may name a
    directory that exists only there.
    """
    found = []
    for i, step in enumerate(job.steps):
        raw = data["steps"][i]["input"].get("path")
        base = ("steps", i, "input")
        local = []
        for j, path in enumerate(step.input.path or []):
            if is_uri(path):
                continue
            loc = (*base, "path", j) if isinstance(raw, list) else (*base, "path")
            if glob.has_magic(path):
                if not glob.glob(path, recursive=True):
                    found.append((loc, f"{path} matches no files"))
                    continue
            elif not os.path.exists(path):
                found.append((loc, f"no such file or directory: {path}"))
                continue
            local.append((loc, path))
        if len(local) == len(step.input.path or []) and local:
            found += _sampled_table_problems(step, base, local)
    return found


def _sampled_table_problems(step: Step, base: tuple[Any, ...], paths: list[tuple[tuple[Any, ...], str]]
                            ) -> list[tuple[tuple[Any, ...], str]]:
    """Reads a sample of the step's local tables: every row of a table up to `_FULL_READ_BYTES`, else its
    first `_SAMPLE_ROWS` rows; at most `_SAMPLED_TABLES` tables a step."""
    found = []
    mapping = RowMapping.for_step(step)
    files = []
    for loc, path in paths:
        try:
            files += [(loc, f) for f in expand_paths([path], step.input.format, step.spec.input_media)]
        except SourceError as e:
            found.append((loc, str(e).removeprefix("input ")))
    tables = [(loc, f) for loc, f in files if f.kind in TABLE_FORMATS][:_SAMPLED_TABLES]
    for loc, file in tables:
        limit = None if (file.size or 0) <= _FULL_READ_BYTES else _SAMPLE_ROWS
        try:
            records = [r.data for r in itertools.islice(read_records(file), limit) if r.data is not None]
        except SourceError as e:
            found.append((loc, str(e).removeprefix("input ")))
            continue
        for problem in sample_problems(mapping, records, os.path.basename(file.uri), file.uri):
            found.append(((*base, *problem.where), problem.message))
    return found


def _overlaps(path: tuple[Any, ...], dropped: list[tuple[Any, ...]]) -> bool:
    """Whether `path` contains, or lies inside, one of the dropped locations."""
    return any(path[: len(loc)] == loc[: len(path)] for loc in dropped)


def _pydantic_problem(error: Any, positions: PositionMap, problem: Any) -> SpecProblem:
    loc: tuple[Any, ...] = tuple(error["loc"])
    kind = error["type"]
    # An unknown or missing key is a problem of the mapping that holds it.
    where = _dotted(positions.resolve(loc[:-1] if kind in ("missing", "extra_forbidden") else loc))
    prefix = f"{where}: " if where else ""
    if kind == "extra_forbidden":
        key = loc[-1]
        hint = _did_you_mean(str(key), _allowed_keys(loc[:-1]))
        return problem(loc, f"{prefix}unknown key '{key}'{hint}", at_key=True)
    if kind == "missing":
        return problem(loc[:-1], f"{prefix}missing required key '{loc[-1]}'")
    value = error.get("input")
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        what = "task" if loc and loc[-1] == "task" else "value"
        return problem(loc, f"{prefix}unknown {what} {value!r}; expected one of {expected}")
    if kind == "value_error":  # our own validators: the message already says what was wrong
        return problem(loc, prefix + error["msg"].removeprefix("Value error, "))
    message = _TYPE_MESSAGES.get(kind, error["msg"])
    if kind == "list_type" and loc and loc[-1] == "path":
        message = "expected a path or a list of paths"
    if value is None or isinstance(value, (str, int, float, bool)):
        message += f" (got {value!r})"
    return problem(loc, prefix + message)


# pydantic's wording names our classes ("instance of InputSpec"); say it in YAML terms.
_TYPE_MESSAGES = {
    "model_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
}


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at `loc` in a Job (for 'did you mean' hints)."""
    model: Any = Job
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; allowed: {', '.join(allowed)}" if allowed else ""


