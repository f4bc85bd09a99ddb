"""PURE: the Jinja2 layer for the operator's per-tier title/body overrides.

Templates run in Jinja2's sandbox (no attribute access to internals, no imports) and get their
variables and helpers from ``render``; this module only compiles, renders and checks them.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError, pass_context
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from referral_watch.text import md

__all__ = ["render_template", "template_problem"]

_MAX_REPEAT = 10_000


class _Sandbox(SandboxedEnvironment):
    """The sandbox, also refusing '"x" * 10**9'-style output bombs."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 100:
            raise SecurityError("exponent too large")
        if operator == "*" and _repeat_size(left, right) > _MAX_REPEAT:
            raise SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


def _repeat_size(left: Any, right: Any) -> int:
    """The length of a string or list repeated by a number; 0 for plain arithmetic."""
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, str | list | tuple) and isinstance(count, int):
            return len(sequence) * count
    return 0


@lru_cache(maxsize=1)
def _sandbox() -> SandboxedEnvironment:
    env = _Sandbox(
        undefined=StrictUndefined,  # a typo in a variable name is an error check-config shows
        autoescape=False,  # Markdown, not HTML: user text is escaped with the md filter
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["md"] = _escape
    return env


@pass_context
def _escape(context: Context, value: Any) -> str:
    """``|md``: the channel's own escaping, which render puts in the context as ``md``."""
    escape = context.get("md")
    return str(escape(value)) if callable(escape) else md(value)


@lru_cache(maxsize=256)
def _template(source: str) -> Template:
    return _sandbox().from_string(source)


def render_template(source: str, context: dict[str, Any]) -> str:
    """The template's text for one message (raises what the template raises)."""
    return _template(source).render(context)


def template_problem(source: str, contexts: Iterable[dict[str, Any]]) -> str | None:
    """Why ``source`` cannot be used, tried against each context; None when it renders."""
    try:
        _template(source)
    except TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    for context in contexts:
        try:
            text = render_template(source, context)
        except SecurityError as exc:
            return f"unsafe template: {exc}"
        except TemplateError as exc:
            return str(exc.message or exc)
        except Exception as exc:  # helpers misused, arithmetic on a missing value...
            return f"{type(exc).__name__}: {exc}"
        if not text.strip():
            return "renders as empty text"
    return None
