"""The sandbox's webhook side: Partner Center's registration API and signed event deliveries.

On every referral the sandbox creates or updates while a registration exists, it POSTs the
documented event body to the registered URL, signed (RSA-SHA256) by a certificate it serves
over https itself, alone, as Microsoft does: its issuing CA is fetched from the certificate's
AIA URL on the sandbox's issuer host, up to a root that receivers trust (see Certificates).
Faults (:meth:`fault`): a bad signature, a certificate on a foreign host, an issuer only on a
foreign host, a wrong issuer, an untrusted chain, an expired certificate, a replay, a slow
certificate download, an oversized body and a missing algorithm header.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Protocol

from referral_watch.sandbox.certificates import GOOD, Certificates


class Sandbox(Protocol):
    """What the webhook side needs of the sandbox it belongs to (sandbox.server.Sandbox)."""

    host: str
    _stopping: threading.Event


REGISTRATION_PATH = "/webhooks/v1/registration"
RESOURCE_BASE = "https://api.partnercenter.microsoft.com/engagements/v1/referrals/"
EVENTS = (
    "referral-created",
    "referral-updated",
    "related-referral-created",
    "related-referral-updated",
    "test-created",
    # Some of the other events Microsoft's "Partner Center webhook events" page lists, as the
    # other integrations sharing the company's one registration hold them (billing, customers,
    # relationships).
    "invoice-ready",
    "subscription-updated",
    "customer-created",
    "azure-fraud-event-detected",
    "dap-admin-relationship-approved",
)
FAULTS = (
    "bad_signature",  # the body is changed after signing
    "foreign_host",  # the certificate URL names a host that is not on the allow-list
    "foreign_issuer",  # the certificate's issuing CA is only at an AIA URL off the issuer hosts
    "wrong_issuer",  # a trusted chain, but the issuer is not Microsoft Corporation
    "untrusted_chain",  # a "Microsoft Corporation" CA nobody trusts
    "expired",  # the right CA, but the certificate's dates are over
    "replay",  # the same signed event is delivered twice
    "slow",  # the certificate download takes longer than any sane timeout
    "oversize",  # a body over 64 KiB
    "no_algorithm",  # no X-MS-Signature-Algorithm header (Microsoft lists it as required)
)
# Which certificate each fault signs with (the others use the good one).
_CERTIFICATE_OF = {
    "wrong_issuer": "wrong-issuer",
    "untrusted_chain": "untrusted",
    "expired": "expired",
    "slow": "slow",
    "foreign_issuer": "foreign-issuer",
}
DELIVERY_TIMEOUT = 10.0
DELIVERY_THREADS = 4  # events are delivered side by side, as Partner Center does
DELIVERY_ATTEMPTS = 3  # Partner Center tries 10 times; the sandbox only retries 5xx / no answer


@dataclass(frozen=True)
class Delivery:
    """One POST the sandbox made to the registered URL."""

    event: str
    lead_id: str | None
    fault: str | None
    status: int | None  # None: no answer (connection failed or timed out)
    seconds: float
    body: bytes = field(repr=False)


class SandboxWebhooks:
    """Registration state, faults and the delivery thread of one Sandbox.

    As Partner Center, it keeps ONE registration (one URL for all events) for the company; it
    can start out holding another integration's (``held``, e.g. a CRM connector's), and tokens
    in ``without_role`` get 403 (an account without a role that may manage webhooks).
    """

    def __init__(
        self,
        sandbox: Sandbox,
        *,
        registration_token: str | None,
        held: dict[str, Any] | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.registration_token = registration_token
        self.without_role: set[str] = set()
        self.certificates = Certificates(sandbox.host)
        self.certificates.start()
        self.registration: dict[str, Any] | None = (
            None
            if held is None
            else _registration(held, bool(held.get("SignatureTokenToMsSignatureHeader")))
        )
        # An in-process receiver instead of a URL (the demo): (headers, body) -> HTTP status.
        self.local_target: Callable[[dict[str, str], bytes], int] | None = None
        self.deliveries: list[Delivery] = []
        self.validations: dict[str, dict[str, Any]] = {}
        self._faults: list[list[Any]] = []  # [kind, times left]
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, str | None, str | None] | None] = queue.Queue()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._threads = [
            threading.Thread(target=self._deliver_all, name="sandbox-webhooks", daemon=True)
            for _ in range(DELIVERY_THREADS)
        ]
        for thread in self._threads:
            thread.start()

    # -- for tests and the demo

    def register(
        self, url: str, events: list[str] | None = None, *, ms_header: bool = False
    ) -> None:
        """Register ``url`` as the API's POST would (without a token)."""
        with self._lock:
            self.registration = _registration(
                {"WebhookUrl": url, "WebhookEvents": events or list(EVENTS[:2])}, ms_header
            )

    def fault(self, kind: str, *, times: int = 1) -> None:
        """Apply ``kind`` (one of FAULTS) to the next ``times`` deliveries."""
        if kind not in FAULTS:
            raise ValueError(f"unknown webhook fault {kind!r}; known: {', '.join(FAULTS)}")
        with self._lock:
            self._faults.append([kind, times])

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every queued event has been delivered (or given up on)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy or not self._queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    @property
    def trust_roots_pem(self) -> bytes:
        return self.certificates.trust_roots_pem

    @property
    def tls_roots_pem(self) -> bytes:
        return self.certificates.tls_roots_pem

    @property
    def certificate_host(self) -> str:
        return self.certificates.host

    @property
    def issuer_host(self) -> str:
        return self.certificates.issuer_host

    # -- called by the Sandbox

    def changed(self, event: str, lead_ids: list[str]) -> None:
        """Referrals were created or updated: queue one event each, if registered for it."""
        with self._lock:
            registration = self.registration
            if registration is None or event not in registration["WebhookEvents"]:
                return
            self._busy += len(lead_ids)
        for lead_id in lead_ids:
            self._queue.put((event, lead_id, None))

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        self.certificates.stop()
        for thread in self._threads:
            thread.join(timeout=5)

    # -- delivery

    def _deliver_all(self) -> None:
        import httpx

        with httpx.Client(timeout=DELIVERY_TIMEOUT, trust_env=False) as client:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                try:
                    self._deliver(client, *item)
                finally:
                    with self._idle:
                        self._busy -= 1
                        self._idle.notify_all()

    def _deliver(
        self, client: Any, event: str, lead_id: str | None, correlation: str | None
    ) -> None:
        with self._lock:
            registration = self.registration
        if registration is None:
            return
        fault = self._take_fault()
        body = _event_body(event, lead_id, correlation, oversize=fault == "oversize")
        name = _CERTIFICATE_OF.get(fault or "", GOOD)
        signature = self.certificates.sign(body, name)
        if fault == "bad_signature":
            body = body.replace(b'"ResourceName":"', b'"ResourceName":"x')  # after signing
        host = "localhost" if fault == "foreign_host" else None
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "X-MS-Certificate-Url": self.certificates.url(name, host),
            "X-MS-Signature-Algorithm": "rsa-sha256",
        }
        if fault == "no_algorithm":
            del headers["X-MS-Signature-Algorithm"]
        if registration.get("SignatureTokenToMsSignatureHeader"):
            # Not documented by Microsoft: the header's exact value. Its sample reads it as
            # "Signature <base64>" (it splits on the space); receivers also take it bare.
            headers["x-ms-signature"] = f"Signature {signature}"
        else:
            headers["Authorization"] = f"Signature {signature}"
        for _ in range(2 if fault == "replay" else 1):
            status, answer = self._post(
                client, registration["WebhookUrl"], body, headers, event, lead_id, fault
            )
            if correlation is not None:
                self._note_validation(correlation, status, answer)

    def _post(
        self,
        client: Any,
        url: str,
        body: bytes,
        headers: dict[str, str],
        event: str,
        lead_id: str | None,
        fault: str | None,
    ) -> tuple[int | None, str]:
        """(the last HTTP status, or None for no answer; the answer's body or the error)."""
        import httpx

        status: int | None = None
        answer = ""
        for attempt in range(DELIVERY_ATTEMPTS):
            began = time.monotonic()
            try:
                if self.local_target is not None and url.startswith("local:"):
                    status = self.local_target({k.lower(): v for k, v in headers.items()}, body)
                    answer = ""
                else:
                    response = client.post(url, content=body, headers=headers)
                    status, answer = response.status_code, response.text[:200]
            except httpx.HTTPError as exc:
                status, answer = None, type(exc).__name__
            with self._lock:
                self.deliveries.append(
                    Delivery(event, lead_id, fault, status, time.monotonic() - began, body)
                )
            if status is not None and status < 500:
                return status, answer
            if self.sandbox._stopping.wait(0.2 * (attempt + 1)):
                break
        return status, answer

    def _take_fault(self) -> str | None:
        with self._lock:
            for entry in self._faults:
                entry[1] -= 1
                if entry[1] <= 0:
                    self._faults.remove(entry)
                return str(entry[0])
        return None

    def _note_validation(self, correlation: str, status: int | None, answer: str) -> None:
        """The documented shape: {"status": "completed", "results": [{"responseCode": "OK",
        "responseMessage": ..., "systemResponseCode": ..., "dateTimeUtc": ...}]}. Microsoft
        documents the field names only: "failed" for a refused delivery, the HTTP status
        names (.NET's HttpStatusCode: OK, Unauthorized) and the endpoint's answer as the
        message are the sandbox's own guesses."""
        with self._lock:
            record = self.validations.get(correlation)
            if record is None:
                return
            record["status"] = "completed" if status == 200 else "failed"
            record["results"].append(
                {
                    "responseCode": _status_name(status),
                    "responseMessage": answer[:200],
                    "systemResponseCode": str(status or ""),
                    "dateTimeUtc": _stamp(datetime.now(UTC)),
                }
            )

    # -- the registration API (called by the sandbox's request handler)

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        """(status, JSON answer or None) for one request under /webhooks/v1/registration."""
        bearer = str(headers.get("authorization") or "").removeprefix("Bearer ")
        if bearer in self.without_role:
            # Microsoft documents the 403 and the roles, not the error body: this one is ours.
            return 403, _error(
                "forbidden",
                "The caller does not have the rights to invoke this operation (Global Admin, "
                "Billing Admin, Admin agent, Sales agent or Helpdesk agent).",
            )
        if self.registration_token is not None and bearer != self.registration_token:
            return 401, _error(
                "unauthenticated", "The token is missing, invalid or for another audience."
            )
        rest = path[len(REGISTRATION_PATH) :].strip("/")
        if rest == "events" and method == "GET":
            return 200, list(EVENTS)
        if rest == "validationEvents" and method == "POST":
            return self._validation()
        if rest.startswith("validationEvents/") and method == "GET":
            with self._lock:
                record = self.validations.get(rest.partition("/")[2])
            return (200, record) if record else (404, _error("notFound", "No such correlationId."))
        if rest:
            return 404, _error("resourceNotFound", f"No route for {path}.")
        return self._registration(method, body)

    def _registration(self, method: str, body: bytes) -> tuple[int, Any]:
        with self._lock:
            current = self.registration
        if method == "GET":
            return (200, current) if current else (404, _error("notFound", "No registration."))
        if method == "DELETE":
            with self._lock:
                self.registration = None
            return (204, None) if current else (404, _error("notFound", "No registration."))
        if method not in ("POST", "PUT"):
            return 405, _error("methodNotAllowed", f"{method} is not supported here.")
        # Microsoft documents POST to create and PUT to update the one registration, not what
        # either answers in the other case: the 409 and the 404 are the sandbox's own.
        if method == "POST" and current is not None:
            return 409, _error("conflict", "A registration exists: use PUT to change it.")
        if method == "PUT" and current is None:
            return 404, _error("notFound", "No registration to update: use POST.")
        try:
            asked = json.loads(body)
            registration = _registration(
                asked, bool(asked.get("SignatureTokenToMsSignatureHeader"))
            )
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            return 400, _error("invalidRequest", f"Invalid registration: {exc}")
        if current is not None:
            registration["SubscriberId"] = current["SubscriberId"]
        with self._lock:
            self.registration = registration
        return 200, registration

    def _validation(self) -> tuple[int, Any]:
        # Microsoft: "You must be registered for the test-created event, using the registration
        # API, before sending a validation event." The 400 and its body are the sandbox's own.
        with self._lock:
            registration = self.registration
            if registration is None or "test-created" not in registration["WebhookEvents"]:
                return 400, _error(
                    "invalidRequest",
                    "Register for the test-created event before requesting a validation event.",
                )
            correlation = str(uuid.uuid4())
            self.validations[correlation] = {
                "correlationId": correlation,
                "partnerId": "7d23e5ca-19dc-4eaa-aac8-5e6b559f0d1d",
                "status": "queued",
                "results": [],
            }
            self._busy += 1
        self._queue.put(("test-created", None, correlation))
        return 200, {"correlationId": correlation}


def _registration(asked: dict[str, Any], ms_header: bool) -> dict[str, Any]:
    url = asked["WebhookUrl"]
    events = asked["WebhookEvents"]
    if not isinstance(url, str) or not url.startswith(("http://", "https://", "local:")):
        raise ValueError("WebhookUrl must be an http(s) URL")
    if not isinstance(events, list) or not events or any(e not in EVENTS for e in events):
        raise ValueError(f"WebhookEvents must be a list of {', '.join(EVENTS)}")
    answer: dict[str, Any] = {
        "SubscriberId": str(uuid.uuid4()),
        "WebhookUrl": url,
        "WebhookEvents": list(events),
    }
    if ms_header:
        answer["SignatureTokenToMsSignatureHeader"] = True
    return answer


def _status_name(status: int | None) -> str:
    """.NET's HttpStatusCode name for ``status`` (``OK``, ``Unauthorized``), as the responseCode
    of a validation result; no answer at all: ``NoResponse``."""
    if status is None:
        return "NoResponse"
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return str(status)


def _event_body(
    event: str, lead_id: str | None, correlation: str | None, *, oversize: bool = False
) -> bytes:
    if event == "test-created":
        uri = f"https://api.partnercenter.microsoft.com{REGISTRATION_PATH}/validationEvents/{correlation}"
        name = "test"
    elif event == "invoice-ready":  # a billing event (another integration's, for the relay)
        uri, name = f"https://api.partnercenter.microsoft.com/v1/invoices/{lead_id}", "invoice"
    else:
        uri, name = f"{RESOURCE_BASE}{lead_id}", "referral"
    data: dict[str, Any] = {
        "EventName": event,
        "ResourceUri": uri,
        "ResourceName": name,
        "AuditUri": None,
        "ResourceChangeUtcDate": _stamp(datetime.now(UTC)),
    }
    if oversize:
        data["Padding"] = "x" * (70 * 1024)
    return json.dumps(data, separators=(",", ":")).encode()


def _stamp(moment: datetime) -> str:
    """The documented form: 7 fractional digits and +00:00."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond * 10:07d}+00:00"


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
