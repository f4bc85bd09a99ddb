"""PURE: the Jinja2 layer for the operator's per-tier title/body overrides.

Templates run in Jinja2's sandbox (no attribute access to internals, no imports) and get their
variables and helpers from ``render``; this module only compiles, renders and checks them.

The sandbox keeps a template from reading what it must not; it does not keep it from eating
the machine (``'a'.ljust(10**9)``, ``'%400000000d' % 1``, a string doubled in a loop, nested
``range(100000)`` loops). So every render runs on a budget, counted in work, never in time (the
pure core reads no clock): each string, list or number a template builds stays under
``MAX_SIZE`` characters/items (or ``MAX_BITS``), every loop of one render together runs at most
``MAX_STEPS`` times, and the output stops at ``MAX_SIZE`` characters. A template over budget
raises SecurityError: ``check-config`` reports it, and at run time the standard wording goes out.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache, wraps
from typing import Any

from jinja2 import (
    StrictUndefined,
    Template,
    TemplateError,
    TemplateSyntaxError,
    nodes,
    pass_context,
)
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from referral_watch.text import md

__all__ = ["MAX_SIZE", "MAX_STEPS", "render_template", "template_problem"]

MAX_SIZE = 100_000  # characters of any string (items of any list) a template builds or prints
MAX_STEPS = 10_000  # loop iterations of one render, all loops together
MAX_BITS = 100_000  # size of any integer a template computes
_MAX_EXPONENT = 100

_steps: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "referral_watch_template_steps", default=None
)


def _sized(value: Any) -> Any:
    """``value``, after checking that it is not a bomb in the making."""
    if isinstance(value, str | bytes | list | tuple | dict | set) and len(value) > MAX_SIZE:
        raise SecurityError(f"the template builds more than {MAX_SIZE:,} characters or items")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_BITS:
        raise SecurityError("the template computes too large a number")
    return value


def _step(count: int = 1) -> None:
    left = _steps.get()
    if left is None:
        return
    left[0] -= count
    if left[0] < 0:
        raise SecurityError(f"the template loops more than {MAX_STEPS:,} times")


def _counted(iterable: Any) -> Iterator[Any]:
    """A loop's iterable, each item charged to the render's step budget."""
    for item in iterable:
        _step()
        yield item


def _bounded_range(*args: int) -> range:
    """``range`` charged up front: ``range(100000)`` refuses before it starts."""
    numbers = range(*args)
    if len(numbers) > MAX_STEPS:
        raise SecurityError(f"range of {len(numbers):,} items (at most {MAX_STEPS:,})")
    return numbers


# Widths and precisions in %-formats ('%400000000d', '%.9s') and in str.format specs
# ('{:>400000000}').
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*|\*)(?:\.(\d*|\*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")
_DIGITS = re.compile(r"\d+")


def _check_arguments(args: Iterable[Any]) -> None:
    """Refuse a width, count or fill size that alone would make a bomb (ljust(10**9))."""
    for value in args:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
            raise SecurityError(f"argument {value} is too large (at most {MAX_SIZE:,})")


def _check_format(text: Any, values: Any = ()) -> None:
    """Refuse a %-format or str.format string with a width or precision over MAX_SIZE (also
    one given by a '*' among ``values``)."""
    if not isinstance(text, str):
        return
    numbers = [n for spec in _PERCENT_SPEC.findall(text) for n in spec if n.isdigit()]
    numbers += [n for spec in _BRACE_SPEC.findall(text) for n in _DIGITS.findall(spec)]
    if any(int(n) > MAX_SIZE for n in numbers):
        raise SecurityError(f"a format width over {MAX_SIZE:,}")
    if "*" in text:
        _check_arguments(values if isinstance(values, tuple) else (values,))


def _estimate(obj: Any, args: tuple[Any, ...]) -> int:
    """The size a str method call would produce, where it can be much larger than its input."""
    owner = getattr(getattr(obj, "__wrapped__", obj), "__self__", None)
    name = getattr(obj, "__name__", "")
    if not isinstance(owner, str):
        return 0
    if name == "expandtabs":
        size = int(args[0]) if args and isinstance(args[0], int) else 8
        return len(owner) + owner.count("\t") * size
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str):
        new = args[1] if isinstance(args[1], str) else ""
        return len(owner) + owner.count(args[0]) * max(len(new) - len(args[0]), 0) + len(new)
    if name in ("format", "format_map"):
        _check_format(owner)
    return 0


class _Sandbox(SandboxedEnvironment):
    """The sandbox on a budget (see the module's docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%", "<<"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator in ("**", "<<"):
            _check_power(operator, left, right)
        if operator == "*" and _repeat_size(left, right) > MAX_SIZE:
            raise SecurityError("repetition too large")
        if operator == "%":
            _check_format(left, right)
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(getattr(__obj, "__self__", None), str | bytes | list | dict | set):
            _check_arguments((*args, *kwargs.values()))  # 'a'.ljust(10**9), l.extend(...)
        if _estimate(__obj, args) > MAX_SIZE:
            raise SecurityError(f"the template builds more than {MAX_SIZE:,} characters")
        result = SandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, list | dict | set):
            _sized(owner)  # l.extend(l) grows the list in place
        return _sized(result)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """The parsed template, with every loop counted and every ``~`` concatenation sized."""
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.Name("_rw_counted", "load"), [loop.iter], [], None, None)
        for concat in list(tree.find_all(nodes.Concat)):
            concat.nodes = [
                nodes.Call(nodes.Name("_rw_sized", "load"), [node], [], None, None)
                for node in concat.nodes
            ]
        return tree


def _check_power(operator: str, left: Any, right: Any) -> None:
    """Refuse 9 ** 9999999 and 1 << 10**9 before Python starts on them."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return
    if operator == "**" and abs(right) > _MAX_EXPONENT:
        raise SecurityError("exponent too large")
    factor, growth = (abs(right), 0) if operator == "**" else (1, abs(right))
    if abs(left).bit_length() * factor + growth > MAX_BITS:
        raise SecurityError("the template computes too large a number")


def _repeat_size(left: Any, right: Any) -> int:
    """The length of a string or list repeated by a number; 0 for plain arithmetic."""
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, str | list | tuple) and isinstance(count, int):
            return len(sequence) * count
    return 0


# Filters whose output grows with a number argument: center(width), indent(width),
# batch(count, fill), slice(count, fill), wordwrap(width), truncate(length).
_SIZED_BY_ARGUMENT = frozenset(
    {
        "do_center",
        "do_indent",
        "do_batch",
        "do_slice",
        "sync_do_slice",
        "do_wordwrap",
        "do_truncate",
    }
)


def _guarded(function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that refuses bomb-sized arguments (``center(10**9)``, ``batch(10**9, 'x')``)
    and results; Jinja's pass_context marks survive the wrapping."""

    @wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if function.__name__ in _SIZED_BY_ARGUMENT:
            _check_arguments((*args[1:], *kwargs.values()))
        if function.__name__ == "do_format" and args:
            _check_format(args[0], tuple(args[1:]))
        return _sized(function(*args, **kwargs))

    return guarded


@lru_cache(maxsize=1)
def _sandbox() -> SandboxedEnvironment:
    env = _Sandbox(
        undefined=StrictUndefined,  # a typo in a variable name is an error check-config shows
        autoescape=False,  # Markdown, not HTML: user text is escaped with the md filter
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters = {name: _guarded(f) for name, f in env.filters.items()}
    env.filters["md"] = _escape
    env.globals["range"] = _bounded_range
    env.globals.pop("lipsum", None)  # lorem ipsum of any length: no use in an alert
    env.globals["_rw_counted"] = _counted
    env.globals["_rw_sized"] = _sized
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
    """The template's text for one message, within the budget (raises what the template
    raises, SecurityError when it goes over budget)."""
    token = _steps.set([MAX_STEPS])
    try:
        size, chunks = 0, []
        for chunk in _template(source).generate(context):
            size += len(chunk)
            if size > MAX_SIZE:
                raise SecurityError(f"the template writes more than {MAX_SIZE:,} characters")
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _steps.reset(token)


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
