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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import structlog
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from referral_watch.config import Config, ConsoleConfig

log = structlog.get_logger(__name__)

PUBLIC_CLOUD_HOST = "login.microsoftonline.com"
# Delegated Partner Center access, so an answer is made with the person's own token (SPEC 14).
PARTNER_CENTER_SCOPE = "https://api.partner.microsoft.com/user_impersonation"
SESSION_LIFETIME = 12 * 3600  # seconds; then the person signs in again
FLOW_LIFETIME = 15 * 60  # a sign-in not finished within this is forgotten
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
    """Server-side sign-in state: pending flows and each session's MSAL token cache."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flows: dict[str, tuple[float, dict[str, Any]]] = {}
        self._caches: dict[str, tuple[float, Any]] = {}

    def keep_flow(self, flow: dict[str, Any]) -> str:
        key = secrets.token_urlsafe(24)
        with self._lock:
            self._expire()
            self._flows[key] = (time.monotonic() + FLOW_LIFETIME, flow)
        return key

    def take_flow(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            self._expire()
            found = self._flows.pop(key, None)
        return found[1] if found else None

    def keep_cache(self, cache: Any) -> str:
        session = secrets.token_urlsafe(24)
        with self._lock:
            self._caches[session] = (time.monotonic() + SESSION_LIFETIME, cache)
        return session

    def cache(self, session: str) -> Any:
        """The session's MSAL token cache (None once signed out or expired)."""
        with self._lock:
            self._expire()
            found = self._caches.get(session)
        return found[1] if found else None

    def known(self, session: str) -> bool:
        with self._lock:
            self._expire()
            return session in self._caches

    def forget(self, session: str) -> None:
        with self._lock:
            self._caches.pop(session, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for table in (self._flows, self._caches):
            for key in [k for k, (until, _) in table.items() if until < now]:
                del table[key]


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


def msal_app(console: ConsoleConfig, cache: Any = None) -> Any:
    import msal

    host = urlsplit(console.authority).hostname or console.authority
    return msal.ConfidentialClientApplication(
        console.client_id,
        client_credential=console.client_secret,
        authority=f"{console.authority.rstrip('/')}/{console.tenant_id}",
        token_cache=cache,
        # Another host (a sovereign cloud, a test endpoint) is not in Microsoft's instance list.
        instance_discovery=None if host == PUBLIC_CLOUD_HOST else False,
        timeout=30,
    )


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
    config: Config = request.app.state.host.config

    def start() -> dict[str, Any]:
        import warnings

        with warnings.catch_warnings():
            # MSAL recommends response_mode=form_post. The answer then arrives as a cross-site
            # POST, which carries no SameSite=Lax cookie, so the flow could not be tied to the
            # browser that started it. The query mode with PKCE and state is the standard
            # flow; the callback redirects at once, so the code leaves the address bar.
            warnings.filterwarnings("ignore", message="response_mode='form_post'")
            flow: dict[str, Any] = msal_app(console).initiate_auth_code_flow(
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
    from msal import SerializableTokenCache
    from starlette.concurrency import run_in_threadpool

    console = _console(request)
    if console is None:
        return PlainTextResponse("not found\n", status_code=404)
    key = request.session.pop("flow", None)
    flow = sessions.take_flow(key) if isinstance(key, str) else None
    if flow is None:
        return RedirectResponse("/auth/login", status_code=303)  # expired or replayed: again
    cache = SerializableTokenCache()
    answer = dict(request.query_params)

    def redeem() -> dict[str, Any]:
        result: dict[str, Any] = msal_app(console, cache).acquire_token_by_auth_code_flow(
            flow, answer
        )
        return result

    try:
        result = await run_in_threadpool(redeem)
    except Exception as exc:  # e.g. a state mismatch (ValueError) or the network
        log.warning("console.sign_in_failed", stage="callback", error=str(exc))
        return PlainTextResponse("the sign-in did not complete: try again\n", status_code=400)
    if "error" in result:
        log.warning("console.sign_in_failed", stage="callback", error=result.get("error"))
        reason = result.get("error_description") or result["error"]
        return PlainTextResponse(f"the sign-in did not complete: {reason}\n", status_code=400)
    claims = result.get("id_token_claims") or {}
    email = str(claims.get("preferred_username") or claims.get("email") or "")
    if not allowed(email, console.allowed):
        log.warning("console.sign_in_refused", user=email)
        return PlainTextResponse(
            f"{email or 'this account'} may not use this console: ask an administrator to add "
            "it to console.allowed\n",
            status_code=403,
        )
    session = sessions.keep_cache(cache)
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
