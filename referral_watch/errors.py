"""One exception family. Each boundary translates its library's errors into these.

``str(error)`` is always a message fit for an operator: what went wrong and what to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus


class ReferralWatchError(Exception):
    """Base of every expected failure; the CLI prints it without a traceback."""


class ConfigError(ReferralWatchError):
    """The configuration is invalid. ``problems`` lists every problem with its key path."""

    def __init__(self, problems: list[str], path: str | None = None) -> None:
        self.problems = problems
        self.path = path
        where = f" in {path}" if path else ""
        super().__init__(f"{len(problems)} configuration problem(s){where}: " + "; ".join(problems))


class AuthError(ReferralWatchError):
    """No usable token. ``needs_login`` means an operator must run `referral-watch login`."""

    def __init__(self, message: str, *, needs_login: bool = False) -> None:
        self.needs_login = needs_login
        super().__init__(message)


class ApiError(ReferralWatchError):
    """Partner Center answered with an error, or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        code: str | None = None,
    ) -> None:
        self.status = status
        self.retryable = retryable
        self.code = code
        super().__init__(message)


class StateError(ReferralWatchError):
    """The state file cannot be used (corrupt, read-only, newer schema...)."""


class LockedError(StateError):
    """Another process holds the state lock."""


# Query parameters and header-like words whose values are secrets wherever they appear.
_SECRET_PARAMS = re.compile(
    r"(?i)\b((?:access_|id_|refresh_)?token|code|client_secret|secret|password|passwd|sig|"
    r"signature|api[-_]?key|key)=([^&\s#'\"]+)"
)
# "Bearer <token>": a token has digits or punctuation, or is long; "bearer token" (a word in
# a sentence) is left alone.
_BEARER = re.compile(
    r"(?i)\b(bearer)\s+"
    r"(?![A-Za-z]{1,19}\b(?![\-_~+/=]|\.[A-Za-z0-9]))"  # not a plain word ("bearer token")
    r"[A-Za-z0-9\-._~+/]+=*"
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """An error text fit to log, store or send: the given secrets (and their URL-encoded
    forms), bearer tokens and secret-looking query parameters (`?access_token=...`, as a
    server may echo in a redirect's Location) are replaced by ***. The one scrub used for
    log lines, `status`, the state file's poll log and operations alerts."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
                text = text.replace(form, "***")
    text = _BEARER.sub(r"\1 ***", text)
    return _SECRET_PARAMS.sub(r"\1=***", text)
