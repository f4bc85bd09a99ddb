"""A fake Partner Center Referrals API on loopback, for the demo, the tests and the benchmark.

It serves the documented shapes, including the odd ones: the ``@odata.nextLink`` is
``http://<host>:<port>/v1.0/referrals?$skiptoken=...`` (plain http, another path), errors come as
``{"error": {"code": ..., "message": ...}}`` and every response carries a ``Request-ID``.
Faults (status codes, Retry-After, malformed or truncated bodies, hangs) can be queued with
:meth:`Sandbox.fail`. The ``$filter`` evaluator lives in :mod:`referral_watch.partner_center.odata`.

Records are serialized once when added and each (filter, order) result is cached until the data
changes, so paging through 50,000 leads costs little more than writing the bytes.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from typing import Any

from referral_watch.partner_center.odata import FilterError, Predicate, compile_filter
from referral_watch.sandbox import answers as sandbox_answers
from referral_watch.sandbox.handler import handler_for
from referral_watch.sandbox.records import format_time, make_referral, sample_leads
from referral_watch.sandbox.webhooks import REGISTRATION_PATH, SandboxWebhooks
from referral_watch.sandbox.wire import (
    API_PREFIX,
    STREAM_FAULTS,
    BadRequest,
    Fault,
    Headers,
    Query,
    RecordedRequest,
)

# What a CRM co-sell connector registers (Microsoft's connector pages), plus a billing event
# another integration shares the registration with: `referral-watch sandbox --held-by URL`.
CONNECTOR_EVENTS = [
    "referral-created",
    "referral-updated",
    "related-referral-created",
    "related-referral-updated",
    "invoice-ready",
]
DEFAULT_TOP = 100
ORDER_KEYS = ("createdDateTime", "updatedDateTime")

# --- records ---------------------------------------------------------------------------------


@dataclass
class _Result:
    """One cached (filter, order) result: the matching records' ids, in order."""

    version: int
    ids: list[str] = field(default_factory=list)


class Sandbox:
    """A threaded fake Partner Center. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        referrals: Iterable[dict[str, Any]] = (),
        *,
        token: str | None = "sandbox-token",
        host: str = "127.0.0.1",
        port: int = 0,
        page_delay: float = 0.0,
        max_page_size: int | None = None,
        registration_token: str | None = "sandbox-registration-token",
        held_registration: dict[str, Any] | None = None,
        tls: bool = False,
        documented_next_path: bool = True,
    ) -> None:
        """``held_registration``: the company's webhook registration starts out held by
        another integration (``{"WebhookUrl": ..., "WebhookEvents": [...]}``); ``tls``: serve
        https with a certificate from a local CA (``tls_ca_pem``); ``documented_next_path``
        False: the nextLink's ``/v1.0/referrals`` path answers 404, as a live API might (the
        sample's path is documented, not whether it works), and only the list path pages."""
        self.token = token
        self.held_registration = held_registration
        self.tls = tls
        self.tls_ca_pem = b""
        self.documented_next_path = documented_next_path
        self.registration_token = registration_token
        self.host = host
        self.port = port
        self.page_delay = page_delay
        self.max_page_size = max_page_size
        self.next_link_base: str | None = None
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        # Tokens accepted besides `token` (e.g. people's delegated tokens), and tokens that may
        # read but not answer: their holder lacks the Referral Admin / Referral User role.
        self.more_tokens: set[str] = set()
        self.without_role: set[str] = set()
        # Called with the referral id when a PATCH arrives, before it is applied: a test can
        # change the record there (a real eTag mismatch, 412).
        self.before_patch: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self._serialized: dict[str, bytes] = {}
        self._version = 0
        self._results: dict[tuple[str | None, str | None], _Result] = {}
        self._filters: dict[str, Predicate] = {}
        self._faults: list[Fault] = []
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._webhooks: SandboxWebhooks | None = None
        self.add(*referrals)

    # -- lifecycle

    def start(self) -> Sandbox:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = ThreadingHTTPServer((self.host, self.port), handler_for(self))
        server.daemon_threads = True
        server.block_on_close = False  # a hanging fault must not block stop()
        if self.tls:
            server.socket = self._tls_context().wrap_socket(server.socket, server_side=True)
        self._server = server
        self.port = server.server_address[1]
        scheme = "https" if self.tls else "http"
        self.base_url = f"{scheme}://{self.host}:{self.port}{API_PREFIX}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def _tls_context(self) -> ssl.SSLContext:
        import trustme

        ca = trustme.CA(organization_name="Partner Center Sandbox TLS")
        self.tls_ca_pem = ca.cert_pem.bytes()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(self.host, "localhost").configure_cert(context)
        return context

    def stop(self) -> None:
        self._stopping.set()  # releases hanging and delayed handlers
        if self._webhooks is not None:
            self._webhooks.stop()
            self._webhooks = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- data

    def add(self, *referrals: dict[str, Any]) -> None:
        events: dict[str, list[str]] = {"referral-created": [], "referral-updated": []}
        with self._lock:
            for record in referrals:
                # Malformed records (no id) are served too: the client must survive them.
                ref_id = str(record.get("id") or f"_no-id-{len(self._records)}-{uuid.uuid4()}")
                if isinstance(record, dict) and "eTag" not in record:
                    record = {**record, "eTag": sandbox_answers.new_etag()}
                known = ref_id in self._records
                events["referral-updated" if known else "referral-created"].append(ref_id)
                self._records[ref_id] = record
                self._serialized[ref_id] = json.dumps(record, separators=(",", ":")).encode()
            self._version += 1
        if self._webhooks is not None:
            for event, ids in events.items():
                self._webhooks.changed(event, ids)

    def update(self, referral_id: str, **fields: Any) -> None:
        """Replace top-level keys of one record, e.g. ``update(id, substatus="Accepted")``."""
        with self._lock:
            record = {
                **self._records[referral_id],
                "eTag": sandbox_answers.new_etag(),  # every update makes a new version
                **fields,
            }
            self._records[referral_id] = record
            self._serialized[referral_id] = json.dumps(record, separators=(",", ":")).encode()
            self._version += 1
        if self._webhooks is not None:
            self._webhooks.changed("referral-updated", [referral_id])

    @property
    def registration_url(self) -> str:
        """Its webhook registration API (``webhooks.registration_url``)."""
        return f"{self.base_url.removesuffix(API_PREFIX)}{REGISTRATION_PATH}"

    @property
    def webhooks(self) -> SandboxWebhooks:
        """The webhook side (registration API, signed deliveries, faults), started on first
        use; see referral_watch.sandbox.webhooks."""
        with self._lock:
            if self._webhooks is None:
                self._webhooks = SandboxWebhooks(
                    self, registration_token=self.registration_token, held=self.held_registration
                )
            return self._webhooks

    def burst(self, count: int, *, now: datetime | None = None) -> list[str]:
        """A trade show import: ``count`` new pending leads at once (one event each)."""
        moment = now or datetime.now(UTC)
        records = [
            make_referral(customer=f"Trade show lead #{n + 1}", created=moment)
            for n in range(count)
        ]
        self.add(*records)
        return [record["id"] for record in records]

    def remove(self, referral_id: str) -> None:
        with self._lock:
            self._records.pop(referral_id, None)
            self._serialized.pop(referral_id, None)
            self._version += 1

    def get_record(self, referral_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._records.get(referral_id)

    def __len__(self) -> int:
        return len(self._records)

    def count(self, filter_text: str | None) -> int:
        """How many records a poll with this ``$filter`` gets, over all its pages."""
        return len(self._matching_ids(Query(filter_text, None, DEFAULT_TOP, 0)))

    # -- faults

    def fail(
        self,
        status: int,
        *,
        times: int = 1,
        on: str = "list",
        page: int | None = None,
        retry_after: float | None = None,
        body: bytes | None = None,
        delay: float = 0.0,
        truncate: bool = False,
        hang: bool = False,
        kind: str | None = None,
        size: int = 200 * 1024 * 1024,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Queue a fault for the next ``times`` matching requests (``on`` = "list", "item" or
        "patch").

        status 0 serves a 200 with ``body`` as is; ``truncate`` promises more bytes than it sends;
        ``hang`` never answers until stop(). ``kind`` serves a hostile 200 instead (see
        STREAM_FAULTS): "huge" (a valid page of ``size`` bytes), "gzip_bomb" (a small gzip body
        that inflates without end), "endless_body" (a chunked page that never ends),
        "endless_next" (every page links to a new next page), "slowloris" (one byte every
        ``delay`` seconds). ``headers`` are added to the answer ("{token}" in a value becomes
        the caller's bearer token, as a careless server might echo it).
        """
        if on not in ("list", "item", "patch"):
            raise ValueError(f"on must be 'list', 'item' or 'patch', not {on!r}")
        if kind is not None and kind not in STREAM_FAULTS:
            raise ValueError(f"kind must be one of {', '.join(STREAM_FAULTS)}, not {kind!r}")
        with self._lock:
            self._faults.append(
                Fault(
                    status, times, on, page, retry_after, body, delay, truncate, hang,
                    kind, size, headers,
                )
            )  # fmt: skip

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, on: str, page: int | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(on, page):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # -- queries (called from handler threads)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _authorized(self, headers: Headers) -> bool:
        expected = self.token
        given = headers.get("authorization") or ""
        return (
            expected is None
            or given == f"Bearer {expected}"
            or given.removeprefix("Bearer ") in self.more_tokens
        )

    def _answer(self, referral_id: str, headers: Headers, body: bytes) -> dict[str, Any]:
        """Apply a PATCH to one record; the updated record, or PatchRejected."""
        if (headers.get("authorization") or "").removeprefix("Bearer ") in self.without_role:
            raise sandbox_answers.PatchRejected(
                403,
                "accessDenied",
                "The user does not have the Referral Admin or Referral User role.",
            )
        ops = sandbox_answers.read_patch(body)
        if self.before_patch is not None:
            self.before_patch(referral_id)
        with self._lock:
            record = self._records.get(referral_id)
            if record is None:
                raise sandbox_answers.PatchRejected(
                    404, "itemNotFound", f"Referral {referral_id} was not found."
                )
            sandbox_answers.check_if_match(record, headers.get("if-match"))
            updated = sandbox_answers.apply_patch(record, ops, format_time(datetime.now(UTC)))
            self._records[referral_id] = updated
            self._serialized[referral_id] = json.dumps(updated, separators=(",", ":")).encode()
            self._version += 1
        return updated

    def _parse_query(self, query: dict[str, str]) -> Query:
        if "$skiptoken" in query:
            return _decode_skiptoken(query["$skiptoken"])
        top = DEFAULT_TOP
        if "$top" in query:
            if not query["$top"].isdigit() or int(query["$top"]) < 1:
                raise BadRequest(f"$top must be a positive integer, not {query['$top']!r}")
            top = int(query["$top"])
        if self.max_page_size is not None:
            top = min(top, self.max_page_size)
        order = query.get("$orderby")
        if order is not None:
            _order_key(order)  # validate now, not on a later page
        filter_text = query.get("$filter")
        # Microsoft documents the OData operators, not what a bad $filter/$top/$orderby gets:
        # the 400 invalidRequest answers are the sandbox's own.
        self._predicate(filter_text)
        return Query(filter_text, order, top, 0)

    def _predicate(self, filter_text: str | None) -> Predicate:
        key = filter_text or ""
        predicate = self._filters.get(key)
        if predicate is None:
            try:
                predicate = compile_filter(filter_text)
            except FilterError as exc:
                raise BadRequest(f"Invalid filter expression: {exc}") from None
            self._filters[key] = predicate
        return predicate

    def _matching_ids(self, query: Query) -> list[str]:
        key = (query.filter, query.order)
        with self._lock:
            cached = self._results.get(key)
            if cached is not None and cached.version == self._version:
                return cached.ids
            predicate = self._predicate(query.filter)
            ids = [i for i, record in self._records.items() if predicate(record)]
            if query.order:
                sort_key, descending = _order_key(query.order)
                records = self._records
                ids.sort(key=lambda i: str(records[i].get(sort_key) or ""), reverse=descending)
            self._results[key] = _Result(self._version, ids)
            return ids

    def _page_body(self, query: Query) -> bytes:
        ids = self._matching_ids(query)
        chunk = ids[query.offset : query.offset + query.top]
        with self._lock:
            values = b",".join(self._serialized[i] for i in chunk if i in self._serialized)
        context = f"{self._link_base()}/$metadata#Referrals"
        parts = [b'{"@odata.context":', json.dumps(context).encode(), b',"value":[', values, b"]"]
        end = query.offset + query.top
        if end < len(ids):
            token = _encode_skiptoken(Query(query.filter, query.order, query.top, end))
            link = f"{self._link_base()}/referrals?$skiptoken={token}"
            parts += [b',"@odata.nextLink":', json.dumps(link).encode()]
        parts.append(b"}")
        return b"".join(parts)

    def _link_base(self) -> str:
        return self.next_link_base or f"http://{self.host}:{self.port}{API_PREFIX}"

    def _item_body(self, referral_id: str) -> bytes | None:
        with self._lock:
            return self._serialized.get(referral_id)


def _order_key(order: str) -> tuple[str, bool]:
    words = order.split()
    if not words or len(words) > 2 or words[0] not in ORDER_KEYS:
        raise BadRequest(
            f"$orderby {order!r} is not supported: use createdDateTime or updatedDateTime, "
            "optionally followed by asc or desc"
        )
    direction = words[1] if len(words) == 2 else "asc"
    if direction not in ("asc", "desc"):
        raise BadRequest(f"$orderby direction must be asc or desc, not {direction!r}")
    return words[0], direction == "desc"


def _encode_skiptoken(query: Query) -> str:
    # What a $skiptoken holds is not documented (it is opaque to clients): the sandbox's own.
    data = json.dumps([query.filter, query.order, query.top, query.offset], separators=(",", ":"))
    return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def _decode_skiptoken(token: str) -> Query:
    try:
        padded = token + "=" * (-len(token) % 4)
        filter_text, order, top, offset = json.loads(base64.urlsafe_b64decode(padded))
        if not (isinstance(top, int) and top > 0 and isinstance(offset, int) and offset >= 0):
            raise ValueError("bad numbers")
        return Query(filter_text, order, top, offset)
    except (ValueError, TypeError, binascii.Error):
        raise BadRequest("The $skiptoken is not valid.") from None


def holdings(sandbox: Sandbox, filter_text: str) -> str:
    """What the sandbox holds, counted as a poll with ``filter_text`` sees it:
    '25 waiting referrals (a poll gets these) and 3 it skips (outgoing or already answered)'."""
    waiting = sandbox.count(filter_text)
    skipped = len(sandbox) - waiting
    text = f"{waiting} waiting referral{'' if waiting == 1 else 's'}"
    if skipped:
        text += f" (a poll gets these) and {skipped} it skips (outgoing or already answered)"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake Partner Center Referrals API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--leads", type=int, default=25)
    parser.add_argument("--token", default="sandbox-token", help='"" accepts any token')
    parser.add_argument("--page-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    leads = sample_leads(args.leads, now=datetime.now(UTC))
    sandbox = Sandbox(
        leads, token=args.token or None, host=args.host, port=args.port, page_delay=args.page_delay
    )
    with sandbox:
        from referral_watch.config import PartnerCenterConfig

        waiting = holdings(sandbox, PartnerCenterConfig().filter)
        print(f"Partner Center sandbox at {sandbox.base_url} with {waiting}.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
