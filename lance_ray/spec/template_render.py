"""Rendering a prompt template for one row, bounded: no row can hang, flood or crash the stage rendering it.

`input.prompt` templates are user code run once per row, in the source's CPU task. Jinja's sandbox
already blocks unsafe attributes and caps `range()`; `BoundedSandbox` adds limits on what a
template can build, and `render_prompt` limits how long it may run and how much it may write:

* time: `MAX_RENDER_SECONDS` per row. A watchdog thread raises `RenderTimeout` inside the rendering
  thread when the deadline passes (`PyThreadState_SetAsyncExc`: it lands at the next bytecode, so a
  runaway `{% for %}` nest stops; the size limits below keep single C-level operations short);
* output: at most `MAX_RENDERED_CHARS` characters (the task's own prompt cap is smaller and checked
  afterwards, with its own message);
* values: `*`, `+` and `%` on strings/lists, and integer arguments to calls and filters, may not build
  anything over `MAX_VALUE_CHARS`; `**` may not make integers over `MAX_INT_BITS` bits; format widths
  and precisions over `MAX_VALUE_CHARS` are refused (`'%0999999999d' % 1` would allocate 1 GB at once).

Anything a template raises (an undefined column, `ZeroDivisionError`, `MemoryError`, `RecursionError`,
a refused operation) becomes `PromptTemplateError` with a one-line message: the row gets `error`, the
job goes on.
"""

from __future__ import annotations

import ctypes
import functools
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jinja2
import jinja2.sandbox

MAX_RENDER_SECONDS = 2.0
MAX_RENDERED_CHARS = 100_000
MAX_VALUE_CHARS = 1_000_000
MAX_INT_BITS = 100_000

_SIZED = (str, bytes, list, tuple)
# A printf width/precision (`%-12.3f`) or a str.format spec (`{:>12}`): the numbers must stay small.
_PRINTF_SPEC = re.compile(r"%[-#0 +]*(\d+|\*)?(?:\.(\d+|\*))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*:[^{}]*?(\d+)[^{}]*\}")


class PromptTemplateError(ValueError):
    """A row's prompt template failed: the message is the row's error."""


class RenderTimeout(Exception):
    """Raised inside a rendering thread whose deadline passed."""


def _refuse(message: str) -> None:
    raise jinja2.sandbox.SecurityError(message)


def _check_size(value: Any) -> Any:
    if isinstance(value, _SIZED) and len(value) > MAX_VALUE_CHARS:
        _refuse(f"a value of more than {MAX_VALUE_CHARS} items is not allowed in a prompt template")
    return value


def _check_format_string(text: Any, spec: re.Pattern[str]) -> None:
    if not isinstance(text, str):
        return
    for match in spec.finditer(text):
        for number in match.groups():
            if number and number.isdigit() and int(number) > MAX_VALUE_CHARS:
                _refuse(f"a format width or precision over {MAX_VALUE_CHARS} is not allowed")


def _check_int_args(args: tuple, kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_VALUE_CHARS:
            _refuse(f"an integer argument over {MAX_VALUE_CHARS} is not allowed in a prompt template")


def _bounded_filter(fn: Callable) -> Callable:
    @functools.wraps(fn)  # keeps Jinja's pass_context/pass_environment marker
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_int_args(args[1:], kwargs)  # args[0] is the filtered value (or the context/environment)
        if fn.__name__ == "do_format" and len(args) > 0:
            _check_format_string(next((a for a in args if isinstance(a, str)), None), _PRINTF_SPEC)
        return _check_size(fn(*args, **kwargs))

    return wrapper


def _power(left: Any, right: Any) -> Any:
    growing = isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0
    if growing and right * math.log2(abs(left)) > MAX_INT_BITS:
        _refuse(f"a power with more than {MAX_INT_BITS} bits is not allowed in a prompt template")
    return left**right


def _times(left: Any, right: Any) -> Any:
    sized, count = (left, right) if isinstance(left, _SIZED) else (right, left)
    if isinstance(sized, _SIZED) and isinstance(count, int) and len(sized) * count > MAX_VALUE_CHARS:
        _refuse(f"a value of more than {MAX_VALUE_CHARS} items is not allowed in a prompt template")
    return left * right


def _plus(left: Any, right: Any) -> Any:
    if isinstance(left, _SIZED) and isinstance(right, _SIZED) and len(left) + len(right) > MAX_VALUE_CHARS:
        _refuse(f"a value of more than {MAX_VALUE_CHARS} items is not allowed in a prompt template")
    return left + right


def _modulo(left: Any, right: Any) -> Any:
    _check_format_string(left, _PRINTF_SPEC)
    return _check_size(left % right)


class BoundedSandbox(jinja2.sandbox.SandboxedEnvironment):
    """Jinja's sandbox with the size limits above on operators, calls, filters and str.format."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.binop_table.update({"*": _times, "**": _power, "+": _plus, "%": _modulo})
        self.filters = {name: _bounded_filter(fn) for name, fn in self.filters.items()}
        self.globals.pop("lipsum", None)  # kilobytes of lorem ipsum per call: nothing a prompt needs

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's names)
        _check_int_args(args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        _check_format_string(value.__self__, _FORMAT_SPEC)
        return wrapped


class _Watchdog:
    """One daemon thread per process that interrupts renders running past their deadline. It checks
    every `_TICK` seconds, so starting and ending a render costs two lock round trips and no wake-up."""

    _TICK = 0.1

    def __init__(self) -> None:
        self._deadlines: dict[int, float] = {}  # rendering thread id -> deadline (time.monotonic)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Raises RenderTimeout in this thread when the body runs longer than `seconds`."""
        tid = threading.get_ident()
        with self._lock:
            self._deadlines[tid] = time.monotonic() + seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="lance-ray-template-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                if self._deadlines.pop(tid, None) is None:  # it fired: drop the exception if not yet raised
                    _set_async_exc(tid, None)

    def _watch(self) -> None:
        while True:
            time.sleep(self._TICK)
            now = time.monotonic()
            with self._lock:
                for tid, deadline in list(self._deadlines.items()):
                    if now >= deadline:
                        del self._deadlines[tid]
                        _set_async_exc(tid, RenderTimeout)


def _set_async_exc(tid: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None if exc is None else ctypes.py_object(exc))


_WATCHDOG = _Watchdog()


def render_prompt(template: jinja2.Template, row: Mapping[str, Any]) -> str:
    """`template` rendered over `row` within the limits above; raises `PromptTemplateError`."""
    try:
        with _WATCHDOG.deadline(MAX_RENDER_SECONDS):
            pieces, size = [], 0
            for piece in template.generate(row):
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise PromptTemplateError(f"prompt template renders more than {MAX_RENDERED_CHARS} characters")
                pieces.append(piece)
            return "".join(pieces)
    except PromptTemplateError:
        raise
    except RenderTimeout:
        raise PromptTemplateError(f"prompt template took longer than {MAX_RENDER_SECONDS:g} s") from None
    except jinja2.TemplateError as e:  # an undefined column, a refused operation
        raise PromptTemplateError(f"prompt template: {e}") from None
    except Exception as e:  # ZeroDivisionError, MemoryError, RecursionError, TypeError ... in the template
        raise PromptTemplateError(f"prompt template: {type(e).__name__}: {e}") from None

