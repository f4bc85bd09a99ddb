"""structlog setup: console lines on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

from referral_watch.text import terminal

SECRET_KEYS = ("token", "password", "secret", "authorization")


def _drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Belt and braces: a field whose name says it holds a secret is never written."""
    for key in list(event):
        if any(word in key.lower() for word in SECRET_KEYS):
            event[key] = "***"
    return event


def configure(
    fmt: str = "auto", verbose: int = 0, stream: Any = None, *, quiet: bool = False
) -> None:
    """fmt: auto | json | console. verbose: 0 info, 1+ debug. quiet: warnings and errors only,
    each distinct one once (the demo's console stays readable)."""
    out = stream or _Stderr()
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
        _Once() if quiet else _noop,
        _terminal_safe if fmt == "console" else _noop,  # JSON escapes controls itself
        structlog.processors.format_exc_info if fmt == "json" else _noop,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, out)),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (apprise, msal, apscheduler) go to the same stream, quietly.
    logging.basicConfig(
        level=logging.WARNING, stream=out, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("apprise", "msal", "apscheduler", "httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.ERROR)
    # Apprise's reasons reach our own log lines (notify.failed) through its LogCapture; its
    # raw warnings would say the same thing twice in another format.
    logging.getLogger("apprise").propagate = verbose > 1


def _noop(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event


def _terminal_safe(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A value quoting Partner Center text (a customer, a reason) never drives the terminal."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = terminal(value)
    return event


class _Once:
    """Drops a log line identical (but for its time) to one already written."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        key = repr(sorted((k, str(v)) for k, v in event.items() if k != "timestamp"))
        if key in self.seen:
            raise structlog.DropEvent
        self.seen.add(key)
        return event


class _Stderr:
    """Writes to whatever sys.stderr is at the time (it may be replaced after configuring)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()
