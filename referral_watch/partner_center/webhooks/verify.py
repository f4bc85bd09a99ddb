"""Partner Center webhook events, verified as Microsoft says before anything acts on them.

Microsoft's steps (SPEC 15): the signature headers are present; the certificate URL is https on
one of ``webhooks.certificate_hosts``; the downloaded certificate chains (through issuing CAs
found as Microsoft's .NET sample finds them: referral_watch.partner_center.webhooks.certificates) to
``trust_roots`` (or the system's trust store) and is valid now; its issuer's organization is
Microsoft Corporation; and the RSA-SHA256 signature over the exact body bytes verifies with
its key. Only then is the body read. The body carries no referral data, only which referral
changed: the daemon fetches that referral by id, so a replayed old event can at worst cause
one more GET.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

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
from referral_watch.partner_center.webhooks.certificates import (
    BAD_SIGNATURE,
    MAX_DEPTH,
    UNTRUSTED_CERTIFICATE,
    FetchBudget,
    IssuerFinder,
    Rejected,
    UrlCache,
    download_certificate,
    host_allowed,
    load_pem_file,
    load_trust_roots,
    parse_certificates,
)
from referral_watch.state.webhook_events import WebhookEvent

__all__ = [
    "BAD_SIGNATURE",
    "UNTRUSTED_CERTIFICATE",
    "Rejected",
    "Verifier",
    "download_certificate",
    "load_trust_roots",
]

MAX_BODY = 64 * 1024  # a real event is a few hundred bytes
ISSUER_ORGANIZATION = "Microsoft Corporation"

ACTIONABLE = frozenset({"referral-created", "referral-updated"})
TEST_EVENT = "test-created"

# Results, as counted in referral_watch_webhook_events_total{result} (and those of
# certificates: bad_signature, untrusted_certificate).
OK = "ok"
DUPLICATE = "duplicate"
IGNORED = "ignored"

_REFERRAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
    served: list[x509.Certificate]  # what came with it (a PEM chain), towards a trusted root


class Verifier:
    """Checks events' signatures; thread-safe, one per daemon (it caches certificates).

    ``download`` fetches a certificate or issuer URL (tests and the benchmark pass their own,
    e.g. one counting downloads); ``clock`` gives "now" for the validity dates.
    """

    def __init__(
        self,
        config: WebhooksConfig,
        *,
        download: Callable[[str], bytes] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        budget: FetchBudget | None = None,
    ) -> None:
        self._hosts = frozenset(host.lower() for host in config.certificate_hosts)
        self._trust_roots = config.trust_roots
        self._intermediates = config.intermediates
        self._issuer_hosts = frozenset(host.lower() for host in config.issuer_hosts)
        fetch = download or download_certificate
        self._clock = clock
        self.budget = budget or FetchBudget()
        self._certificates = UrlCache(fetch, _parse_chain, self.budget, "certificate")
        self._issuer_certificates = UrlCache(fetch, parse_certificates, self.budget, "issuing CA")
        self._lock = threading.Lock()
        self._store: tuple[Store, frozenset[x509.Name]] | None = None
        self._finder: IssuerFinder | None = None

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Return when the event is Microsoft's and unchanged, else raise Rejected."""
        signature = _signature(headers)
        algorithm = headers.get("x-ms-signature-algorithm", "").strip().lower()
        if not algorithm:
            raise Rejected(BAD_SIGNATURE, "no X-MS-Signature-Algorithm header")
        if algorithm != "rsa-sha256":
            raise Rejected(BAD_SIGNATURE, f"unsupported signature algorithm {algorithm[:40]!r}")
        url = self._allowed_url(headers.get("x-ms-certificate-url", ""))
        chain = self._certificates.get(url)
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
        why = host_allowed(url, self._hosts, schemes=("https",), key="webhooks.certificate_hosts")
        if why is not None:
            raise Rejected(UNTRUSTED_CERTIFICATE, f"certificate URL {url[:200]} {why}")
        return url

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
        store, root_names = self._trust_store()
        issuers = self._issuer_finder().issuers(leaf, chain.served, root_names)
        builder = PolicyBuilder().store(store).time(now).max_chain_depth(MAX_DEPTH + 1)
        # A signing certificate is no TLS client or server: check the chain, dates and CA
        # rules, not the end certificate's TLS usage extensions.
        builder = builder.extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        try:
            builder.build_client_verifier().verify(leaf, issuers)
        except VerificationError as exc:
            raise Rejected(
                UNTRUSTED_CERTIFICATE,
                f"the certificate at {url} does not chain to a trusted root "
                f"({_trust_name(self._trust_roots)}): {str(exc)[:160]}",
            ) from None

    def _trust_store(self) -> tuple[Store, frozenset[x509.Name]]:
        with self._lock:
            if self._store is None:
                try:
                    roots = load_trust_roots(self._trust_roots)
                except ReferralWatchError as exc:
                    raise ReferralWatchError(f"webhooks.trust_roots: {exc}") from None
                self._store = (Store(roots), frozenset(root.subject for root in roots))
            return self._store

    def _issuer_finder(self) -> IssuerFinder:
        with self._lock:
            if self._finder is None:
                known: list[x509.Certificate] = []
                if self._intermediates is not None:
                    try:
                        known = load_pem_file(self._intermediates, "intermediates")
                    except ReferralWatchError as exc:
                        raise ReferralWatchError(f"webhooks.intermediates: {exc}") from None
                self._finder = IssuerFinder(self._issuer_hosts, known, self._issuer_certificates)
            return self._finder


def _signature(headers: Mapping[str, str]) -> bytes:
    """The signature bytes from ``Authorization: Signature <b64>`` or ``x-ms-signature``
    (``Signature <b64>``, as Microsoft's sample reads it, or bare base64)."""
    text = headers.get("x-ms-signature", "").strip()
    scheme, _, value = text.partition(" ")
    if value and scheme.lower() == "signature":
        text = value.strip()
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
    """The signing certificate first; any others served with it help build its chain."""
    certificates = parse_certificates(data, url)
    return _Chain(certificates[0], certificates[1:])


def _trust_name(path: Path | None) -> str:
    return str(path) if path is not None else "the system's trust store"


def lower_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """Header names in lower case (Starlette's are already; a plain dict may not be)."""
    return {str(name).lower(): str(value) for name, value in headers.items()}
