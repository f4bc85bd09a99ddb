"""structlog setup: console lines on a terminal, JSON lines otherwise.

Libraries that log through the standard library (apscheduler, httpx, httpcore, apprise, msal)
go through structlog's ProcessorFormatter, so JSON mode is JSON throughout, and their text is
scrubbed on the way: URLs are redacted (Slack and Teams webhook URLs are credentials) and HTTP
header values other than a few harmless ones are masked, at every verbosity.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

from referral_watch.text import terminal

SECRET_KEYS = ("token", "password", "secret", "authorization")
LIBRARIES = ("apprise", "msal", "apscheduler", "httpx", "httpcore", "urllib3", "uvicorn")
MASK = "***"

# Header values worth seeing when debugging; every other one may carry a credential
# (Set-Cookie, Authorization, Location with ?access_token=..., signatures).
_SAFE_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "date",
        "server",
        "connection",
        "retry-after",
        "request-id",
        "ms-cv",
        "ms-correlationid",
        "ms-requestid",
        "x-ms-request-id",
    }
)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>)\]]+")
_HEADER_PAIR = re.compile(r"\((b?)(['\"])([^'\"]+)\2, (b?)(['\"])(.*?)\5\)")
_HEADER_LINE = re.compile(r"(?im)^([A-Za-z0-9-]+): (.+)$")


def _drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Belt and braces: a field whose name says it holds a secret is never written."""
    for key in list(event):
        if any(word in key.lower() for word in SECRET_KEYS):
            event[key] = MASK
    return event


_redacting = threading.local()


def _redacted_url(match: re.Match[str]) -> str:
    url = match.group(0)
    if getattr(_redacting, "active", False):
        # Apprise may log while it parses the URL for its privacy form: mask that one whole.
        return url.split("://", 1)[0] + "://" + MASK
    _redacting.active = True
    try:
        from referral_watch.notify import redact_url

        return redact_url(url)
    except Exception:  # a log line must never fail because of its redaction
        return url.split("://", 1)[0] + "://" + MASK
    finally:
        _redacting.active = False


def _masked_pair(match: re.Match[str]) -> str:
    b1, q1, name, b2, q2, value = match.groups()
    shown = value if name.lower() in _SAFE_HEADERS else MASK
    return f"({b1}{q1}{name}{q1}, {b2}{q2}{shown}{q2})"


def _masked_line(match: re.Match[str]) -> str:
    name, value = match.groups()
    header_like = "-" in name or name.lower() in {"authorization", "cookie", "location"}
    hidden = header_like and name.lower() not in _SAFE_HEADERS
    return f"{name}: {MASK if hidden else value}"


def scrub(text: str) -> str:
    """A library's log text without credentials: URLs redacted, header values masked."""
    text = _HEADER_PAIR.sub(_masked_pair, text)  # httpcore: [(b'Set-Cookie', b'...'), ...]
    text = _HEADER_LINE.sub(_masked_line, text)  # urllib3/http.client style "Name: value"
    return _URL.sub(_redacted_url, text)


def _scrub_foreign(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and not key.startswith("_"):
            event[key] = scrub(value)
    return event


def configure(
    fmt: str = "auto",
    verbose: int = 0,
    stream: Any = None,
    *,
    quiet: bool = False,
    one_shot: bool = False,
) -> None:
    """fmt: auto | json | console. verbose: 0 info, 1+ debug, 2+ libraries' debug too.
    one_shot: a command with a result of its own, which logs warnings and errors only unless
    -v. quiet: warnings and errors only, each distinct one once (the demo's console)."""
    out = stream or _Stderr()
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    level = _level(verbose, quiet=quiet, one_shot=one_shot)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    structlog.configure(
        processors=[
            *shared,
            _Once() if quiet else _noop,
            _terminal_safe if fmt == "console" else _noop,  # JSON escapes controls itself
            structlog.processors.format_exc_info if fmt == "json" else _noop,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, out)),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(out, renderer, shared, fmt)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose > 1 else logging.ERROR)
    # Apprise's reasons reach our own log lines (notify.failed) through its LogCapture; its
    # raw warnings would say the same thing twice in another format.
    logging.getLogger("apprise").propagate = verbose > 1


def _level(verbose: int, *, quiet: bool, one_shot: bool) -> int:
    if quiet:
        return logging.WARNING
    if verbose:
        return logging.DEBUG
    return logging.WARNING if one_shot else logging.INFO


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler configure() installs on the root logger (replaced at the next call).

    What Apprise logs while it parses a URL for the redaction itself is dropped: it is about
    the redaction, not about anything the operator did."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_redacting, "active", False) and bool(super().filter(record))


def _route_stdlib(out: Any, renderer: Any, shared: list[Any], fmt: str) -> None:
    """Standard-library records through structlog: the same format, scrubbed."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, _scrub_foreign],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _terminal_safe if fmt == "console" else _noop,
            structlog.processors.format_exc_info if fmt == "json" else _noop,
            renderer,
        ],
    )
    handler = _OurHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


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
