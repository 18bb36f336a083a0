"""Prompt templates: `input.prompt` may be a Jinja template over the row's columns.

Templates render in Jinja's sandbox with undefined names raising (a misspelt column must not render
as an empty prompt), with the limits of `template_render.BoundedSandbox` on what they may build; a
row's prompt is rendered by `template_render.render_prompt` (time and output bounded).
"""

from __future__ import annotations

import jinja2
import jinja2.meta

from lance_ray.spec.template_render import BoundedSandbox

_ENV = BoundedSandbox(undefined=jinja2.StrictUndefined, autoescape=False)


def compile_prompt_template(text: str) -> jinja2.Template:
    """The Jinja template for `input.prompt`; undefined columns raise instead of rendering ''."""
    return _ENV.from_string(text)


def check_prompt_template(text: str) -> None:
    """Raises ValueError for a template that cannot compile (syntax, unknown filter or test)."""
    try:
        _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"bad prompt template (template line {err.lineno}): {err.message}") from None


def prompt_template_columns(text: str) -> set[str]:
    """Names of the row columns a prompt template reads (empty for a constant prompt)."""
    return jinja2.meta.find_undeclared_variables(_ENV.parse(text))
