"""The daemon's ASGI application (Starlette): /healthz, /metrics, and everything else.

``build_app(host, routes=...)`` is the one place the app is put together. Other parts of
referral-watch join it by passing their own Starlette routes (the webhook receiver, the answer
pages): they are matched before the built-in ones, and every response still gets the security
headers and the same 404 page.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from referral_watch.config import Config
from referral_watch.watchdog import Progress
from referral_watch.web.identity import Identity, LoginLimiter
from referral_watch.web.signin import PROBE_PATHS

# Nothing is loaded from elsewhere: scripts, styles and images come only from this server.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    # Pages and /api/leads carry lead data: no browser or proxy keeps a copy. A response that
    # says otherwise (the static files) keeps its own.
    (b"cache-control", b"no-store"),
)


class Host(Protocol):
    """What the app needs from the daemon (tests pass a real Daemon that is not serving)."""

    config: Config
    clock: Callable[[], datetime]
    metrics: Any  # referral_watch.daemon.Metrics: its .registry is served at /metrics
    progress: Progress  # whether the work in flight moves: /livez (and the systemd watchdog)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """The health verdict and its JSON body: the same one `status --check` gives."""
        ...


def build_app(
    host: Host, routes: Sequence[BaseRoute] = (), open_paths: Sequence[str] = ()
) -> Starlette:
    """The whole web app for one daemon.

    ``routes``: extra Starlette routes (``Route``, ``Mount``) from other parts, e.g.
    ``build_app(daemon, routes=[Route("/webhooks/partner-center", receive, methods=["POST"])])``.
    They come first, so they win over the console's own paths; they may read
    ``request.app.state.host`` for the daemon (its config, clock, health). Every path needs the
    console's sign-in (``request.state.viewer`` is the person) except ``/healthz``,
    ``/livez``, ``/metrics``, ``/static/*``, ``/auth/*``, ``webhooks.path`` and the
    ``open_paths`` given here (for machines, e.g. a webhook receiver). Without ``[console]``
    only those are served. Forms check ``console.checked_form(request)`` (the CSRF token)
    before acting.
    """
    from starlette.middleware.sessions import SessionMiddleware

    from referral_watch.web import answer, claim, console, signin

    identity = Identity()  # one MSAL application for the process's sign-ins
    sessions = signin.Sessions(forget_account=identity.forget)
    app = Starlette(
        routes=[
            *routes,
            *_operations_routes(host),
            *answer.routes(),  # the answer page (SPEC 14) is part of the console
            *claim.routes(),  # and so is the claim page (SPEC 17)
            *console.routes(),
            *signin.auth_routes(),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.host = host
    app.state.sessions = sessions
    app.state.identity = identity
    app.state.login_limiter = LoginLimiter()
    app.add_middleware(signin.SignInGate, host=host, sessions=sessions, open_paths=open_paths)
    settings = host.config.console
    app.add_middleware(
        SessionMiddleware,
        # Without a configured secret (sign_in = "none"), sessions last as long as the process.
        secret_key=(settings.session_secret if settings else None) or secrets.token_urlsafe(32),
        session_cookie="referral_watch_session",
        max_age=signin.SESSION_LIFETIME,
        same_site="lax",
        https_only=_https(host.config),
    )
    app.add_middleware(KnownHosts, host=host)
    app.add_middleware(SecurityHeaders)
    return app


def _https(config: Config) -> bool:
    server = config.server
    return bool(server and server.public_url and server.public_url.startswith("https://"))


def _operations_routes(host: Host) -> list[BaseRoute]:
    from prometheus_client import make_asgi_app

    async def healthz(_: Request) -> Response:
        # On the event loop, not in the thread pool: the verdict is in memory, and a probe
        # must never queue behind slow work (certificate downloads, state writes) there.
        ok, body = host.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    async def livez(_: Request) -> Response:
        """Liveness: is the process stuck? Not whether it can poll (that is /healthz): a
        restart cannot renew an expired sign-in, but it does end a cycle that no longer
        moves. The same rule as the systemd watchdog's ping. On the event loop, as /healthz:
        a probe must not queue behind slow work in the thread pool."""
        stuck = host.progress.stuck_for()
        if stuck is None:
            return JSONResponse({"status": "alive"})
        body = {
            "status": "stuck",
            "stuck_seconds": round(stuck),
            "limit_seconds": round(host.progress.stuck_after),
        }
        return JSONResponse(body, status_code=503)

    return [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/livez", livez, methods=["GET", "HEAD"]),
        Route("/metrics", _Asgi(make_asgi_app(host.metrics.registry)), methods=["GET", "HEAD"]),
    ]


class _Asgi:
    """An ASGI callable as a Route endpoint (Starlette treats plain functions as handlers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return PlainTextResponse("not found\n", status_code=404)
    detail = exc.detail if isinstance(exc, HTTPException) else "error"
    return PlainTextResponse(f"{detail}\n", status_code=status)


class SecurityHeaders:
    """Adds the CSP and friends (and ``Cache-Control: no-store`` unless the response set its
    own) to every response, whichever route (or error) made it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


class KnownHosts:
    """421 for a ``Host`` this server does not go by, on every path but the probes'.

    DNS rebinding: a web page the operator opens re-points its own name at 127.0.0.1 and reads
    the console (with ``sign_in = "none"``, every lead, and silences them) as same-origin. The
    browser still sends the attacker's name as ``Host``, so only names this server goes by are
    served: ``server.public_url``'s host, ``server.listen``'s host and ``localhost``. An IP
    address is always accepted: a rebinding page has a name, never our address. The probes
    (/healthz, /livez, /metrics) answer any Host: Kubernetes and Prometheus ask by address.
    """

    def __init__(self, app: ASGIApp, host: Host) -> None:
        self.app = app
        self.host = host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        name = host_name(Headers(scope=scope).get("host", ""))
        if name is None or not known_host(name, self.host.config):
            response = PlainTextResponse(
                "misdirected request: this server does not go by that name "
                "(open it at server.public_url or server.listen)\n",
                status_code=421,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def host_name(header: str) -> str | None:
    """The name in a ``Host`` header without its port, lower case; None when malformed."""
    text = header.strip().lower()
    if text.startswith("["):  # [::1]:9464
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name
    name, colon, port = text.partition(":")
    if colon and not port.isdigit():
        return None
    return name.rstrip(".") or None


def known_host(name: str, config: Config) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    names = {"localhost"}
    server = config.server
    if server is not None:
        names.add(server.host.lower())
        if server.public_url:
            names.add((urlsplit(server.public_url).hostname or "").lower())
    return name in names
