"""The webhook signing certificate and its chain, fetched and built as Microsoft's sample does.

Partner Center serves the signing certificate alone (a DER ``.cer``); its issuing CA
(O=Microsoft Corporation) is in no system trust store. Microsoft's C# sample verifies it with
.NET's ``X509Chain.Build``, which fetches missing issuers from each certificate's Authority
Information Access (caIssuers). This module does the same, within limits: issuing CAs come
from ``webhooks.intermediates`` first, else from AIA URLs on a ``webhooks.issuer_hosts`` host
(plain http allowed: what comes back only counts when it verifies by signature up to a trusted
root), each URL fetched once and cached, at most ``MAX_DEPTH`` issuers deep. A host off the
lists is never contacted.

Downloads are bounded against unauthenticated callers (issue 25.5): at most
``NEW_URLS_PER_MINUTE`` URLs not fetched before, certificate and AIA URLs together; beyond that
an event is refused (401) without fetching, and the refusal is logged once.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import urlsplit

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID

from referral_watch.errors import ReferralWatchError

log = structlog.get_logger(__name__)

CERTIFICATE_MAX_BYTES = 64 * 1024  # a certificate, or a short PEM chain
CERTIFICATE_TIMEOUT = 5.0  # seconds for the whole download
CACHED = 32  # distinct URLs kept (Microsoft uses one certificate URL and one or two issuers)
FAILED_DOWNLOAD_RETRY = 60.0  # seconds before a URL whose download failed is tried again
FAILURES_KEPT = 256  # failed URLs remembered (a forger may name many paths on an allowed host)
MAX_DEPTH = 4  # issuing CAs fetched above the signing certificate, at most
NEW_URLS_PER_MINUTE = 6  # downloads of URLs not fetched before, certificate and AIA together

# Results, as counted in referral_watch_webhook_events_total{result}.
BAD_SIGNATURE = "bad_signature"
UNTRUSTED_CERTIFICATE = "untrusted_certificate"


class Rejected(ReferralWatchError):
    """An event that failed verification: answered 401, counted under ``result``."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


def host_allowed(
    url: str, hosts: frozenset[str], *, schemes: tuple[str, ...], key: str
) -> str | None:
    """Why ``url`` may not be fetched (None: it may): its scheme must be one of ``schemes``
    and its host, or host:port, one of ``hosts`` (the config key ``key``)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a URL"
    if parts.scheme.lower() not in schemes:
        return f"is not {' or '.join(schemes)}"
    host = (parts.hostname or "").lower()
    if parts.username is not None or parts.password is not None or not host:
        return "has no plain host"
    with_port = f"{host}:{port}" if port is not None else host
    if host not in hosts and with_port not in hosts:
        return f"its host {with_port} is not in {key}"
    return None


class FetchBudget:
    """At most ``per_minute`` downloads of new URLs in any minute; thread-safe.

    A refusal is logged once, when refusing starts (not for each of a flood's events)."""

    def __init__(
        self, per_minute: int = NEW_URLS_PER_MINUTE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._taken: deque[float] = deque()
        self._lock = threading.Lock()
        self._refusing = False
        self.refused = 0

    def take(self, url: str) -> bool:
        with self._lock:
            now = self._clock()
            while self._taken and now - self._taken[0] >= 60.0:
                self._taken.popleft()
            if len(self._taken) < self.per_minute:
                self._taken.append(now)
                self._refusing = False
                return True
            self.refused += 1
            if not self._refusing:
                self._refusing = True
                log.warning(
                    "webhook.fetch_limited",
                    url=url[:200],
                    limit=f"{self.per_minute} new certificate URLs a minute",
                    action="events naming other new URLs are refused (401) without fetching",
                )
            return False


_T = TypeVar("_T")


class UrlCache(Generic[_T]):
    """What each URL gave, downloaded at most once (a failure is kept for a minute), and only
    within the shared FetchBudget. ``parse(data, url)`` turns the bytes into ``_T`` or
    raises Rejected. Thread-safe: a burst of events naming one URL makes one download."""

    def __init__(
        self,
        download: Callable[[str], bytes],
        parse: Callable[[bytes, str], _T],
        budget: FetchBudget,
        what: str,
    ) -> None:
        self._download = download
        self._parse = parse
        self._budget = budget
        self._what = what
        self._lock = threading.Lock()
        self._found: OrderedDict[str, _T] = OrderedDict()
        self._failures: dict[str, tuple[float, Rejected]] = {}
        self._url_locks: dict[str, threading.Lock] = {}

    def get(self, url: str) -> _T:
        with self._lock:
            if url in self._found:
                self._found.move_to_end(url)
                return self._found[url]
            url_lock = self._url_locks.setdefault(url, threading.Lock())
        with url_lock:  # one download per URL, even when a burst of events all need it
            with self._lock:
                found = url in self._found
                failed = self._failures.get(url)
            if found:
                return self._found[url]
            if failed is not None and time.monotonic() - failed[0] < FAILED_DOWNLOAD_RETRY:
                raise failed[1]
            if not self._budget.take(url):
                raise Rejected(
                    UNTRUSTED_CERTIFICATE,
                    f"not fetching {self._what} {url[:200]}: over "
                    f"{self._budget.per_minute} new certificate URLs a minute",
                )
            try:
                value = self._parse(self._download(url), url)
            except Rejected as exc:
                with self._lock:
                    self._failures[url] = (time.monotonic(), exc)
                    while len(self._failures) > FAILURES_KEPT:
                        del self._failures[next(iter(self._failures))]  # the oldest
                    self._url_locks.pop(url, None)
                raise
            with self._lock:
                self._failures.pop(url, None)
                self._found[url] = value
                while len(self._found) > CACHED:
                    self._found.popitem(last=False)
                self._url_locks.pop(url, None)
            log.info("webhook.fetched", what=self._what, url=url[:200])
            return value


def parse_certificates(data: bytes, url: str) -> list[x509.Certificate]:
    """A DER certificate (Microsoft's .cer, a CA's .crt), PEM text, or a PKCS#7 bundle
    (.p7c, as some CAs publish in caIssuers)."""
    try:
        if b"-----BEGIN" in data:
            if b"PKCS7" in data:
                return pkcs7.load_pem_pkcs7_certificates(data)
            return x509.load_pem_x509_certificates(data)
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError:
            return pkcs7.load_der_pkcs7_certificates(data)
    except ValueError:
        raise Rejected(UNTRUSTED_CERTIFICATE, f"{url} did not serve a certificate") from None


class IssuerFinder:
    """The issuing CAs a certificate needs up to a trusted root, as .NET's chain build finds
    them: a known one (webhooks.intermediates, or served beside the certificate) by name, else
    its AIA caIssuers URL on an issuer host."""

    def __init__(
        self,
        issuer_hosts: frozenset[str],
        intermediates: list[x509.Certificate],
        aia: UrlCache[list[x509.Certificate]],
    ) -> None:
        self._hosts = issuer_hosts
        self._known = intermediates
        self._aia = aia

    def issuers(
        self,
        leaf: x509.Certificate,
        served: list[x509.Certificate],
        root_names: frozenset[x509.Name],
    ) -> list[x509.Certificate]:
        """Every issuing CA found for ``leaf`` (the verifier then checks the chain)."""
        pool = [*served, *self._known]
        chain: list[x509.Certificate] = []
        current = leaf
        for _ in range(MAX_DEPTH):
            if current.issuer in root_names or current.issuer == current.subject:
                break
            issuer = next((c for c in pool if c.subject == current.issuer), None)
            if issuer is None:
                issuer = self._fetched_issuer(current)
                if issuer is None:
                    break
            if issuer in chain:
                break  # a loop of cross-signed CAs: leave it to the verifier
            chain.append(issuer)
            current = issuer
        return [*pool, *(c for c in chain if c not in pool)]

    def _fetched_issuer(self, certificate: x509.Certificate) -> x509.Certificate | None:
        urls = ca_issuer_urls(certificate)
        if not urls:
            return None
        refusals = []
        for url in urls:
            why = host_allowed(
                url, self._hosts, schemes=("http", "https"), key="webhooks.issuer_hosts"
            )
            if why is not None:
                refusals.append(f"{url[:200]} ({why})")
                continue
            found = self._aia.get(url)
            match = next((c for c in found if c.subject == certificate.issuer), None)
            if match is None:
                raise Rejected(
                    UNTRUSTED_CERTIFICATE,
                    f"{url[:200]} did not serve the issuer {_name(certificate.issuer)}",
                )
            return match
        raise Rejected(
            UNTRUSTED_CERTIFICATE,
            f"the issuing CA {_name(certificate.issuer)} is only at {'; '.join(refusals)}: "
            "add the host to webhooks.issuer_hosts, or the CA to webhooks.intermediates",
        )


def ca_issuer_urls(certificate: x509.Certificate) -> list[str]:
    """The certificate's AIA caIssuers URLs, in its order."""
    try:
        extension = certificate.extensions.get_extension_for_oid(
            ExtensionOID.AUTHORITY_INFORMATION_ACCESS
        )
    except (x509.ExtensionNotFound, ValueError):
        return []
    access_list: x509.AuthorityInformationAccess = extension.value  # type: ignore[assignment]
    return [
        str(access.access_location.value)
        for access in access_list
        if access.access_method == AuthorityInformationAccessOID.CA_ISSUERS
        and isinstance(access.access_location, x509.UniformResourceIdentifier)
    ]


def download_certificate(url: str, context: ssl.SSLContext | None = None) -> bytes:
    """GET ``url`` (https checked against the system's trust store, ``SSL_CERT_FILE``
    honoured, or ``context``; plain http for AIA), within CERTIFICATE_TIMEOUT and
    CERTIFICATE_MAX_BYTES, no redirects."""
    import httpx

    if context is None:  # OpenSSL's default paths: SSL_CERT_FILE, SSL_CERT_DIR
        context = ssl.create_default_context()
    timeout = CERTIFICATE_TIMEOUT
    deadline = time.monotonic() + timeout
    try:
        with (
            httpx.Client(verify=context, timeout=timeout, trust_env=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise Rejected(
                    UNTRUSTED_CERTIFICATE, f"{url} answered {response.status_code} (certificate)"
                )
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > CERTIFICATE_MAX_BYTES:
                    raise Rejected(UNTRUSTED_CERTIFICATE, f"{url} sent more than a certificate")
                if time.monotonic() > deadline:
                    raise Rejected(UNTRUSTED_CERTIFICATE, f"{url} was too slow (certificate)")
            return bytes(data)
    except httpx.HTTPError as exc:
        reason = "timed out" if isinstance(exc, httpx.TimeoutException) else str(exc)[:160]
        raise Rejected(
            UNTRUSTED_CERTIFICATE, f"cannot download the certificate {url}: {reason}"
        ) from None


def load_pem_file(path: Path, what: str) -> list[x509.Certificate]:
    """The certificates in the PEM file at ``path``, or ReferralWatchError naming it."""
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "no PEM certificates in it"
        raise ReferralWatchError(f"cannot read the {what} {path}: {reason}") from None
    return certificates


def load_trust_roots(path: Path | None) -> list[x509.Certificate]:
    """The PEM bundle at ``path``, else the system's CA bundle (``SSL_CERT_FILE`` honoured)."""
    if path is None:
        paths = ssl.get_default_verify_paths()
        files = [Path(paths.cafile)] if paths.cafile else []
        if not files and paths.capath:
            files = sorted(Path(paths.capath).glob("*.pem"))
    else:
        files = [path]
    roots: list[x509.Certificate] = []
    for file in files:
        roots.extend(load_pem_file(file, "trust roots"))
    if not roots:
        raise ReferralWatchError(
            "no trust roots for webhook certificates: set webhooks.trust_roots to a PEM bundle"
        )
    return roots


def _name(name: x509.Name) -> str:
    return name.rfc4514_string()[:160]
