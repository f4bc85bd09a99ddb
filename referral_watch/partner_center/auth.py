"""Bearer tokens for Partner Center: MSAL sign-in (device code, cached refresh), env, command.

Partner Center accepts only a signed-in user's delegated token (App+User) and enforces MFA, so
the operator signs in once by device code (`referral-watch login`) and the daemon refreshes the
token silently from MSAL's token cache file (token_cache.py: mode 0600, atomic writes under a
file lock). No token or secret is ever logged or put into an exception message.

``TokenProvider`` is the one interface every token source implements; the API client
(partner_center.py) and anything else that calls Partner Center take one.

msal is imported lazily, inside the MSAL code paths, so `referral-watch --help` stays quick.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol
from urllib.parse import urlparse

import structlog

from referral_watch.config import AuthConfig, Config, format_duration
from referral_watch.errors import AuthError
from referral_watch.partner_center.token_cache import LOGIN_HINT, CacheFile, check_cache_permissions

log = structlog.get_logger(__name__)

NOT_SIGNED_IN = f"Not signed in to Microsoft: {LOGIN_HINT}"
PUBLIC_CLOUD_HOST = "login.microsoftonline.com"
HTTP_TIMEOUT = 30  # seconds; MSAL's own default is to wait forever
COMMAND_TOKEN_TTL = 300.0  # a command's token is reused this long unless force_refresh

# Token endpoint errors that a new sign-in will not fix.
_TRANSIENT_ERRORS = {"temporarily_unavailable", "server_error", "slow_down"}
_CLIENT_ERRORS = {"invalid_client", "unauthorized_client", "invalid_request", "invalid_scope"}


class TokenProvider(Protocol):
    """Gives bearer tokens for the Partner Center API."""

    def get_token(self, *, force_refresh: bool = False) -> str:
        """A bearer token; raises AuthError when there is none."""
        ...


# --- env -----------------------------------------------------------------------------------


class EnvTokenProvider:
    """A token some other tool keeps fresh in an environment variable."""

    def __init__(self, variable: str, environ: Mapping[str, str] | None = None) -> None:
        self.variable = variable
        self._environ = environ
        self.renew_hint = f"put a fresh token in the environment variable {variable}"

    def get_token(self, *, force_refresh: bool = False) -> str:
        # Read at every call: a supervisor may update the variable between calls.
        environ = os.environ if self._environ is None else self._environ
        token = _bare_token(environ.get(self.variable, ""))
        if not token:
            raise AuthError(
                f"environment variable {self.variable} is not set or empty "
                '(auth.method = "env" reads the Partner Center bearer token from it): '
                'export a token there, or use auth.method = "msal" and referral-watch login'
            )
        return token


# --- command -------------------------------------------------------------------------------


class CommandTokenProvider:
    """A token printed by a program, e.g. `az account get-access-token ... -o tsv`.

    Runs without a shell and with a timeout. The token is reused for a few minutes, so a
    poll of many pages does not start the program once per page.
    """

    def __init__(
        self, command: Sequence[str], timeout: float, *, reuse_for: float = COMMAND_TOKEN_TTL
    ) -> None:
        if not command:
            raise AuthError('auth.command is empty: give ["program", "arg", ...]')
        self.command = list(command)
        self.timeout = timeout
        self.renew_hint = f"check that `{self.command[0]}` prints a fresh Partner Center token"
        self._reuse_for = reuse_for
        self._token: str | None = None
        self._fetched_at = 0.0

    @property
    def program(self) -> str:
        return self.command[0]

    def get_token(self, *, force_refresh: bool = False) -> str:
        fresh = time.monotonic() - self._fetched_at < self._reuse_for
        if self._token and fresh and not force_refresh:
            return self._token
        self._token = None
        token = self._run()
        self._token, self._fetched_at = token, time.monotonic()
        log.debug("auth.command_token", program=self.program)
        return token

    def _run(self) -> str:
        where = f"{self.program} (auth.command)"
        try:
            process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, so a timeout kills it all
            )
        except FileNotFoundError:
            raise AuthError(
                f"cannot run {where}: program not found (check the path, or PATH)"
            ) from None
        except OSError as exc:
            raise AuthError(f"cannot run {where}: {exc.strerror or exc}") from None
        try:
            out, err = process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise AuthError(
                f"{where} did not finish within {self.timeout:g}s and was stopped "
                "(raise auth.command_timeout, or check that it needs no interactive input)"
            ) from None
        if process.returncode != 0:
            status = (
                f"was killed by signal {-process.returncode}"
                if process.returncode < 0
                else f"failed with exit status {process.returncode}"
            )
            detail = _tail(err.decode("utf-8", errors="replace"))
            raise AuthError(f"{where} {status}" + (f": {detail}" if detail else ""))
        return _token_from_output(out.decode("utf-8", errors="replace"), where)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    # A grandchild that left the group may hold the pipes open: do not wait for it forever.
    with suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=5)


def _token_from_output(output: str, where: str) -> str:
    text = output.strip()
    if text.startswith("{"):
        # `az account get-access-token` without `-o tsv` prints JSON: accept it.
        try:
            data = json.loads(text)
        except ValueError:
            data = {}
        text = str(data.get("accessToken") or data.get("access_token") or "")
    token = _bare_token(text)
    if not token:
        raise AuthError(f"{where} printed no token on standard output")
    if any(ch.isspace() for ch in token):
        # Do not echo the output: it may well contain the token.
        raise AuthError(
            f"{where} printed more than a token (several words or lines): "
            "it must print only the access token (for az: --query accessToken -o tsv)"
        )
    return token


def _bare_token(text: str) -> str:
    token = text.strip()
    if token[:7].lower() == "bearer ":
        token = token[7:].strip()
    return token


def _tail(text: str, lines: int = 5, limit: int = 400) -> str:
    """The last few non-empty lines of a program's stderr, on one line."""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    joined = " | ".join(kept)
    return joined if len(joined) <= limit else "…" + joined[-limit:]


# --- MSAL ----------------------------------------------------------------------------------


def _authority_host(auth: AuthConfig) -> str:
    return urlparse(auth.authority).hostname or auth.authority


def _is_confidential(auth: AuthConfig) -> bool:
    return bool(auth.client_secret or auth.client_certificate)


def _client_credential(auth: AuthConfig) -> str | dict[str, str] | None:
    if auth.client_certificate:
        try:
            pem = auth.client_certificate.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not a PEM text file"
            raise AuthError(
                f"cannot read auth.client_certificate {auth.client_certificate}: {reason}"
            ) from None
        return {"private_key": pem, "thumbprint": auth.client_certificate_thumbprint or ""}
    return auth.client_secret


@contextmanager
def _identity_errors(host: str, unusable: str | None = None) -> Iterator[None]:
    """Translate what MSAL and requests raise into AuthError, without any token in it.

    ``unusable`` replaces MSAL's own wording when the endpoint answers but not usefully.
    """
    from msal.exceptions import MsalError

    try:
        yield
    except AuthError:
        raise
    except OSError as exc:  # requests' ConnectionError, Timeout, SSLError are OSErrors
        log.warning("auth.unreachable", host=host, error=type(exc).__name__)
        raise AuthError(
            f"cannot reach {host} (Microsoft sign-in): {_network_reason(exc)}; "
            "check the network, proxy and auth.authority"
        ) from None
    except (MsalError, ValueError) as exc:
        log.warning("auth.identity_error", host=host, error=type(exc).__name__)
        detail = (
            unusable or f"Microsoft sign-in at {host} gave an unusable answer: {_short(str(exc))}"
        )
        raise AuthError(
            f"{detail} (check auth.tenant_id, auth.client_id and auth.authority)"
        ) from None


_REASONS = (
    re.compile(r"\[Errno -?\d+\] ([^'\")]+)"),  # connection refused, name not known ...
    re.compile(r"\[SSL: [A-Z_]+\] ([^'\"(]+)"),  # certificate verify failed ...
    re.compile(r"(timed out)"),
)


def _network_reason(exc: OSError) -> str:
    """The useful end of requests' long exception text, e.g. ``Connection refused``."""
    text = str(exc)
    for pattern in _REASONS:
        found = pattern.search(text)
        if found:
            return found.group(1).strip().rstrip(".:")
    return _short(text or type(exc).__name__, 160)


def _short(text: str, limit: int = 240) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


def _error_text(result: Mapping[str, Any]) -> str:
    """``invalid_grant: AADSTS50173: ...`` (first line of the description, never a token)."""
    code = str(result.get("error") or "unknown_error")
    description = str(result.get("error_description") or "").strip().splitlines()
    return f"{code}: {_short(description[0], 160)}" if description else code


# The two APIs an app registration needs permissions on (Microsoft's "Partner API
# authentication" and "Referrals API authentication" pages): referral tokens are issued for
# "Microsoft Partner", the webhook registration's for "Microsoft Partner Center".
_APIS = {
    "api.partner.microsoft.com": (
        '"Microsoft Partner" (app id 4990cffe-04e8-4e8b-808a-1175604b879f, shown as '
        '"Microsoft Dev Center" in some tenants)'
    ),
    "api.partnercenter.microsoft.com": (
        '"Microsoft Partner Center" (app id fa3d9a0c-3fb0-42cc-9193-47c7ecd2edbd)'
    ),
}
_MFA_RULE = "Partner Center requires MFA for every App+User call since 2026-04-01"


def _api_named(scope: str) -> str:
    host = urlparse(scope if "://" in scope else f"https://{scope}").hostname or scope
    return _APIS.get(host, f"the API of {scope}")


def known_fix(result: Mapping[str, Any], scope: str) -> str | None:
    """One line naming the fix for the AADSTS errors an operator can fix (Microsoft's error
    code reference): missing admin consent (65001), a permission the app registration lacks
    (650057), multi-factor sign-in required (50076) or MFA not set up yet (50079)."""
    codes = set(re.findall(r"AADSTS(\d+)", str(result.get("error_description") or "")))
    codes |= {str(code) for code in result.get("error_codes") or ()}
    api = _api_named(scope)
    if "65001" in codes:
        return (
            f"Microsoft sign-in: no admin consent for {api} (AADSTS65001): an admin must grant "
            "admin consent on the app registration (API permissions, Grant admin consent), "
            "then run `referral-watch login`"
        )
    if "650057" in codes:
        return (
            "Microsoft sign-in: the app registration lacks a permission (AADSTS650057): add the "
            f"delegated permission user_impersonation of {api} (API permissions, APIs my "
            "organization uses), grant admin consent, then run `referral-watch login`"
        )
    if "50079" in codes:
        return (
            "Microsoft sign-in: the account must set up multi-factor authentication first "
            f"(AADSTS50079; {_MFA_RULE}): set it up at https://aka.ms/mfasetup, then run "
            "`referral-watch login`"
        )
    if "50076" in codes:
        return (
            f"Microsoft sign-in: multi-factor authentication required (AADSTS50076; {_MFA_RULE}):"
            " run `referral-watch login` and complete the MFA prompt"
        )
    return None


def _build_app(
    auth: AuthConfig,
    cache: Any,
    http_client: Any | None,
    *,
    tenant_id: str | None = None,
    client_id: str | None = None,
    public: bool = True,
) -> Any:
    import msal

    host = _authority_host(auth)
    tenant = tenant_id or auth.tenant_id
    authority = f"{auth.authority.rstrip('/')}/{tenant}"
    options: dict[str, Any] = {
        "authority": authority,
        "token_cache": cache,
        "http_client": http_client,
        "timeout": HTTP_TIMEOUT,  # used when MSAL makes its own requests session
        # Another host (a sovereign cloud, a test endpoint) is not in Microsoft's instance list.
        "instance_discovery": None if host == PUBLIC_CLOUD_HOST else False,
    }
    unusable = f"{authority} does not answer as a Microsoft sign-in authority for tenant {tenant!r}"
    with _identity_errors(host, unusable):
        if public:
            return msal.PublicClientApplication(client_id or auth.client_id, **options)
        return msal.ConfidentialClientApplication(
            client_id or auth.client_id, client_credential=_client_credential(auth), **options
        )


def _remove_accounts(cache: Any, accounts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Remove the accounts and every token they own from the cache; their usernames."""
    from msal import TokenCache

    kinds = TokenCache.CredentialType
    removers = (
        (kinds.REFRESH_TOKEN, cache.remove_rt),
        (kinds.ACCESS_TOKEN, cache.remove_at),
        (kinds.ID_TOKEN, cache.remove_idt),
        (kinds.ACCOUNT, cache.remove_account),
    )
    for account in accounts:
        owned = {
            "home_account_id": account["home_account_id"],
            "environment": account["environment"],
        }
        for kind, remove in removers:
            for entry in list(cache.search(kind, query=owned)):
                remove(entry)
    return [str(a.get("username") or a.get("home_account_id")) for a in accounts]


class MsalTokenProvider:
    """Silent tokens for the account `referral-watch login` signed in.

    The cache file is re-read at every call, so a `login` while the daemon runs takes
    effect at the next poll. With a client secret or certificate configured, the refresh is
    done as a confidential client (the token is still the signed-in user's).
    """

    renew_hint = "run `referral-watch login` if needed"

    def __init__(self, config: Config, *, http_client: Any | None = None) -> None:
        self._auth = config.auth
        self._file = CacheFile(config.cache_path)
        self._http_client = http_client
        self._app: Any = None
        self._cache: Any = None
        self._lock = threading.Lock()
        warning = check_cache_permissions(config.cache_path)
        if warning:
            log.warning("auth.cache_permissions", path=str(config.cache_path), problem=warning)

    def get_token(self, *, force_refresh: bool = False) -> str:
        with self._lock:
            app = self._application()
            self._file.load_into(self._cache)
            accounts = app.get_accounts()
            if not accounts:
                raise AuthError(NOT_SIGNED_IN, needs_login=True)
            if len(accounts) > 1:
                log.warning("auth.several_accounts", using=accounts[0].get("username"))
            with _identity_errors(_authority_host(self._auth)):
                result = app.acquire_token_silent_with_error(
                    [self._auth.scope], accounts[0], force_refresh=force_refresh
                )
            if self._file.save(self._cache):
                log.debug("auth.cache_saved", path=str(self._file.path))
            return _access_token(result, self._auth.scope)

    def _application(self) -> Any:
        # Built on first use (it fetches the tenant's OpenID configuration); a failure is
        # retried at the next call.
        if self._app is None:
            import msal

            cache = msal.SerializableTokenCache()
            self._app = _build_app(
                self._auth, cache, self._http_client, public=not _is_confidential(self._auth)
            )
            self._cache = cache
        return self._app


def _access_token(result: Mapping[str, Any] | None, scope: str) -> str:
    if result and "access_token" in result:
        return str(result["access_token"])
    if not result:
        raise AuthError(
            f"Microsoft sign-in expired or was revoked (no refresh token in the cache): "
            f"{LOGIN_HINT}",
            needs_login=True,
        )
    code = str(result.get("error"))
    fix = known_fix(result, scope)
    if fix is not None:
        log.warning("auth.refresh_rejected", error=code)
        raise AuthError(fix, needs_login=True)
    if code in _TRANSIENT_ERRORS:
        raise AuthError(f"Microsoft sign-in is unavailable for now ({_error_text(result)})")
    if code in _CLIENT_ERRORS:
        raise AuthError(
            f"Microsoft rejected the app registration ({_error_text(result)}): check "
            "auth.client_id, auth.scope and the client secret or certificate"
        )
    log.warning("auth.refresh_rejected", error=code)
    raise AuthError(
        f"Microsoft sign-in expired or was revoked ({_error_text(result)}): {LOGIN_HINT}",
        needs_login=True,
    )


def token_provider(config: Config, *, http_client: Any | None = None) -> TokenProvider:
    """The provider ``auth.method`` asks for."""
    auth = config.auth
    if auth.method == "env":
        return EnvTokenProvider(auth.token_env)
    if auth.method == "command":
        return CommandTokenProvider(auth.command or [], auth.command_timeout.total_seconds())
    return MsalTokenProvider(config, http_client=http_client)


# --- login / logout ------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedIn:
    username: str
    tenant_id: str
    name: str


CONFIDENTIAL_LOGIN = (
    "`referral-watch login` signs in by device code, which MSAL offers to public clients "
    'only: remove auth.client_secret / auth.client_certificate (and set "Allow public client '
    'flows" = Yes on the app registration), see README, Sign in'
)


def login(
    config: Config,
    show: Callable[[str], None],
    *,
    tenant_id: str | None = None,
    client_id: str | None = None,
    http_client: Any | None = None,
) -> SignedIn:
    """Device-code sign-in: ``show`` gets Microsoft's text (URL and code); blocks until the
    user has signed in or ``auth.login_timeout`` passed. Replaces any earlier account."""
    import msal

    auth = config.auth
    if _is_confidential(auth):
        raise AuthError(CONFIDENTIAL_LOGIN)
    if not ((tenant_id or auth.tenant_id) and (client_id or auth.client_id)):
        raise AuthError("sign-in needs auth.tenant_id and auth.client_id in the config")
    cache_file = CacheFile(config.cache_path)
    cache = msal.SerializableTokenCache()
    cache_file.load_into(cache, tolerate_corrupt=True)  # a damaged cache is simply replaced
    app = _build_app(auth, cache, http_client, tenant_id=tenant_id, client_id=client_id)
    host = _authority_host(auth)
    with _identity_errors(host):
        flow = app.initiate_device_flow(scopes=[auth.scope])
    if "user_code" not in flow:
        raise AuthError(
            known_fix(flow, auth.scope)
            or f"Microsoft did not start the device-code sign-in ({_error_text(flow)}): "
            + _registration_hint(flow)
        )
    show(str(flow["message"]))
    # MSAL polls until flow["expires_at"]; cut that to our own limit.
    deadline = time.time() + auth.login_timeout.total_seconds()
    flow["expires_at"] = min(float(flow.get("expires_at", deadline)), deadline)
    with _identity_errors(host):
        result = app.acquire_token_by_device_flow(flow)
    if "access_token" not in result:
        raise AuthError(known_fix(result, auth.scope) or _login_failure(result, auth.login_timeout))
    claims: Mapping[str, Any] = result.get("id_token_claims") or {}
    others = [a for a in app.get_accounts() if a.get("local_account_id") != claims.get("oid")]
    _remove_accounts(cache, others)
    cache_file.save(cache)
    signed_in = SignedIn(
        username=str(claims.get("preferred_username") or claims.get("upn") or "(unknown)"),
        tenant_id=str(claims.get("tid") or tenant_id or auth.tenant_id),
        name=str(claims.get("name") or ""),
    )
    log.info("auth.login", username=signed_in.username, tenant_id=signed_in.tenant_id)
    return signed_in


def _registration_hint(result: Mapping[str, Any]) -> str:
    if "7000218" in str(result.get("error_description")):
        return 'set "Allow public client flows" = Yes on the app registration'
    return "check auth.tenant_id, auth.client_id and the app registration"


def _login_failure(result: Mapping[str, Any], timeout: timedelta) -> str:
    code = str(result.get("error"))
    if code in {"authorization_pending", "slow_down", "expired_token", "code_expired"}:
        return (
            f"sign-in was not completed within {format_duration(timeout)} "
            "(auth.login_timeout): run `referral-watch login` again and enter the code sooner"
        )
    if code == "authorization_declined":
        return "sign-in was declined in the browser: run `referral-watch login` again to retry"
    return f"sign-in failed ({_error_text(result)}): " + _registration_hint(result)


def logout(config: Config, *, http_client: Any | None = None) -> list[str]:
    """Remove every account (and its tokens) from the token cache; the usernames removed.

    Works offline: it edits the cache file only (``http_client`` is accepted for symmetry
    with ``login``; Microsoft is not contacted, the refresh token is simply forgotten).
    """
    import msal

    cache_file = CacheFile(config.cache_path)
    if not cache_file.path.exists():
        return []
    if cache_file.is_damaged():
        cache_file.clear()  # whatever it held cannot be used, but may hold a refresh token
        log.info("auth.logout", accounts=0, damaged_cache_cleared=True)
        return []
    cache = msal.SerializableTokenCache()
    cache_file.load_into(cache, tolerate_corrupt=True)
    accounts = list(cache.search(msal.TokenCache.CredentialType.ACCOUNT))
    removed = _remove_accounts(cache, accounts)
    cache_file.save(cache)
    log.info("auth.logout", accounts=len(removed))
    return removed
