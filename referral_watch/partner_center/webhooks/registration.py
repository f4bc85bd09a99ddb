"""Partner Center's webhook registration API (``webhooks.registration_url``), for the
``referral-watch webhooks register|show|test|unregister`` commands.

The API wants a token for another audience (``https://api.partnercenter.microsoft.com``) than
the Referrals API: through MSAL the same sign-in gets one silently; with ``auth.method`` "env"
or "command" it comes from ``webhooks.registration_token_env`` or ``registration_command``.
The token goes only to the registration URL's host: no redirect is followed, no link is taken
from an answer (SPEC 12).

Partner Center keeps ONE registration per company, one URL for all its events, and other
integrations may hold it (Microsoft's Dynamics 365 / Salesforce co-sell connectors, billing
webhooks). So ``register`` never takes it silently: it refuses while another URL holds it;
``register --replace`` keeps every event already registered, adds ours, and remembers the
registration it replaced in the state; ``unregister`` puts that back exactly.
"""

from __future__ import annotations

import json
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from referral_watch import __version__
from referral_watch.config import Config, WebhooksConfig
from referral_watch.errors import ApiError, AuthError, ReferralWatchError
from referral_watch.partner_center.auth import (
    CommandTokenProvider,
    EnvTokenProvider,
    MsalTokenProvider,
    TokenProvider,
)
from referral_watch.text import clean_line

REGISTRATION_SCOPE = "https://api.partnercenter.microsoft.com/.default"
# Ours: the referral events, and test-created (webhooks.TEST_EVENT), which Microsoft requires to
# be registered before a validation event may be asked for (`webhooks test`).
EVENTS = ("referral-created", "referral-updated", "test-created")
TEST_EVENT = EVENTS[2]
# Who may register webhooks (Microsoft's "Partner Center webhooks" page, "Appropriate roles").
REGISTER_ROLES = "Global Admin, Billing Admin, Admin agent, Sales agent or Helpdesk agent"
REPLACED_META = "webhooks.replaced_registration"  # in the state's meta table
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
            # The system's trust store (OpenSSL's default paths: SSL_CERT_FILE honoured), no
            # proxies from the environment.
            verify=ssl.create_default_context(),
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

    def register(self, target: str, memory: ReplacedMemory, *, replace: bool = False) -> Registered:
        """Register ``target`` for our EVENTS without taking the company's one registration
        from another integration: POST when there is none; when ``target`` holds it, PUT only
        if events are missing; when another URL holds it, raise HeldElsewhere unless
        ``replace``: then remember it in ``memory`` (before acting) and PUT ``target`` with
        every event already registered plus ours."""
        current = self.show()
        if current is None:
            body = {"WebhookUrl": target, "WebhookEvents": list(EVENTS)}
            return Registered(self._json_object(self._send("POST", "", body), _WHAT), "created")
        events = merged_events(current)
        if same_url(current, target):
            if events == registered_events(current):
                return Registered(current, "unchanged")
            body = {**_restorable(current), "WebhookEvents": events}
            return Registered(self._json_object(self._send("PUT", "", body), _WHAT), "updated")
        if not replace:
            raise HeldElsewhere(current, target)
        before = memory.get()
        memory.put(current)  # decide, record, then act: a crash after the PUT loses nothing
        try:
            body = {"WebhookUrl": target, "WebhookEvents": events}
            answer = self._json_object(self._send("PUT", "", body), _WHAT)
        except BaseException:
            memory.put(before)
            raise
        return Registered(answer, "replaced", current)

    def unregister(self, target: str, memory: ReplacedMemory) -> Unregistered:
        """Put back the registration ``register --replace`` took over (exactly: URL, events
        and header choice), or delete ours when nothing was replaced. A registration another
        URL holds now is left alone (HeldElsewhere)."""
        current = self.show()
        replaced = memory.get()
        if current is not None and not same_url(current, target):
            raise HeldElsewhere(current, target, unregistering=True)
        if replaced is not None:
            method = "PUT" if current is not None else "POST"
            self._send(method, "", _restorable(replaced))
            memory.put(None)
            return Unregistered("restored", replaced)
        if current is None:
            return Unregistered("none")
        self._send("DELETE", "")
        return Unregistered("deleted")

    def ensure_test_event(self, target: str) -> dict[str, Any]:
        """Our registration, with test-created added when missing (Microsoft refuses a
        validation event without it)."""
        current = self.show()
        if current is None:
            raise ReferralWatchError(
                "no webhook registration: run `referral-watch webhooks register` first"
            )
        if not same_url(current, target):
            raise HeldElsewhere(current, target, testing=True)
        if TEST_EVENT in registered_events(current):
            return current
        body = {**_restorable(current), "WebhookEvents": merged_events(current)}
        return self._json_object(self._send("PUT", "", body), _WHAT)

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
        if status == 403:
            raise ApiError(
                "the webhook registration API refused the signed-in account (403"
                + (f": {detail}" if detail else "")
                + f"): managing webhooks needs one of the Partner Center roles {REGISTER_ROLES} "
                "(Referral Admin alone cannot); give the account one of them in Partner Center "
                "(Settings, User management) or sign in as a user who has one",
                status=status,
            )
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


_WHAT = "the registration"


def registered_events(registration: dict[str, Any]) -> list[str]:
    events = registration.get("WebhookEvents")
    return [str(e) for e in events] if isinstance(events, list) else []


def merged_events(registration: dict[str, Any]) -> list[str]:
    """Every event already registered, in its order, then ours that are missing."""
    events = registered_events(registration)
    return events + [e for e in EVENTS if e not in events]


def same_url(registration: dict[str, Any], target: str) -> bool:
    url = str(registration.get("WebhookUrl") or "")
    return url.rstrip("/") == target.rstrip("/")


def describe(registration: dict[str, Any]) -> str:
    """``https://crm.example/hook (referral-created, invoice-ready)``."""
    events = ", ".join(registered_events(registration)) or "no events"
    return f"{registration.get('WebhookUrl', '?')} ({events})"


def _restorable(registration: dict[str, Any]) -> dict[str, Any]:
    """What a PUT or POST takes to recreate ``registration``: all but the server's own id."""
    return {k: v for k, v in registration.items() if k != "SubscriberId"}


class HeldElsewhere(ReferralWatchError):
    """Another URL holds the company's one webhook registration."""

    def __init__(
        self,
        held: dict[str, Any],
        target: str,
        *,
        unregistering: bool = False,
        testing: bool = False,
    ) -> None:
        self.held = held
        where = f"the company's webhook registration is held by another URL: {describe(held)}"
        if unregistering:
            message = f"{where}; it is not ours ({target}), so it is left alone"
        elif testing:
            message = (
                f"{where}; a test event would go there, not to {target}: "
                "see `referral-watch webhooks register`"
            )
        else:
            message = (
                f"{where}. Partner Center keeps one registration per company, so registering "
                f"{target} would cut that integration off: nothing changed.\n"
                "`webhooks register --replace` takes it over keeping every event it has (and "
                "`webhooks unregister` puts it back); list its URL in webhooks.forward_to and "
                "every verified event is relayed to it, signature headers included."
            )
        super().__init__(message)


@dataclass(frozen=True)
class Registered:
    registration: dict[str, Any]
    action: str  # "created", "updated", "unchanged" or "replaced"
    replaced: dict[str, Any] | None = None


@dataclass(frozen=True)
class Unregistered:
    action: str  # "restored", "deleted" or "none"
    restored: dict[str, Any] | None = None


class ReplacedMemory:
    """The registration ``register --replace`` took over, kept in the state (SQLite or
    PostgreSQL, the meta table) until ``unregister`` puts it back."""

    def __init__(self, location: Path | str) -> None:
        self.location = location

    def get(self) -> dict[str, Any] | None:
        from referral_watch.state.store import Store

        if isinstance(self.location, Path) and not self.location.exists():
            return None  # no state yet: nothing replaced (and `show` creates no file)
        with Store(self.location) as store:
            text = store.get_meta(REPLACED_META)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def put(self, registration: dict[str, Any] | None) -> None:
        from referral_watch.state.store import Store

        text = None if registration is None else json.dumps(registration, sort_keys=True)
        with Store(self.location) as store, store.transaction():
            store.set_meta(REPLACED_META, text)


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
    state) and Partner Center reports what our endpoint answered, or Partner Center reports
    its delivery failed, or ``timeout`` passes."""
    from referral_watch.state.store import Store

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
        # Done once the event is stored verified and Partner Center tells what our endpoint
        # answered (its status may lag the delivery a little: then the deadline ends the wait).
        if arrived is not None and (_last_result(status) or time.monotonic() >= deadline):
            return TestOutcome(arrived, delivery, True)
        if status.get("status") == "failed":
            return TestOutcome(None, delivery, False)
        if time.monotonic() >= deadline:
            return TestOutcome(None, delivery, False)
        time.sleep(pause)


def _delivery_text(status: dict[str, Any]) -> str:
    """Partner Center's account of the test delivery, in the documented shape
    ``{"status": "completed", "results": [{"responseCode": "OK", "responseMessage": ...}]}``:
    its status and what our endpoint answered the last time."""
    state = clean_line(str(status.get("status") or "no status yet"), 40)
    last = _last_result(status)
    if last is None:
        return state
    said = clean_line(str(last["responseCode"]), 40)
    message = clean_line(str(last.get("responseMessage") or ""), 120)
    if message and message != said:
        said += f": {message}"
    return f"{state} (our endpoint answered {said})"


def _last_result(status: dict[str, Any]) -> dict[str, Any] | None:
    results = status.get("results")
    last = results[-1] if isinstance(results, list) and results else None
    return last if isinstance(last, dict) and last.get("responseCode") else None


def _webhooks(config: Config) -> WebhooksConfig:
    if config.webhooks is None:
        raise ReferralWatchError(
            "[webhooks] is not configured: add it (and [server] with public_url), see "
            "docs/webhooks.md"
        )
    return config.webhooks
