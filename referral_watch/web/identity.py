"""The console's Microsoft identity: one MSAL confidential client per process, who an ID token
names, and how often one address may start a sign-in.

MSAL looks up the authority's OpenID configuration when an application is built, so building
one per request cost an outbound call each (and a requests session kept alive). ``Identity``
builds it once (again only when a reload changes the console's keys) with one in-memory token
cache for every signed-in person; each session remembers only its account's id.

MSAL (since 1.38) no longer checks ID tokens; the app must. The token comes straight from the
token endpoint over TLS (authorization code flow with a client secret), so its signature need
not be checked (OpenID Connect Core 3.1.3.7), but its audience and tenant must be ours:
``signed_in_as`` accepts only ``tid`` = the tenant in the authority's OpenID configuration
(its ``issuer``), and reads the person from ``preferred_username`` or ``upn``, never from the
``email`` claim, which the person's own tenant may set to anything.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import structlog

from referral_watch.config import ConsoleConfig
from referral_watch.partner_center.auth import PUBLIC_CLOUD_HOST

log = structlog.get_logger(__name__)

# Sign-ins one client address may start: a burst, then one every LOGIN_EVERY seconds.
LOGIN_BURST = 20
LOGIN_EVERY = 3.0
LOGIN_ADDRESSES = 10_000  # addresses remembered at most (the least recent are forgotten)


class Identity:
    """The one MSAL ``ConfidentialClientApplication`` of this process and its token cache."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._app: Any = None
        self._keys: tuple[str | None, ...] = ()

    def app(self, console: ConsoleConfig) -> Any:
        """The application for ``console`` (built on first use: the one discovery request)."""
        keys = (console.client_id, console.client_secret, console.authority, console.tenant_id)
        with self._lock:  # the first sign-ins wait for the one discovery, not make their own
            if self._app is None or keys != self._keys:
                self._app = _build(console)
                self._keys = keys
            return self._app

    def tenant(self, console: ConsoleConfig) -> str:
        """The tenant's id from the authority's OpenID configuration: the first segment of its
        ``issuer`` (https://login.microsoftonline.com/{tid}/v2.0), else of its token endpoint."""
        authority = self.app(console).authority
        issuer = getattr(authority, "_issuer", None) or getattr(authority, "token_endpoint", "")
        return (urlsplit(str(issuer)).path.strip("/").split("/") or [""])[0]

    def account_id(self, console: ConsoleConfig, claims: Mapping[str, Any]) -> str | None:
        """The token cache's id of the account these ID token claims belong to."""
        for account in self.app(console).get_accounts():
            if account.get("local_account_id") == claims.get("oid"):
                return str(account["home_account_id"])
        return None

    def token(self, console: ConsoleConfig, account_id: str, scope: str) -> str | None:
        """A delegated access token for the account, refreshed silently; None when there is
        none (the person must sign in again and consent)."""
        app = self.app(console)
        accounts = [a for a in app.get_accounts() if a.get("home_account_id") == account_id]
        if not accounts:
            return None
        result = app.acquire_token_silent([scope], account=accounts[0])
        token = (result or {}).get("access_token")
        return token if isinstance(token, str) and token else None

    def forget(self, account_id: str) -> None:
        """Remove an account's tokens (no session uses it any more)."""
        with self._lock:
            app = self._app
        if app is None:
            return
        for account in app.get_accounts():
            if account.get("home_account_id") == account_id:
                app.remove_account(account)


def _build(console: ConsoleConfig) -> Any:
    import msal

    host = urlsplit(console.authority).hostname or console.authority
    return msal.ConfidentialClientApplication(
        console.client_id,
        client_credential=console.client_secret,
        authority=f"{console.authority.rstrip('/')}/{console.tenant_id}",
        token_cache=msal.TokenCache(),  # in memory, for every signed-in person
        # Another host (a sovereign cloud, a test endpoint) is not in Microsoft's instance list.
        instance_discovery=None if host == PUBLIC_CLOUD_HOST else False,
        timeout=30,
    )


def signed_in_as(claims: Mapping[str, Any], client_id: str | None, tenant: str) -> str | None:
    """The person's sign-in name from a token's ID claims ("" when it names none), or None
    when the token is not for this app (``aud``) or not from this tenant (``tid``)."""
    if not tenant or str(claims.get("tid", "")).lower() != tenant.lower():
        return None
    if claims.get("aud") != client_id:
        return None
    name = claims.get("preferred_username") or claims.get("upn")
    return str(name) if name else ""


class LoginLimiter:
    """A token bucket per client address for /auth/login: each sign-in start costs a pending
    flow in memory and, without it, invites a flood."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # address -> (tokens, when counted, refused since last let in); least recent first
        self._buckets: OrderedDict[str, tuple[float, float, bool]] = OrderedDict()

    def allow(self, address: str) -> tuple[float, bool]:
        """(0, _) when this address may start a sign-in now, else (the seconds to wait,
        whether this is its first refusal since it was last let in: log that one only)."""
        now = time.monotonic()
        with self._lock:
            tokens, then, refused = self._buckets.pop(address, (float(LOGIN_BURST), now, False))
            tokens = min(float(LOGIN_BURST), tokens + (now - then) / LOGIN_EVERY)
            if tokens >= 1:
                self._buckets[address] = (tokens - 1, now, False)
                wait, first = 0.0, False
            else:
                self._buckets[address] = (tokens, now, True)
                wait, first = (1 - tokens) * LOGIN_EVERY, not refused
            while len(self._buckets) > LOGIN_ADDRESSES:
                self._buckets.popitem(last=False)
        return wait, first
