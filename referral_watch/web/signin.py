"""Who may see the console (SPEC 13): the gate in front of every page, and Microsoft sign-in.

``sign_in = "entra"``: the authorization code flow with PKCE through MSAL
(``ConfidentialClientApplication.initiate_auth_code_flow`` / ``acquire_token_by_auth_code_flow``);
only ``console.allowed`` domains or addresses get in. The session cookie (Starlette's signed,
HttpOnly, SameSite=Lax cookie) holds only a random session id, the person's name and address and
the CSRF token. The pending flow (its PKCE verifier) and the person's MSAL token cache, with the
delegated Partner Center token for answering leads (SPEC 14), stay in this process's memory.
``sign_in = "none"`` (only on a loopback address) lets everyone on this machine in.

Open without a sign-in: /healthz, /livez, /metrics, /favicon.ico, /static/*, /auth/*, the webhook
path and any path passed as ``open_paths`` to ``build_app``.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import structlog
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from referral_watch.config import Config, ConsoleConfig
from referral_watch.web.identity import Identity, signed_in_as

log = structlog.get_logger(__name__)

# Delegated Partner Center access, so an answer is made with the person's own token (SPEC 14).
PARTNER_CENTER_SCOPE = "https://api.partner.microsoft.com/user_impersonation"
SESSION_LIFETIME = 12 * 3600  # seconds; then the person signs in again
FLOW_LIFETIME = 15 * 60  # a sign-in not finished within this is forgotten
MAX_FLOWS = 1000  # sign-ins pending at once; beyond, the oldest is forgotten
# The probes: any Host, no sign-in, and room kept for them in the web server.
PROBE_PATHS = ("/healthz", "/livez", "/metrics")
OPEN_PATHS = (*PROBE_PATHS, "/favicon.ico")  # the icon: a static file
OPEN_PREFIXES = ("/static/", "/auth/")


@dataclass(frozen=True)
class Viewer:
    """The person looking at the console."""

    name: str
    email: str
    session: str = ""  # the server-side session id ("" without a sign-in)


LOCAL_VIEWER = Viewer(name="", email="")


class Sessions:
    """Server-side sign-in state: pending flows (at most MAX_FLOWS, the oldest dropped first)
    and each session's account in the one MSAL token cache (see ``identity``).

    ``forget_account(id)`` is called once no live session uses an account any more."""

    def __init__(self, forget_account: Callable[[str], None] = lambda _: None) -> None:
        self._lock = threading.Lock()
        self._flows: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._accounts: dict[str, tuple[float, str]] = {}
        self._forget_account = forget_account

    def keep_flow(self, flow: dict[str, Any]) -> str:
        key = secrets.token_urlsafe(24)
        with self._lock:
            released = self._expire()
            self._flows[key] = (time.monotonic() + FLOW_LIFETIME, flow)
            while len(self._flows) > MAX_FLOWS:
                self._flows.popitem(last=False)
        self._release(released)
        return key

    def take_flow(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            released = self._expire()
            found = self._flows.pop(key, None)
        self._release(released)
        return found[1] if found else None

    def keep_account(self, account_id: str) -> str:
        session = secrets.token_urlsafe(24)
        with self._lock:
            self._accounts[session] = (time.monotonic() + SESSION_LIFETIME, account_id)
        return session

    def account(self, session: str) -> str | None:
        """The session's account id in the token cache (None once signed out or expired)."""
        with self._lock:
            released = self._expire()
            found = self._accounts.get(session)
        self._release(released)
        return found[1] if found else None

    def known(self, session: str) -> bool:
        return self.account(session) is not None

    def forget(self, session: str) -> None:
        with self._lock:
            gone = self._accounts.pop(session, None)
            released = self._unused([gone[1]] if gone else [])
        self._release(released)

    def _expire(self) -> list[str]:
        now = time.monotonic()
        for key in [k for k, (until, _) in self._flows.items() if until < now]:
            del self._flows[key]
        ended = [k for k, (until, _) in self._accounts.items() if until < now]
        return self._unused([self._accounts.pop(k)[1] for k in ended])

    def _unused(self, accounts: list[str]) -> list[str]:
        held = {account for _, account in self._accounts.values()}
        return [account for account in set(accounts) if account not in held]

    def _release(self, accounts: list[str]) -> None:
        for account in accounts:  # outside the lock: MSAL's cache has its own
            self._forget_account(account)


def allowed(email: str, patterns: Iterable[str]) -> bool:
    """A full address matches itself; a bare domain matches every address at it."""
    address = email.strip().lower()
    _, at, domain = address.rpartition("@")
    if not at:
        return False
    for pattern in patterns:
        wanted = pattern.strip().lower()
        if address == wanted or ("@" not in wanted and domain == wanted.lstrip("@")):
            return True
    return False


# --- the gate ------------------------------------------------------------------------------


class SignInGate:
    """Sets ``request.state.viewer``, or turns the request away.

    Without ``[console]`` only the open paths are served (everything else is 404). With
    ``sign_in = "entra"`` a page asked for without a valid session redirects to the sign-in
    (an API or form request gets 401).
    """

    def __init__(
        self, app: ASGIApp, host: Any, sessions: Sessions, open_paths: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.host = host
        self.sessions = sessions
        self.open_paths = (*OPEN_PATHS, *open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        config: Config = self.host.config
        request = Request(scope, receive)
        refusal = self._refusal(request, config)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _open(self, path: str) -> bool:
        webhooks = getattr(self.host.config, "webhooks", None)
        paths = (*self.open_paths, getattr(webhooks, "path", None) or "")
        return path in paths or path.startswith(OPEN_PREFIXES)

    def _refusal(self, request: Request, config: Config) -> Response | None:
        console = config.console
        if console is None:
            return PlainTextResponse("not found\n", status_code=404)
        if console.sign_in == "none":
            request.state.viewer = LOCAL_VIEWER
            return None
        viewer = self._viewer(request)
        if viewer is not None:
            request.state.viewer = viewer
            return None
        if request.method in ("GET", "HEAD") and not request.url.path.startswith("/api/"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/auth/login?next={quote(target, safe='')}", 303)
        return PlainTextResponse("sign in first: open the console in a browser\n", 401)

    def _viewer(self, request: Request) -> Viewer | None:
        data = request.session.get("user")
        if not isinstance(data, dict):
            return None
        session = data.get("session")
        if not isinstance(session, str) or not self.sessions.known(session):
            return None
        return Viewer(
            name=str(data.get("name", "")), email=str(data.get("email", "")), session=session
        )


# --- the Entra ID routes ------------------------------------------------------------------


def auth_routes() -> list[BaseRoute]:
    """The sign-in's pages; they find the Sessions at ``request.app.state.sessions``."""
    return [
        Route("/auth/login", login, methods=["GET"]),
        Route("/auth/callback", callback, methods=["GET"]),
        Route("/auth/logout", logout, methods=["POST"]),
    ]


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.sessions
    return sessions


def _console(request: Request) -> ConsoleConfig | None:
    console: ConsoleConfig | None = request.app.state.host.config.console
    return console if console is not None and console.sign_in == "entra" else None


def redirect_uri(config: Config) -> str:
    assert config.server is not None
    return f"{config.server.base_url}/auth/callback"


def _safe_next(target: str | None) -> str:
    """Only a path on this server: never an open redirect to another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def login(request: Request) -> Response:
    sessions = _sessions(request)
    from starlette.concurrency import run_in_threadpool

    console = _console(request)
    if console is None:
        return PlainTextResponse("not found\n", status_code=404)
    address = request.client.host if request.client else ""
    wait, first = request.app.state.login_limiter.allow(address)
    if wait:
        if first:  # once per run of refusals: a flood must not flood the log too
            log.warning("console.sign_in_limited", client=address)
        return PlainTextResponse(
            "too many sign-ins from this address: try again in a minute\n",
            status_code=429,
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    config: Config = request.app.state.host.config
    identity: Identity = request.app.state.identity

    def start() -> dict[str, Any]:
        import warnings

        with warnings.catch_warnings():
            # MSAL recommends response_mode=form_post. The answer then arrives as a cross-site
            # POST, which carries no SameSite=Lax cookie, so the flow could not be tied to the
            # browser that started it. The query mode with PKCE and state is the standard
            # flow; the callback redirects at once, so the code leaves the address bar.
            warnings.filterwarnings("ignore", message="response_mode='form_post'")
            flow: dict[str, Any] = identity.app(console).initiate_auth_code_flow(
                [PARTNER_CENTER_SCOPE], redirect_uri=redirect_uri(config), response_mode="query"
            )
        return flow

    try:
        flow = await run_in_threadpool(start)
    except Exception as exc:  # MSAL or the network: say so, do not crash the page
        log.error("console.sign_in_failed", stage="start", error=str(exc))
        return PlainTextResponse(f"cannot reach the sign-in service: {exc}\n", status_code=502)
    request.session["flow"] = sessions.keep_flow(flow)
    request.session["next"] = _safe_next(request.query_params.get("next"))
    return RedirectResponse(flow["auth_uri"], status_code=303)


async def callback(request: Request) -> Response:
    sessions = _sessions(request)
    from starlette.concurrency import run_in_threadpool

    console = _console(request)
    if console is None:
        return PlainTextResponse("not found\n", status_code=404)
    key = request.session.pop("flow", None)
    flow = sessions.take_flow(key) if isinstance(key, str) else None
    if flow is None:
        return RedirectResponse("/auth/login", status_code=303)  # expired or replayed: again
    identity: Identity = request.app.state.identity
    answer = dict(request.query_params)

    def redeem() -> tuple[dict[str, Any], str]:
        app = identity.app(console)
        result: dict[str, Any] = app.acquire_token_by_auth_code_flow(flow, answer)
        return result, identity.tenant(console)

    try:
        result, tenant = await run_in_threadpool(redeem)
    except Exception as exc:  # e.g. a state mismatch (ValueError) or the network
        log.warning("console.sign_in_failed", stage="callback", error=str(exc))
        return PlainTextResponse("the sign-in did not complete: try again\n", status_code=400)
    if "error" in result:
        log.warning("console.sign_in_failed", stage="callback", error=result.get("error"))
        reason = result.get("error_description") or result["error"]
        return PlainTextResponse(f"the sign-in did not complete: {reason}\n", status_code=400)
    claims = result.get("id_token_claims") or {}
    email = signed_in_as(claims, console.client_id, tenant)
    account = identity.account_id(console, claims) if email is not None else None
    if email is None or account is None:
        log.warning("console.sign_in_refused", tenant=claims.get("tid"), why="foreign tenant")
        if account is not None:
            identity.forget(account)
        return PlainTextResponse(
            "this account is not of the organization this console belongs to (console.tenant_id)\n",
            status_code=403,
        )
    if not allowed(email, console.allowed):
        log.warning("console.sign_in_refused", user=email)
        identity.forget(account)
        return PlainTextResponse(
            f"{email or 'this account'} may not use this console: ask an administrator to add "
            "it to console.allowed\n",
            status_code=403,
        )
    session = sessions.keep_account(account)
    request.session["user"] = {"session": session, "name": claims.get("name", ""), "email": email}
    log.info("console.signed_in", user=email)
    return RedirectResponse(_safe_next(request.session.pop("next", "/")), status_code=303)


async def logout(request: Request) -> Response:
    sessions = _sessions(request)
    from referral_watch.web.console import checked_form

    await checked_form(request)
    user = request.session.get("user")
    if isinstance(user, dict) and isinstance(user.get("session"), str):
        sessions.forget(user["session"])
    request.session.clear()
    return PlainTextResponse("signed out\n", status_code=200)
