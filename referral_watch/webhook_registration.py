"""Partner Center's webhook registration API (``webhooks.registration_url``), for the
``referral-watch webhooks register|show|test|unregister`` commands.

The API wants a token for another audience (``https://api.partnercenter.microsoft.com``) than
the Referrals API: through MSAL the same sign-in gets one silently; with ``auth.method`` "env"
or "command" it comes from ``webhooks.registration_token_env`` or ``registration_command``.
The token goes only to the registration URL's host: no redirect is followed, no link is taken
from an answer (SPEC 12).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from referral_watch import __version__
from referral_watch.auth import (
    CommandTokenProvider,
    EnvTokenProvider,
    MsalTokenProvider,
    TokenProvider,
)
from referral_watch.config import Config, WebhooksConfig
from referral_watch.errors import ApiError, AuthError, ReferralWatchError

REGISTRATION_SCOPE = "https://api.partnercenter.microsoft.com/.default"
EVENTS = ["referral-created", "referral-updated"]
TEST_WAIT = 60.0  # seconds `webhooks test` waits for the test event
TIMEOUT = 30.0


def registration_tokens(config: Config) -> TokenProvider:
    """A token provider for the registration API's audience, per ``auth.method``."""
    hooks = _webhooks(config)
    auth = config.auth
    if auth.method == "env":
        return EnvTokenProvider(hooks.registration_token_env)
    if auth.method == "command":
        if not hooks.registration_command:
            raise AuthError(
                'auth.method = "command" needs webhooks.registration_command: a program that '
                f"prints a token for {REGISTRATION_SCOPE.removesuffix('/.default')}"
            )
        return CommandTokenProvider(
            hooks.registration_command, auth.command_timeout.total_seconds()
        )
    other = config.model_copy(
        update={"auth": auth.model_copy(update={"scope": REGISTRATION_SCOPE})}
    )
    return MsalTokenProvider(other)


def webhook_url(config: Config) -> str:
    """Where Partner Center must post: ``{server.public_url}{webhooks.path}``."""
    hooks = _webhooks(config)
    public = config.server.public_url if config.server is not None else None
    if not public:
        raise ReferralWatchError(
            "server.public_url is not set: Partner Center needs the https address it reaches "
            "this server at (e.g. your reverse proxy), set it in [server]"
        )
    return f"{public}{hooks.path}"


class Registration:
    """The registration API for one partner; use as a context manager or call close()."""

    def __init__(
        self,
        config: Config,
        tokens: TokenProvider,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = httpx.URL(_webhooks(config).registration_url)
        self._tokens = tokens
        self._client = httpx.Client(
            transport=transport,
            timeout=TIMEOUT,
            follow_redirects=False,  # a redirect could carry the token elsewhere
            trust_env=False,
            headers={"Accept": "application/json", "User-Agent": f"referral-watch/{__version__}"},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the operations

    def show(self) -> dict[str, Any] | None:
        """The current registration, or None when there is none."""
        response = self._send("GET", "")
        if response.status_code == 404:
            return None
        return self._json_object(response, "the registration")

    def register(self, target: str) -> tuple[dict[str, Any], bool]:
        """Register ``target`` for referral-created and -updated: POST, or PUT when a
        registration exists. Returns (the registration, whether it was new)."""
        body = {"WebhookUrl": target, "WebhookEvents": list(EVENTS)}
        existing = self.show()
        response = self._send("PUT" if existing else "POST", "", body)
        return self._json_object(response, "the registration"), existing is None

    def unregister(self) -> bool:
        """Delete the registration; False when there was none."""
        response = self._send("DELETE", "")
        return response.status_code != 404

    def events(self) -> list[str]:
        answer = self._json(self._send("GET", "/events"), "the event list")
        return [str(item) for item in answer] if isinstance(answer, list) else []

    def request_test(self) -> str:
        """Ask for a test-created event; returns its correlation id."""
        answer = self._json(self._send("POST", "/validationEvents"), "the validation event")
        correlation = answer.get("correlationId") if isinstance(answer, dict) else answer
        if not isinstance(correlation, str) or not correlation:
            raise ApiError("Partner Center's answer to the validation request has no correlationId")
        return correlation

    def test_status(self, correlation: str) -> dict[str, Any] | None:
        response = self._send("GET", f"/validationEvents/{correlation}")
        if response.status_code == 404:
            return None
        return self._json_object(response, "the validation event's status")

    # --- requests

    def _send(self, method: str, suffix: str, body: Any = None) -> httpx.Response:
        url = self.url.copy_with(raw_path=(self.url.raw_path.decode() + suffix).encode())
        for attempt in (1, 2):
            headers = {
                "Authorization": f"Bearer {self._tokens.get_token(force_refresh=attempt == 2)}",
                "MS-CorrelationId": str(uuid.uuid4()),
                "MS-RequestId": str(uuid.uuid4()),
            }
            try:
                response = self._client.request(method, url, json=body, headers=headers)
            except httpx.HTTPError as exc:
                raise ApiError(
                    f"cannot reach the webhook registration API {self.url.host}: "
                    f"{type(exc).__name__}",
                    retryable=True,
                ) from None
            if response.status_code != 401:
                break
        return self._checked(response, method)

    def _checked(self, response: httpx.Response, method: str) -> httpx.Response:
        status = response.status_code
        if status < 300 or status == 404:
            return response
        if status == 401:
            hint = str(getattr(self._tokens, "renew_hint", ""))
            raise AuthError(
                "the webhook registration API rejected the token (401): it needs a token for "
                f"{REGISTRATION_SCOPE.removesuffix('/.default')}" + (f"; {hint}" if hint else ""),
                needs_login=True,
            )
        detail = _error_detail(response)
        raise ApiError(
            f"the webhook registration API answered {status} to {method}"
            + (f": {detail}" if detail else ""),
            status=status,
        )

    def _json(self, response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                f"the webhook registration API sent {what} as something not JSON"
            ) from None

    def _json_object(self, response: httpx.Response, what: str) -> dict[str, Any]:
        answer = self._json(response, what)
        if not isinstance(answer, dict):
            raise ApiError(f"the webhook registration API sent {what} as something not an object")
        return answer


def _error_detail(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        return ""
    if not isinstance(error, dict):
        return ""
    parts = [str(error.get(key)) for key in ("code", "message") if error.get(key)]
    return ": ".join(parts)[:300]


# --- `webhooks test`: did the event arrive and verify? --------------------------------------


@dataclass(frozen=True)
class TestOutcome:
    arrived: datetime | None  # when our endpoint stored the verified test event
    partner_center: str  # what Partner Center says about its delivery
    ok: bool


def wait_for_test_event(
    registration: Registration,
    correlation: str,
    state: Path | str,
    since: datetime,
    *,
    timeout: float = TEST_WAIT,
    report: Callable[[str], None] = lambda _line: None,
    pause: float = 1.0,
) -> TestOutcome:
    """Wait until the test event is stored as verified by our endpoint (the daemon shares the
    state file), or Partner Center reports its delivery failed, or ``timeout`` passes."""
    from referral_watch.store import Store
    from referral_watch.webhooks import TEST_EVENT

    deadline = time.monotonic() + timeout
    said = ""
    while True:
        with Store(state) as store:
            arrived = store.webhook_event_since(TEST_EVENT, since)
        status = registration.test_status(correlation) or {}
        delivery = _delivery_text(status)
        if delivery != said:
            report(f"Partner Center: {delivery}")
            said = delivery
        if arrived is not None:
            return TestOutcome(arrived, delivery, True)
        if status.get("status") == "failed":
            return TestOutcome(None, delivery, False)
        if time.monotonic() >= deadline:
            return TestOutcome(None, delivery, False)
        time.sleep(pause)


def _delivery_text(status: dict[str, Any]) -> str:
    state = str(status.get("status") or "no status yet")
    events = status.get("events")
    last = events[-1] if isinstance(events, list) and events else None
    if isinstance(last, dict) and last.get("statusCode"):
        return f"{state} (our endpoint answered {last['statusCode']})"
    return state


def _webhooks(config: Config) -> WebhooksConfig:
    if config.webhooks is None:
        raise ReferralWatchError(
            "[webhooks] is not configured: add it (and [server] with public_url), see "
            "docs/webhooks.md"
        )
    return config.webhooks
