"""One exception family. Each boundary translates its library's errors into these.

``str(error)`` is always a message fit for an operator: what went wrong and what to do.
"""

from __future__ import annotations


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
