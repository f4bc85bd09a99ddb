"""Partner Center webhook events, verified as Microsoft says before anything acts on them.

Microsoft's steps (SPEC 15): the signature headers are present; the certificate URL is https on
one of ``webhooks.certificate_hosts``; the downloaded certificate chains to ``trust_roots`` (or
the system's trust store) and is valid now; its issuer's organization is Microsoft Corporation;
and the RSA-SHA256 signature over the exact body bytes verifies with its key. Only then is the
body read. The body carries no referral data, only which referral changed: the daemon fetches
that referral by id, so a replayed old event can at worst cause one more GET.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from referral_watch.config import WebhooksConfig
from referral_watch.errors import ReferralWatchError
from referral_watch.store import WebhookEvent

log = structlog.get_logger(__name__)

MAX_BODY = 64 * 1024  # a real event is a few hundred bytes
CERTIFICATE_MAX_BYTES = 64 * 1024  # a certificate, or a short PEM chain
CERTIFICATE_TIMEOUT = 5.0  # seconds for the whole download
CERTIFICATES_CACHED = 32  # distinct certificate URLs kept (Microsoft uses one)
FAILED_DOWNLOAD_RETRY = 60.0  # seconds before a URL whose download failed is tried again
FAILURES_KEPT = 256  # failed URLs remembered (a forger may name many paths on an allowed host)
ISSUER_ORGANIZATION = "Microsoft Corporation"

ACTIONABLE = frozenset({"referral-created", "referral-updated"})
TEST_EVENT = "test-created"

# Results, as counted in referral_watch_webhook_events_total{result}.
OK = "ok"
BAD_SIGNATURE = "bad_signature"
UNTRUSTED_CERTIFICATE = "untrusted_certificate"
DUPLICATE = "duplicate"
IGNORED = "ignored"

_REFERRAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Rejected(ReferralWatchError):
    """An event that failed verification: answered 401, counted under ``result``."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


@dataclass(frozen=True)
class Event:
    """A verified event: what changed, never any customer data."""

    name: str
    resource_uri: str | None
    lead_id: str | None  # set for referral-created/-updated with a usable ResourceUri
    changed: str | None  # ResourceChangeUtcDate as sent
    key: str  # the same event delivered again has the same key

    @property
    def actionable(self) -> bool:
        return self.lead_id is not None

    def stored(self) -> WebhookEvent:
        return WebhookEvent(self.key, self.name, self.lead_id, self.changed)


def parse_event(body: bytes) -> Event:
    """The verified body as an Event. Raises Rejected(IGNORED) when it cannot be read."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise Rejected(IGNORED, "the body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("EventName"), str):
        raise Rejected(IGNORED, "the body has no EventName")
    name = data["EventName"].strip().lower()
    uri = data.get("ResourceUri") if isinstance(data.get("ResourceUri"), str) else None
    changed = data.get("ResourceChangeUtcDate")
    changed = changed if isinstance(changed, str) else None
    lead_id = referral_id(uri) if name in ACTIONABLE and uri else None
    if changed is not None:
        identity = json.dumps([name, uri, changed])
    else:  # no change time: only a byte-for-byte redelivery is recognised
        identity = body.decode("utf-8", "replace")
    key = hashlib.sha256(identity.encode()).hexdigest()
    return Event(name, uri, lead_id, changed, key)


def referral_id(resource_uri: str) -> str | None:
    """The referral id a ResourceUri ends in (``.../engagements/v1/referrals/{id}``)."""
    path = urlsplit(resource_uri).path.rstrip("/")
    last = unquote(path.rpartition("/")[2])
    return last if _REFERRAL_ID.fullmatch(last) else None


# --- verification ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chain:
    leaf: x509.Certificate
    intermediates: list[x509.Certificate]


class Verifier:
    """Checks events' signatures; thread-safe, one per daemon (it caches certificates).

    ``download`` fetches a certificate URL (tests and the benchmark pass their own, e.g. one
    counting downloads); ``clock`` gives "now" for the validity dates.
    """

    def __init__(
        self,
        config: WebhooksConfig,
        *,
        download: Callable[[str], bytes] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._hosts = frozenset(host.lower() for host in config.certificate_hosts)
        self._trust_roots = config.trust_roots
        self._download = download or download_certificate
        self._clock = clock
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._chains: OrderedDict[str, _Chain] = OrderedDict()
        self._failures: dict[str, tuple[float, Rejected]] = {}
        self._url_locks: dict[str, threading.Lock] = {}

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Return when the event is Microsoft's and unchanged, else raise Rejected."""
        signature = _signature(headers)
        algorithm = headers.get("x-ms-signature-algorithm", "rsa-sha256").strip().lower()
        if algorithm != "rsa-sha256":
            raise Rejected(BAD_SIGNATURE, f"unsupported signature algorithm {algorithm[:40]!r}")
        url = self._allowed_url(headers.get("x-ms-certificate-url", ""))
        chain = self._chain(url)
        self._check_chain(chain, url)
        key = chain.leaf.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise Rejected(UNTRUSTED_CERTIFICATE, f"the certificate at {url} has no RSA key")
        try:
            key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise Rejected(BAD_SIGNATURE, "the signature does not match the body") from None

    def _allowed_url(self, url: str) -> str:
        url = url.strip()
        if not url:
            raise Rejected(UNTRUSTED_CERTIFICATE, "no X-MS-Certificate-Url header")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise Rejected(UNTRUSTED_CERTIFICATE, "X-MS-Certificate-Url is not a URL") from None
        shown = url[:200]
        if parts.scheme.lower() != "https":
            raise Rejected(UNTRUSTED_CERTIFICATE, f"certificate URL {shown} is not https")
        host = (parts.hostname or "").lower()
        if parts.username is not None or parts.password is not None or not host:
            raise Rejected(UNTRUSTED_CERTIFICATE, f"certificate URL {shown} has no plain host")
        with_port = f"{host}:{port}" if port is not None else host
        if host not in self._hosts and with_port not in self._hosts:
            raise Rejected(
                UNTRUSTED_CERTIFICATE,
                f"certificate host {with_port} is not in webhooks.certificate_hosts",
            )
        return url

    def _chain(self, url: str) -> _Chain:
        """The certificate (chain) at ``url``: downloaded once, then from the cache."""
        with self._lock:
            cached = self._chains.get(url)
            if cached is not None:
                self._chains.move_to_end(url)
                return cached
            url_lock = self._url_locks.setdefault(url, threading.Lock())
        with url_lock:  # one download per URL, even when a burst of events all need it
            with self._lock:
                cached = self._chains.get(url)
                failed = self._failures.get(url)
            if cached is not None:
                return cached
            if failed is not None and time.monotonic() - failed[0] < FAILED_DOWNLOAD_RETRY:
                raise failed[1]
            try:
                chain = _parse_chain(self._download(url), url)
            except Rejected as exc:
                with self._lock:
                    self._failures[url] = (time.monotonic(), exc)
                    while len(self._failures) > FAILURES_KEPT:
                        del self._failures[next(iter(self._failures))]  # the oldest
                    self._url_locks.pop(url, None)
                raise
            with self._lock:
                self._failures.pop(url, None)
                self._chains[url] = chain
                while len(self._chains) > CERTIFICATES_CACHED:
                    self._chains.popitem(last=False)
                self._url_locks.pop(url, None)
            log.info("webhook.certificate_fetched", url=url, subject=_subject(chain.leaf))
            return chain

    def _check_chain(self, chain: _Chain, url: str) -> None:
        now = self._clock()
        leaf = chain.leaf
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise Rejected(
                UNTRUSTED_CERTIFICATE,
                f"the certificate at {url} is not valid now (valid "
                f"{leaf.not_valid_before_utc:%Y-%m-%d} to {leaf.not_valid_after_utc:%Y-%m-%d})",
            )
        organizations = [
            str(attribute.value)
            for attribute in leaf.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        ]
        if ISSUER_ORGANIZATION not in organizations:
            issuer = ", ".join(organizations) or "none"
            raise Rejected(
                UNTRUSTED_CERTIFICATE,
                f"the certificate at {url} is issued by organization {issuer[:100]!r}, "
                f"not {ISSUER_ORGANIZATION}",
            )
        builder = PolicyBuilder().store(self._trust_store()).time(now)
        # A signing certificate is no TLS client or server: check the chain, dates and CA
        # rules, not the end certificate's TLS usage extensions.
        builder = builder.extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        try:
            builder.build_client_verifier().verify(leaf, chain.intermediates)
        except VerificationError as exc:
            raise Rejected(
                UNTRUSTED_CERTIFICATE,
                f"the certificate at {url} does not chain to a trusted root "
                f"({_trust_name(self._trust_roots)}): {str(exc)[:160]}",
            ) from None

    def _trust_store(self) -> Store:
        with self._lock:
            if self._store is None:
                try:
                    self._store = Store(load_trust_roots(self._trust_roots))
                except ReferralWatchError as exc:
                    raise ReferralWatchError(f"webhooks.trust_roots: {exc}") from None
            return self._store


def _signature(headers: Mapping[str, str]) -> bytes:
    """The signature bytes from ``Authorization: Signature <b64>`` or ``x-ms-signature``."""
    text = headers.get("x-ms-signature", "").strip()
    if not text:
        scheme, _, value = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() == "signature":
            text = value.strip()
    if not text:
        raise Rejected(BAD_SIGNATURE, "no signature (Authorization: Signature or x-ms-signature)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(BAD_SIGNATURE, "the signature is not base64") from None


def _parse_chain(data: bytes, url: str) -> _Chain:
    """A DER certificate (Microsoft's .cer) or PEM text: the first is the signing
    certificate, any others are intermediates towards a trusted root."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            certificates = x509.load_pem_x509_certificates(data)
        else:
            certificates = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise Rejected(UNTRUSTED_CERTIFICATE, f"{url} did not serve a certificate") from None
    return _Chain(certificates[0], certificates[1:])


def download_certificate(url: str, context: ssl.SSLContext | None = None) -> bytes:
    """GET ``url`` over TLS checked against the system's trust store (``SSL_CERT_FILE``
    honoured; or ``context``), within CERTIFICATE_TIMEOUT and CERTIFICATE_MAX_BYTES, no
    redirects."""
    import httpx

    if context is None:  # OpenSSL's default paths: SSL_CERT_FILE, SSL_CERT_DIR
        context = ssl.create_default_context()
    deadline = time.monotonic() + CERTIFICATE_TIMEOUT
    try:
        with (
            httpx.Client(verify=context, timeout=CERTIFICATE_TIMEOUT, trust_env=False) as client,
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
        try:
            roots.extend(x509.load_pem_x509_certificates(file.read_bytes()))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "no PEM certificates in it"
            raise ReferralWatchError(f"cannot read the trust roots {file}: {reason}") from None
    if not roots:
        raise ReferralWatchError(
            "no trust roots for webhook certificates: set webhooks.trust_roots to a PEM bundle"
        )
    return roots


def _trust_name(path: Path | None) -> str:
    return str(path) if path is not None else "the system's trust store"


def _subject(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string()[:200]


def lower_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """Header names in lower case (Starlette's are already; a plain dict may not be)."""
    return {str(name).lower(): str(value) for name, value in headers.items()}
