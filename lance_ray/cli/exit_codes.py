"""Exit codes of the `lance-ray` command, and the one place that turns errors into them.

Commands return EXIT_OK or EXIT_ROWS_FAILED and raise for everything else; `run_command` catches
what they raise, prints one line on stderr and returns the code that `EXIT_CODE_FOR_ERROR` gives.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable

from lance_ray.errors import ClusterError, JobFileError, LanceRayError

EXIT_OK = 0
EXIT_ROWS_FAILED = 1  # the run finished; some rows failed and are in the output with `error` set
EXIT_BAD_JOB = 2  # bad job file or arguments (argparse's own usage errors exit 2 as well)
EXIT_RUN_FAILED = 3  # the run itself failed, or something unexpected went wrong
EXIT_CLUSTER = 4  # a Ray cluster could not be reached or refused the request
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, what shells report for a process killed by it

# The one table. Checked in order and the first class the error is an instance of wins, so a
# subclass must come before its base. Exceptions that are not LanceRayError exit EXIT_RUN_FAILED.
EXIT_CODE_FOR_ERROR: tuple[tuple[type[LanceRayError], int], ...] = (
    (JobFileError, EXIT_BAD_JOB),
    (ClusterError, EXIT_CLUSTER),
    (LanceRayError, EXIT_RUN_FAILED),  # RunError and any other kind
)

# What a run interrupted by Ctrl-C leaves behind, unless the command says something more precise
# by raising KeyboardInterrupt("its own note").
DEFAULT_INTERRUPT_NOTE = "rows committed so far are kept"

EXIT_CODES_HELP = """\
exit status:
  0    success
  1    the run finished but some rows failed (they are in the output with `error` set)
  2    bad job file or arguments; nothing ran
  3    the run itself failed (rows committed so far are kept); -v shows the traceback
  4    a Ray cluster could not be reached or refused the request
  130  interrupted (Ctrl-C)"""

log = logging.getLogger("lance_ray.cli")


def exit_code_for_error(error: BaseException) -> int:
    for error_class, code in EXIT_CODE_FOR_ERROR:
        if isinstance(error, error_class):
            return code
    return EXIT_RUN_FAILED


def error_message(command: str, error: BaseException) -> str:
    """The line printed for `error`. Job file errors carry their own `file:line:col` prefix."""
    code = exit_code_for_error(error)
    if code == EXIT_BAD_JOB:
        return str(error)
    if code == EXIT_CLUSTER:
        return f"lance-ray {command}: {error}"
    return f"lance-ray {command}: failed: {describe_failure(error)}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last line of a Python traceback: `package.module.SomeError: message` (or a bare `SomeError`).
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))(?:: (.*))?$")


def describe_failure(error: BaseException) -> str:
    """`Type: message` on one line. An error from Ray (or one wrapping it) is reduced to the error raised
    inside the Ray task or actor: Ray's own message carries the remote traceback, which -v shows."""
    ray_error = next((e for e in _chain(error) if type(e).__module__.startswith("ray.")), None)
    if ray_error is None:
        return _first_line(f"{type(error).__name__}: {error}")
    reason = _remote_reason(ray_error)
    if ray_error is error:
        return reason
    head = _first_line(f"{type(error).__name__}: {error}").split(f"{type(ray_error).__name__}:")[0].rstrip()
    return f"{head} {reason}"


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _first_line(text: str) -> str:
    lines = _ANSI.sub("", text).strip().splitlines() or [""]
    return lines[0] + (" (more with -v)" if len(lines) > 1 else "")


def _remote_reason(ray_error: BaseException) -> str:
    """What failed inside Ray, from the error object when Ray kept it, else from its traceback text."""
    text = _ANSI.sub("", getattr(ray_error, "error_msg", None) or str(ray_error))
    cause = getattr(ray_error, "cause", None)
    if isinstance(cause, BaseException) and not type(cause).__module__.startswith("ray."):
        inner = _first_line(f"{type(cause).__name__}: {cause}")
    else:
        found = [m for m in map(_EXCEPTION_LINE.match, reversed(text.splitlines())) if m]
        inner = f"{found[0].group(1)}: {found[0].group(2) or ''}".rstrip(": ") if found else _first_line(text)
    if getattr(ray_error, "actor_init_failed", False):
        what = ("a Lance model worker could not load its checkpoint" if "LanceWorker" in text
                else "a Ray actor could not start")
    else:
        what = f"Ray {type(ray_error).__name__}"
    return f"{what}: {inner}"


def run_command(command: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs one command; whatever it raises becomes a message on stderr and an exit code."""
    try:
        return func(args)
    except KeyboardInterrupt as interrupt:
        # No traceback: where the interrupt happened to land says nothing useful to the user.
        note = str(interrupt) or DEFAULT_INTERRUPT_NOTE
        print(f"lance-ray {command}: interrupted; {note}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        log.debug("lance-ray %s failed", command, exc_info=True)  # the traceback, shown with -v
        print(error_message(command, error), file=sys.stderr)
        return exit_code_for_error(error)
