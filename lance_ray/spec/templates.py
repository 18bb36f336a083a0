"""Prompt templates: `input.prompt` may be a Jinja template over the row's columns.

Templates render in Jinja's sandbox (no attribute escapes: `''.__class__` is refused) with undefined
names raising (a misspelt column must not render as an empty prompt), and within limits, because a
template runs once per row in the driver and one careless line must cost a row, not the run:

* every loop iteration, call, filter and attribute lookup is a step; a render may take at most
  `MAX_RENDER_STEPS` steps and `MAX_RENDER_SECONDS` (nested `range()` loops);
* no string or list the template builds, and not the prompt itself, may exceed `MAX_VALUE_SIZE`
  characters or items; operations that would exceed it are refused before they allocate
  (`{{ subject * 10**8 }}`, `"x".center(10**9)`, `"{:>999999999}"`, exponentially doubling lists);
* integers may not grow past `MAX_INT_BITS` bits (`2 ** (10 ** 9)` would take minutes to compute).

`PromptTemplate.render` raises `jinja2.TemplateError` for every failure, including the ones Python
raises in the middle of a template (`{{ 1 / 0 }}`): `TemplateLimitError` for a limit, and
`TemplateRenderError` for any other exception. A row whose template fails becomes an error row.

At load time (`check_prompt_template`) a template must compile (syntax, known filters and tests),
be at most `MAX_TEMPLATE_CHARS` long, and, when it reads no column, render: a constant template that
fails would fail on every row.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox

MAX_TEMPLATE_CHARS = 64 * 1024
MAX_RENDER_STEPS = 100_000
MAX_RENDER_SECONDS = 5.0
MAX_VALUE_SIZE = 1_000_000  # characters of a string, or items of a (nested) list/dict
MAX_INT_BITS = 100_000

# Filters and str methods whose integer arguments size their result (a width, a count of pieces).
_SIZING_FILTERS = frozenset({"center", "indent", "wordwrap", "truncate", "batch", "slice"})
_SIZING_STR_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# str methods whose result can be far larger than their inputs in ways not worth bounding here.
_REFUSED_STR_METHODS = frozenset({"translate", "maketrans"})
# A width or precision of 7+ digits in a format spec, or one taken from the arguments (`%*s`, `{:{}}`).
_HUGE_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(?:\*|\d{7,}|\d*\.(?:\*|\d{7,}))|\{[^{}]*:[^{}]*(?:\d{7,}|\{)")
_COUNT_LOOP = "__lance_ray_count_loop"  # the filter wrapped around every {% for %} iterable


class TemplateLimitError(jinja2.sandbox.SecurityError):
    """A template went past one of the limits above."""


class TemplateRenderError(jinja2.TemplateRuntimeError):
    """A template raised an exception of Python's own (`{{ 1 / 0 }}`, an integer too big to print)."""


@dataclass
class _Budget:
    """What one render may still spend."""

    steps: int = MAX_RENDER_STEPS
    deadline: float = field(default_factory=lambda: time.monotonic() + MAX_RENDER_SECONDS)

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise TemplateLimitError(f"the template takes more than {MAX_RENDER_STEPS:,} steps")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the template takes longer than {MAX_RENDER_SECONDS:g} s to render")


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("lance_ray_template_budget")


def _step() -> None:
    budget = _BUDGET.get(None)
    if budget is None:  # Jinja evaluating constant parts while compiling: leave them to the render
        raise TemplateLimitError("only evaluated while rendering")
    budget.step()


_CONTAINERS = (Mapping, list, tuple, set, frozenset)


def _children(value: Any) -> list[Any]:
    return [*value.keys(), *value.values()] if isinstance(value, Mapping) else list(value)


def _size(value: Any) -> int:
    """Characters plus items of `value`, nested containers counted in full: a list holding one list
    twice counts it twice, as printing it would. Each distinct container is visited once, so a
    structure that doubles by sharing (`[x, x]`, repeated) costs its depth, not its printed size."""
    if isinstance(value, str | bytes):
        return len(value)
    if not isinstance(value, _CONTAINERS):
        return 0
    sizes: dict[int, int] = {}  # id -> size of the containers finished so far
    open_ids: set[int] = set()  # containers on the stack (a list that holds itself counts once)
    stack: list[tuple[Any, list[Any] | None]] = [(value, None)]
    while stack:
        item, children = stack.pop()
        if children is None:  # first visit: schedule the children, then come back
            if id(item) in sizes or id(item) in open_ids:
                continue
            children = _children(item)
            open_ids.add(id(item))
            stack.append((item, children))
            stack.extend((c, None) for c in children if isinstance(c, _CONTAINERS))
            continue
        total = len(children)
        for c in children:
            total += len(c) if isinstance(c, str | bytes) else sizes.get(id(c), 0)
        sizes[id(item)] = total
        open_ids.discard(id(item))
    return sizes[id(value)]


def _check_size(value: Any, what: str = "a value") -> Any:
    if _size(value) > MAX_VALUE_SIZE:
        raise TemplateLimitError(f"{what} in the template grows past {MAX_VALUE_SIZE:,} characters or items")
    return value


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _HUGE_FORMAT_WIDTH.search(fmt):
        raise TemplateLimitError("format widths of a million or more, or taken from arguments, are not allowed")


def _check_sizing_ints(name: str, args: Iterable[Any]) -> None:
    for arg in args:
        if isinstance(arg, int) and abs(arg) > MAX_VALUE_SIZE:
            raise TemplateLimitError(f"{name}({arg}) would build a value larger than {MAX_VALUE_SIZE:,}")


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        pieces = text.count(old) if old else len(text) + 1
        if len(text) + pieces * len(new) > MAX_VALUE_SIZE:
            raise TemplateLimitError(f"replace() would build a string larger than {MAX_VALUE_SIZE:,} characters")


def _check_join(separator: Any, items: list[Any]) -> None:
    if isinstance(separator, str) and len(separator) * max(len(items) - 1, 0) + _size(items) > MAX_VALUE_SIZE:
        raise TemplateLimitError(f"join() would build a string larger than {MAX_VALUE_SIZE:,} characters")


_PASSED_BY_JINJA = (jinja2.Environment, jinja2.runtime.Context, jinja2.nodes.EvalContext)


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that counts as a step and refuses arguments or results past the size limit."""

    @functools.wraps(func)  # keeps `jinja_pass_arg`: Jinja then passes the environment/context as before
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _step()
        values = [a for a in args if not isinstance(a, _PASSED_BY_JINJA)]
        for value in (*values, *kwargs.values()):
            _check_size(value, f"the input of |{name}")
        if name in _SIZING_FILTERS:
            _check_sizing_ints(f"|{name}", [*values[1:], *kwargs.values()])
        elif name == "format" and values:
            _check_format(values[0])
        elif name == "replace" and len(values) >= 3:
            _check_replace(*values[:3])
        elif name == "join" and values:
            items = list(values[0])
            _check_join(values[1] if len(values) > 1 else kwargs.get("d", ""), items)
            args = tuple(items if a is values[0] else a for a in args)
        return _check_size(func(*args, **kwargs), f"the result of |{name}")

    return bounded


def _count_loop(iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        _step()
        yield item


def _bounded_power(base: Any, exponent: Any) -> Any:
    if (isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1
            and exponent * abs(base).bit_length() > MAX_INT_BITS):
        raise TemplateLimitError(f"{base} ** {exponent} is larger than {MAX_INT_BITS:,} bits")
    return base**exponent


def _bounded_multiply(left: Any, right: Any) -> Any:
    for sequence, count in ((left, right), (right, left)):
        if (isinstance(sequence, str | list | tuple) and isinstance(count, int)
                and _size(sequence) * max(count, 0) > MAX_VALUE_SIZE):
            raise TemplateLimitError(
                f"repeating a value {count:,} times builds more than {MAX_VALUE_SIZE:,} characters or items"
            )
    if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"a product larger than {MAX_INT_BITS:,} bits")
    return left * right


def _bounded_modulo(left: Any, right: Any) -> Any:
    _check_format(left)  # "%999999999s" % x
    return left % right


class _BoundedEnvironment(jinja2.sandbox.SandboxedEnvironment):
    """Jinja's sandbox with the limits of the module doc."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, autoescape=False)
        self.binop_table.update({"*": _bounded_multiply, "**": _bounded_power, "%": _bounded_modulo})
        self.filters = {name: _bounded_filter(name, func) for name, func in self.filters.items()}
        self.filters[_COUNT_LOOP] = _count_loop
        del self.globals["lipsum"]  # n paragraphs of filler text: no use in a prompt, unbounded in size

    def _generate(self, source: jinja2.nodes.Template, name: str | None, filename: str | None,
                  defer_init: bool = False) -> str:
        # Every {% for %} iterates through `_count_loop`, so each iteration is a step.
        for loop in source.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Filter(loop.iter, _COUNT_LOOP, [], [], None, None, lineno=loop.lineno)
        return super()._generate(source, name, filename, defer_init)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _step()
        return _check_size(super().call_binop(context, operator, left, right), f"the result of {operator!r}")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _step()
        return _check_size(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _step()
        return _check_size(super().getitem(obj, argument))

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _step()
        for value in (*args, *kwargs.values()):
            _check_size(value, "an argument")
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format in a function
        owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
        if isinstance(owner, str) and isinstance(target, types.BuiltinMethodType):
            if name in _REFUSED_STR_METHODS:
                raise TemplateLimitError(f"str.{name}() is not available in prompt templates")
            if name in _SIZING_STR_METHODS:
                _check_sizing_ints(f"str.{name}", [*args, *kwargs.values()])
            elif name in ("format", "format_map"):
                _check_format(owner)
            elif name == "replace" and len(args) >= 2:
                _check_replace(owner, args[0], args[1])
            elif name == "join" and args:
                items = list(args[0])
                _check_join(owner, items)
                args = (items, *args[1:])
        result = super().call(__context, __obj, *args, **kwargs)
        return _check_size(result, f"the result of {name or 'a call'}()")


_ENV = _BoundedEnvironment()


class PromptTemplate:
    """A compiled prompt template; `render` applies the limits of the module doc."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._template = _ENV.from_string(text)

    def render(self, *args: Any, **kwargs: Any) -> str:
        """Render with the row's columns (a mapping, and/or keyword arguments, as Jinja's `render`).

        Raises jinja2.TemplateError for any failure (see the module doc).
        """
        token = _BUDGET.set(_Budget())
        try:
            size, chunks = 0, []
            for chunk in self._template.generate(*args, **kwargs):
                size += len(chunk)
                if size > MAX_VALUE_SIZE:
                    raise TemplateLimitError(f"the prompt grows past {MAX_VALUE_SIZE:,} characters")
                chunks.append(chunk)
            return "".join(chunks)
        except jinja2.TemplateError:
            raise
        except RecursionError:
            raise TemplateRenderError("the template recurses too deeply") from None
        except Exception as exc:  # Python's own errors inside the template: one row's problem
            message = str(exc).split("; use sys.set_int_max_str_digits")[0]  # advice not for a job file
            raise TemplateRenderError(f"{type(exc).__name__}: {message}") from None
        finally:
            _BUDGET.reset(token)


def compile_prompt_template(text: str) -> PromptTemplate:
    """The template for `input.prompt`; undefined columns raise instead of rendering ''."""
    return PromptTemplate(text)


def check_prompt_template(text: str) -> None:
    """Raises ValueError for a template that is too long, cannot compile (syntax, unknown filter or
    test), or reads no column and fails to render."""
    if len(text) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"prompt template is longer than {MAX_TEMPLATE_CHARS:,} characters")
    try:
        template = PromptTemplate(text)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"bad prompt template (template line {err.lineno}): {err.message}") from None
    # Jinja only reports an unknown filter or test inside {% if %} when that branch runs.
    syntax = _ENV.parse(text)
    for kind, node_type, known in (("filter", jinja2.nodes.Filter, _ENV.filters),
                                   ("test", jinja2.nodes.Test, _ENV.tests)):
        for node in syntax.find_all(node_type):
            if node.name not in known or node.name == _COUNT_LOOP:
                raise ValueError(f"bad prompt template (template line {node.lineno}): No {kind} named {node.name!r}")
    if not prompt_template_columns(text):
        try:
            template.render()
        except jinja2.TemplateError as err:
            raise ValueError(f"prompt template fails to render: {err.message or type(err).__name__}") from None


def prompt_template_columns(text: str) -> set[str]:
    """Names of the row columns a prompt template reads (empty for a constant prompt)."""
    return jinja2.meta.find_undeclared_variables(_ENV.parse(text))
