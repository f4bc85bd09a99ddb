"""The OData ``$filter`` subset the sandbox understands, compiled to a predicate on a raw record.

eq, ne, and, or, not, parentheses, string/number/true/false/null literals, nested paths
(``customerProfile/address/country``) and lambdas (``team/any(t:t/email eq 'x')``). A filter it
cannot parse raises :class:`FilterError`, which the sandbox answers with 400 invalidRequest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class FilterError(ValueError):
    """A $filter the sandbox cannot parse (answered with 400 invalidRequest)."""


Predicate = Callable[[dict[str, Any]], bool]
Scope = dict[str, Any]  # lambda variable -> the collection item it stands for
_Test = Callable[[dict[str, Any], Scope], bool]
_Get = Callable[[dict[str, Any], Scope], Any]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^']|'')*')
      | (?P<number>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w.])
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[()/:])
    )""",
    re.VERBOSE,
)
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}


@dataclass(frozen=True)
class _Tok:
    kind: str  # "string" | "number" | "name" | "punct" | "end"
    text: str
    pos: int


@dataclass(frozen=True)
class _Lambda:
    """A path ending in any(...)/all(...): a test, not a value."""

    test: _Test


def _tokenize(text: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    text = text.rstrip()
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.lastgroup is None:
            where = len(text) - len(text[pos:].lstrip())
            raise FilterError(f"unexpected character at position {where}: {text[where:][:10]!r}")
        kind = match.lastgroup
        tokens.append(_Tok(kind, match.group(kind), match.start(kind)))
        pos = match.end()
    tokens.append(_Tok("end", "", len(text)))
    return tokens


def _same(left: Any, right: Any) -> bool:
    """OData equality: case-sensitive, and true is not 1."""
    if isinstance(left, bool) != isinstance(right, bool):
        return False
    return bool(left == right)


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _path_getter(steps: list[str], variables: list[str]) -> _Get:
    head, rest = steps[0], steps[1:]
    from_scope = head in variables

    def get(record: dict[str, Any], scope: Scope) -> Any:
        value: Any = scope.get(head) if from_scope else record.get(head)
        for step in rest:
            if not isinstance(value, dict):
                return None
            value = value.get(step)
        return value

    return get


def _constant(value: Any) -> _Get:
    return lambda _record, _scope: value


class _Parser:
    """Recursive descent: or > and > not > comparison / lambda / parentheses."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.index = 0
        self.variables: list[str] = []  # lambda variables in force

    def parse(self) -> _Test:
        test = self._or()
        if self._peek().kind != "end":
            self._fail("expected 'and', 'or' or the end")
        return test

    def _peek(self) -> _Tok:
        return self.tokens[self.index]

    def _next(self) -> _Tok:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token

    def _accept(self, kind: str, text: str) -> bool:
        token = self._peek()
        if token.kind == kind and token.text == text:
            self.index += 1
            return True
        return False

    def _expect(self, text: str) -> None:
        if not self._accept("punct", text):
            self._fail(f"expected {text!r}")

    def _fail(self, why: str) -> None:
        token = self._peek()
        found = repr(token.text) if token.kind != "end" else "the end"
        raise FilterError(f"{why} at position {token.pos} (found {found})")

    def _or(self) -> _Test:
        parts = [self._and()]
        while self._accept("name", "or"):
            parts.append(self._and())
        if len(parts) == 1:
            return parts[0]
        return lambda record, scope: any(part(record, scope) for part in parts)

    def _and(self) -> _Test:
        parts = [self._not()]
        while self._accept("name", "and"):
            parts.append(self._not())
        if len(parts) == 1:
            return parts[0]
        return lambda record, scope: all(part(record, scope) for part in parts)

    def _not(self) -> _Test:
        if self._accept("name", "not"):
            inner = self._not()
            return lambda record, scope: not inner(record, scope)
        return self._primary()

    def _primary(self) -> _Test:
        if self._accept("punct", "("):
            inner = self._or()
            self._expect(")")
            return inner
        left = self._operand()
        if isinstance(left, _Lambda):
            return left.test
        if self._accept("name", "eq"):
            negate = False
        elif self._accept("name", "ne"):
            negate = True
        else:
            self._fail("expected 'eq' or 'ne'")
        right = self._operand()
        if isinstance(right, _Lambda):
            self._fail("a lambda cannot be compared")
        assert not isinstance(right, _Lambda)
        return lambda record, scope: _same(left(record, scope), right(record, scope)) != negate

    def _operand(self) -> _Get | _Lambda:
        token = self._next()
        if token.kind == "string":
            return _constant(token.text[1:-1].replace("''", "'"))
        if token.kind == "number":
            exact = not re.search(r"[.eE]", token.text)
            return _constant(int(token.text) if exact else float(token.text))
        if token.kind == "name" and token.text in _LITERALS:
            return _constant(_LITERALS[token.text])
        if token.kind == "name" and token.text not in ("and", "or", "not", "eq", "ne"):
            return self._path(token.text)
        self.index -= token.kind != "end"
        self._fail("expected a property, a literal or '('")
        raise AssertionError("unreachable")

    def _path(self, first: str) -> _Get | _Lambda:
        steps = [first]
        while self._accept("punct", "/"):
            name = self._next()
            if name.kind != "name":
                self.index -= name.kind != "end"
                self._fail("expected a property name after '/'")
            if name.text in ("any", "all") and self._peek().text == "(":
                return self._lambda(steps, name.text == "any")
            steps.append(name.text)
        return _path_getter(steps, self.variables)

    def _lambda(self, steps: list[str], is_any: bool) -> _Lambda:
        collection = _path_getter(steps, self.variables)
        self._expect("(")
        if is_any and self._accept("punct", ")"):  # team/any() means "not empty"
            return _Lambda(lambda record, scope: bool(_items(collection(record, scope))))
        variable = self._next()
        if variable.kind != "name":
            self.index -= variable.kind != "end"
            self._fail("expected a lambda variable such as 't:'")
        self._expect(":")
        self.variables.append(variable.text)
        body = self._or()
        self.variables.pop()
        self._expect(")")
        name = variable.text
        quantifier = any if is_any else all

        def test(record: dict[str, Any], scope: Scope) -> bool:
            items = _items(collection(record, scope))
            return quantifier(body(record, {**scope, name: item}) for item in items)

        return _Lambda(test)


def compile_filter(text: str | None) -> Predicate:
    """``$filter`` text -> predicate on a raw record. Raises FilterError when it cannot parse.

    The subset: eq, ne, and, or, not, parentheses, string/number/true/false/null literals,
    nested paths (customerProfile/address/country) and lambdas (team/any(t:t/email eq 'x')).
    """
    if text is None or not text.strip():
        return lambda _record: True
    test = _Parser(text).parse()
    return lambda record: test(record, {})
