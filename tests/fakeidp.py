"""A fake Microsoft identity endpoint (Entra ID v2.0) over TLS on 127.0.0.1, for real MSAL.

It implements just enough for MSAL's device-code sign-in, the authorization code flow with
PKCE (the console's sign-in) and silent refresh:

- ``GET  /{tenant}/v2.0/.well-known/openid-configuration``
- ``POST /{tenant}/oauth2/v2.0/devicecode``
- ``GET  /{tenant}/oauth2/v2.0/authorize`` (response_type=code with an S256 code_challenge:
  "signs in" ``username`` at once and redirects to redirect_uri with a code and the state)
- ``POST /{tenant}/oauth2/v2.0/token`` (device_code grant: ``authorization_pending`` first,
  then tokens; authorization_code grant: tokens once the code_verifier matches the challenge,
  with the id_token carrying the request's nonce; refresh_token grant: new tokens, or
  ``invalid_grant`` after ``revoke()``)

Tokens are unique random strings; id_tokens are unsigned-but-well-formed JWTs (MSAL reads
their claims without checking a signature). Usage:

    with FakeIdP() as idp:
        session = idp.session()            # a requests.Session trusting the fake's CA
        config: auth.authority = idp.url   # not login.microsoftonline.com: no instance discovery
        ...
        idp.revoke()                       # every refresh token issued so far stops working
        assert idp.issued_access_tokens[-1] == token

Import it from a test module as ``from fakeidp import FakeIdP`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import requests
import trustme

LOOPBACK = "127.0.0.1"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
RESERVED_SCOPES = {"openid", "profile", "offline_access"}


@dataclass(frozen=True)
class IdpRequest:
    method: str
    path: str
    form: dict[str, str]
    authorization: str | None  # the HTTP Authorization header (Basic for client secrets)

    @property
    def grant_type(self) -> str | None:
        return self.form.get("grant_type")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unsigned_jwt(claims: dict[str, Any]) -> str:
    header = {"typ": "JWT", "alg": "RS256", "kid": "fake-idp"}
    parts = [json.dumps(header).encode(), json.dumps(claims).encode(), b"not-a-real-signature"]
    return ".".join(_b64url(p) for p in parts)


class _Handler(BaseHTTPRequestHandler):
    server: _IdpServer

    def do_GET(self) -> None:
        self._dispatch(form=dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True)))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8") if length else ""
        self._dispatch(form=dict(parse_qsl(body, keep_blank_values=True)))

    def _dispatch(self, form: dict[str, str]) -> None:
        path = urlsplit(self.path).path
        request = IdpRequest(self.command, path, form, self.headers.get("Authorization"))
        status, payload = self.server.idp._answer(request)
        if status == 302:  # the authorize endpoint sends the browser back to the app
            self.send_response(302)
            self.send_header("Location", payload["location"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class _IdpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, idp: FakeIdP, context: ssl.SSLContext) -> None:
        self.idp = idp
        super().__init__((LOOPBACK, 0), _Handler)
        # The handshake happens in the handler thread, so one bad client cannot stall accept().
        self.socket = context.wrap_socket(
            self.socket, server_side=True, do_handshake_on_connect=False
        )

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up (or reject the certificate) are not test failures here


class FakeIdP:
    """A threaded HTTPS Entra ID stand-in with a throw-away trustme CA.

    Knobs (plain attributes, change them at any time):
    - ``access_token_lifetime``: ``expires_in`` of issued access tokens (MSAL treats anything
      under 5 minutes as already expired, so 60 forces a refresh on every silent call);
    - ``pending_polls``: how many ``authorization_pending`` answers a device code gets first;
    - ``device_outcome``: ``"approve"``, ``"decline"`` (authorization_declined) or ``"never"``
      (pending forever, for timeouts);
    - ``on_token_request``: called (with the request) before a token request is answered;
    - ``token_error``: an AADSTS error every device-code and refresh token request gets.
    """

    def __init__(
        self,
        *,
        tenant: str = "contoso.onmicrosoft.com",
        tenant_guid: str = "11111111-2222-3333-4444-555555555555",
        username: str = "alice@contoso.example",
        name: str = "Alice Example",
        object_id: str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    ) -> None:
        self.tenant = tenant
        self.tenant_guid = tenant_guid
        self.username = username
        self.name = name
        self.object_id = object_id
        self.access_token_lifetime = 3600
        self.pending_polls = 1
        self.device_outcome = "approve"
        self.on_token_request: Callable[[IdpRequest], None] | None = None
        self.id_claims: dict[str, Any] = {}
        # (error, "AADSTSnnn: description", nnn): answered to every device-code and refresh
        # token request while set, as Entra ID answers a missing consent or an MFA demand.
        self.token_error: tuple[str, str, int] | None = None
        self.requests: list[IdpRequest] = []
        self.issued_access_tokens: list[str] = []
        self.issued_refresh_tokens: list[str] = []
        self.device_codes: dict[str, int] = {}  # device code -> polls answered so far
        self.auth_codes: dict[str, dict[str, str]] = {}  # code -> what /authorize was asked
        self.authorize_requests: list[dict[str, str]] = []
        self._device_scopes: dict[str, str] = {}  # device code -> scope asked for
        self._valid_refresh_tokens: set[str] = set()
        self._lock = threading.Lock()
        self._ca = trustme.CA()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: _IdpServer | None = None
        self._thread: threading.Thread | None = None
        self._sessions: list[requests.Session] = []

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeIdP:
        self._tmp = tempfile.TemporaryDirectory(prefix="fakeidp-")
        self._ca.cert_pem.write_to_path(str(self.ca_path))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert(LOOPBACK).configure_cert(context)
        self._server = _IdpServer(self, context)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        for session in self._sessions:
            session.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
        self._server = self._thread = self._tmp = None

    def __enter__(self) -> FakeIdP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # addresses and clients ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """``https://127.0.0.1:PORT``: use it as ``auth.authority``."""
        if self._server is None:
            raise RuntimeError("FakeIdP is not started")
        return f"https://{LOOPBACK}:{self._server.server_address[1]}"

    @property
    def ca_path(self) -> Path:
        """PEM file of the CA that signed the server certificate."""
        if self._tmp is None:
            raise RuntimeError("FakeIdP is not started")
        return Path(self._tmp.name) / "fakeidp-ca.pem"

    def session(self) -> requests.Session:
        """A requests.Session for MSAL's ``http_client`` that trusts this fake's CA.

        ``trust_env = False``: otherwise REQUESTS_CA_BUNDLE (set on this machine) overrides
        ``verify`` and proxies from the environment would be used. Closed by ``stop()``.
        """
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.ca_path)
        self._sessions.append(session)
        return session

    # behaviour ---------------------------------------------------------------------------

    def revoke(self) -> None:
        """Every refresh token issued so far now gets ``invalid_grant``."""
        with self._lock:
            self._valid_refresh_tokens.clear()

    def discovery_requests(self) -> list[IdpRequest]:
        """The OpenID configuration lookups made so far."""
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/openid-configuration")]

    def token_requests(self, grant_type: str | None = None) -> list[IdpRequest]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path.endswith("/oauth2/v2.0/token")
                and (grant_type is None or r.grant_type == grant_type)
            ]

    # the endpoint ------------------------------------------------------------------------

    def _answer(self, request: IdpRequest) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(request)
        parts = request.path.strip("/").split("/")
        tenant, rest = parts[0], "/".join(parts[1:])
        if tenant not in {self.tenant, self.tenant_guid, "organizations", "common"}:
            return 400, self._error(
                "invalid_tenant", f"AADSTS90002: Tenant '{tenant}' not found.", 90002
            )
        if request.method == "GET" and rest == "v2.0/.well-known/openid-configuration":
            return 200, self._openid_configuration()
        if request.method == "POST" and rest == "oauth2/v2.0/devicecode":
            return 200, self._device_code(request)
        if request.method == "GET" and rest == "oauth2/v2.0/authorize":
            return self._authorize(request)
        if request.method == "POST" and rest == "oauth2/v2.0/token":
            if self.on_token_request is not None:
                self.on_token_request(request)
            return self._token(request)
        return 404, self._error("not_found", f"no such endpoint: {request.path}", 0)

    def _openid_configuration(self) -> dict[str, Any]:
        # Like Entra ID, the endpoints name the tenant by its GUID whatever name was asked for.
        base = f"{self.url}/{self.tenant_guid}"
        return {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "jwks_uri": f"{self.url}/{self.tenant_guid}/discovery/v2.0/keys",
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "tenant_region_scope": "EU",
        }

    def _device_code(self, request: IdpRequest) -> dict[str, Any]:
        device_code = "fake-dc-" + secrets.token_urlsafe(24)
        user_code = secrets.choice("BCDFGHJKLMNPQRSTVWXZ") + secrets.token_hex(4).upper()
        with self._lock:
            self.device_codes[device_code] = 0
            self._device_scopes[device_code] = request.form.get("scope", "")
        verification_uri = f"{self.url}/devicelogin"
        return {
            "user_code": user_code,
            "device_code": device_code,
            "verification_uri": verification_uri,
            "expires_in": 900,
            "interval": 1,  # MSAL sleeps interval seconds between polls: keep tests quick
            "message": (
                f"To sign in, use a web browser to open the page {verification_uri} "
                f"and enter the code {user_code} to authenticate."
            ),
        }

    def _authorize(self, request: IdpRequest) -> tuple[int, dict[str, Any]]:
        asked = request.form
        with self._lock:
            self.authorize_requests.append(asked)
        if asked.get("response_type") != "code" or not asked.get("redirect_uri"):
            return 400, self._error("invalid_request", "AADSTS900144: response_type=code", 900144)
        if asked.get("code_challenge_method") != "S256" or not asked.get("code_challenge"):
            return 400, self._error("invalid_request", "AADSTS501491: PKCE required", 501491)
        code = "fake-code-" + secrets.token_urlsafe(24)
        with self._lock:
            self.auth_codes[code] = {
                "challenge": asked["code_challenge"],
                "redirect_uri": asked["redirect_uri"],
                "scope": asked.get("scope", ""),
                "nonce": asked.get("nonce", ""),
                "username": self.username,  # who "signs in": change it between sign-ins
                "name": self.name,
            }
        query = urlencode({"code": code, "state": asked.get("state", ""), "session_state": "s"})
        return 302, {"location": f"{asked['redirect_uri']}?{query}"}

    def _code_grant(self, request: IdpRequest) -> tuple[int, dict[str, Any]]:
        form = request.form
        with self._lock:
            asked = self.auth_codes.pop(form.get("code", ""), None)
        if asked is None:
            return 400, self._error("invalid_grant", "AADSTS70008: code expired or used", 70008)
        verifier = form.get("code_verifier", "")
        if _b64url(hashlib.sha256(verifier.encode()).digest()) != asked["challenge"]:
            return 400, self._error("invalid_grant", "AADSTS501481: code_verifier", 501481)
        if form.get("redirect_uri") != asked["redirect_uri"]:
            return 400, self._error("invalid_grant", "AADSTS70001: redirect_uri", 70001)
        if not (form.get("client_secret") or request.authorization):
            return 401, self._error("invalid_client", "AADSTS7000218: no secret", 7000218)
        return 200, self._tokens(
            request,
            asked["scope"],
            nonce=asked["nonce"],
            username=asked["username"],
            name=asked["name"],
        )

    def _token(self, request: IdpRequest) -> tuple[int, dict[str, Any]]:
        failing = self.token_error
        if failing is not None and request.grant_type in (DEVICE_CODE_GRANT, "refresh_token"):
            return 400, self._error(*failing)
        if request.grant_type == DEVICE_CODE_GRANT:
            return self._device_code_grant(request)
        if request.grant_type == "authorization_code":
            return self._code_grant(request)
        if request.grant_type == "refresh_token":
            with self._lock:
                valid = request.form.get("refresh_token") in self._valid_refresh_tokens
            if not valid:
                return 400, self._error(
                    "invalid_grant",
                    "AADSTS50173: The provided grant has expired due to it being revoked, "
                    "a fresh auth token is needed.",
                    50173,
                )
            return 200, self._tokens(request, request.form.get("scope", ""))
        return 400, self._error("unsupported_grant_type", "AADSTS70003: not supported", 70003)

    def _device_code_grant(self, request: IdpRequest) -> tuple[int, dict[str, Any]]:
        code = request.form.get("device_code", "")
        with self._lock:
            if code not in self.device_codes:
                return 400, self._error("expired_token", "AADSTS70019: code expired", 70019)
            self.device_codes[code] += 1
            polls = self.device_codes[code]
        if self.device_outcome == "decline":
            return 400, self._error(
                "authorization_declined", "AADSTS70000: the user declined", 70000
            )
        if self.device_outcome == "never" or polls <= self.pending_polls:
            return 400, self._error(
                "authorization_pending", "AADSTS70016: pending end-user authorization", 70016
            )
        with self._lock:
            del self.device_codes[code]
            scope = self._device_scopes.pop(code)
        # The device_code grant carries no scope: it is the one the device code was asked for.
        return 200, self._tokens(request, scope)

    def _tokens(
        self,
        request: IdpRequest,
        scope: str,
        *,
        nonce: str = "",
        username: str | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        now = int(time.time())
        access_token = "fake-at-" + secrets.token_urlsafe(24)
        refresh_token = "fake-rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self.issued_access_tokens.append(access_token)
            self.issued_refresh_tokens.append(refresh_token)
            self._valid_refresh_tokens.add(refresh_token)
        scopes = [s for s in scope.split() if s not in RESERVED_SCOPES]
        id_claims = {
            "iss": f"{self.url}/{self.tenant_guid}/v2.0",
            "aud": request.form.get("client_id", ""),
            "tid": self.tenant_guid,
            "oid": self.object_id,
            "sub": "fake-subject-" + self.object_id[:8],
            "preferred_username": username or self.username,
            "name": name or self.name,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "ver": "2.0",
        }
        if nonce:
            id_claims["nonce"] = nonce
        for claim, value in self.id_claims.items():
            if value is None:
                id_claims.pop(claim, None)
            else:
                id_claims[claim] = value
        client_info = {"uid": self.object_id, "utid": self.tenant_guid}
        return {
            "token_type": "Bearer",
            "scope": " ".join(scopes),
            "expires_in": self.access_token_lifetime,
            "ext_expires_in": self.access_token_lifetime,
            "access_token": access_token,
            "refresh_token": refresh_token,
            "id_token": _unsigned_jwt(id_claims),
            "client_info": _b64url(json.dumps(client_info).encode()),
        }

    def _error(self, code: str, description: str, number: int) -> dict[str, Any]:
        return {
            "error": code,
            "error_description": f"{description}\r\nTrace ID: fake\r\nTimestamp: now",
            "error_codes": [number],
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "trace_id": "fake-trace",
            "correlation_id": "fake-correlation",
        }
