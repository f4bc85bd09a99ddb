"""The sandbox's HTTP handler: Partner Center's Referrals API paths, the webhook registration
API, tokens, and the faults a test asked for (status codes, hangs, hostile bodies)."""

from __future__ import annotations

import json
import threading
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from referral_watch.sandbox import answers as sandbox_answers
from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.webhooks import REGISTRATION_PATH, SandboxWebhooks
from referral_watch.sandbox.wire import (
    ERROR_CODES,
    ITEM_PREFIX,
    LIST_PATHS,
    BadRequest,
    Fault,
    Headers,
    Query,
    RecordedRequest,
    error_body,
)


class Sandbox(Protocol):
    """What the handler needs of the sandbox it serves (server.Sandbox)."""

    documented_next_path: bool
    page_delay: float
    _stopping: threading.Event

    @property
    def webhooks(self) -> SandboxWebhooks: ...

    def _take_fault(self, on: str, page: int | None) -> Fault | None: ...

    def _record(self, request: RecordedRequest) -> None: ...

    def _authorized(self, headers: Headers) -> bool: ...

    def _answer(self, referral_id: str, headers: Headers, body: bytes) -> dict[str, Any]: ...

    def _parse_query(self, query: dict[str, str]) -> Query: ...

    def _page_body(self, query: Query) -> bytes: ...

    def _link_base(self) -> str: ...

    def _item_body(self, referral_id: str) -> bytes | None: ...


def handler_for(sandbox: Sandbox) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.sandbox = sandbox
    return Handler


class _Handler(BaseHTTPRequestHandler):
    sandbox: Sandbox
    protocol_version = "HTTP/1.1"
    server_version = "PartnerCenterSandbox/1.0"
    # Headers and body go out in two writes: without this, Nagle + delayed ACK cost ~40 ms each.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the benchmark makes thousands of requests

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        headers = Headers((k.lower(), v) for k, v in self.headers.items())
        self.sandbox._record(RecordedRequest("GET", split.path, query, headers))
        path = split.path.rstrip("/")
        try:
            if path == LIST_PATHS[1] and not self.sandbox.documented_next_path:
                self._send(404, error_body("resourceNotFound", f"No route for {split.path}."))
            elif path in LIST_PATHS:
                self._list(query, headers)
            elif path.startswith(ITEM_PREFIX) and "/" not in path[len(ITEM_PREFIX) :]:
                self._item(unquote(path[len(ITEM_PREFIX) :]), headers)
            elif path.startswith(REGISTRATION_PATH):
                self._webhook_api("GET", split.path, headers)
            else:
                self._send(404, error_body("resourceNotFound", f"No route for {split.path}."))
        except BadRequest as exc:
            self._send(400, error_body("invalidRequest", exc.message))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout): nothing to answer

    def do_PATCH(self) -> None:
        split = urlsplit(self.path)
        headers = Headers((k.lower(), v) for k, v in self.headers.items())
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.sandbox._record(RecordedRequest("PATCH", split.path, {}, headers, body))
        path = split.path.rstrip("/")
        if not path.startswith(ITEM_PREFIX) or "/" in path[len(ITEM_PREFIX) :]:
            self._send(404, error_body("resourceNotFound", f"No route for {split.path}."))
            return
        if self._fault("patch", None) or not self._check_token(headers):
            return
        try:
            updated = self.sandbox._answer(unquote(path[len(ITEM_PREFIX) :]), headers, body)
        except sandbox_answers.PatchRejected as exc:
            self._send(exc.status, error_body(exc.code, exc.message))
            return
        etag = {"ETag": str(updated["eTag"])}
        if "return=representation" in (headers.get("prefer") or ""):
            self._send(200, json.dumps(updated).encode(), etag)
        else:
            self._send(204, b"", etag)

    def do_POST(self) -> None:
        self._other_method("POST")

    def do_PUT(self) -> None:
        self._other_method("PUT")

    def do_DELETE(self) -> None:
        self._other_method("DELETE")

    def _other_method(self, method: str) -> None:
        """Only the webhook registration API takes POST, PUT and DELETE."""
        split = urlsplit(self.path)
        headers = Headers((k.lower(), v) for k, v in self.headers.items())
        body = self._read_body(headers)
        self.sandbox._record(RecordedRequest(method, split.path, {}, headers, body))
        try:
            if split.path.rstrip("/").startswith(REGISTRATION_PATH):
                self._webhook_api(method, split.path, headers, body)
            else:
                self._send(405, error_body("methodNotAllowed", f"{method} {split.path}."))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _read_body(self, headers: Headers) -> bytes:
        length = headers.get("content-length", "0")
        return self.rfile.read(int(length)) if length.isdigit() else b""

    def _webhook_api(self, method: str, path: str, headers: Headers, body: bytes = b"") -> None:
        status, answer = self.sandbox.webhooks.handle(method, path.rstrip("/"), headers, body)
        if answer is None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.send_header("Request-ID", str(uuid.uuid4()))
            self.end_headers()
            return
        self._send(status, json.dumps(answer).encode())

    def _list(self, query: dict[str, str], headers: Headers) -> None:
        parsed = self.sandbox._parse_query(query)
        page = parsed.offset // parsed.top
        if self._fault("list", page) or not self._check_token(headers):
            return
        if self.sandbox.page_delay:
            self.sandbox._stopping.wait(self.sandbox.page_delay)
        self._send(200, self.sandbox._page_body(parsed))

    def _item(self, referral_id: str, headers: Headers) -> None:
        if self._fault("item", None) or not self._check_token(headers):
            return
        body = self.sandbox._item_body(referral_id)
        if body is None:
            message = f"Referral {referral_id} was not found."
            self._send(404, error_body("itemNotFound", message))
        else:
            self._send(200, body)

    def _check_token(self, headers: Headers) -> bool:
        if self.sandbox._authorized(headers):
            return True
        message = "The access token is missing, invalid or expired."
        self._send(401, error_body("unauthenticated", message), {"WWW-Authenticate": "Bearer"})
        return False

    def _fault(self, on: str, page: int | None) -> bool:
        fault = self.sandbox._take_fault(on, page)
        if fault is None:
            return False
        stopping = self.sandbox._stopping
        if fault.hang:
            stopping.wait()
            self.close_connection = True
            return True
        if fault.kind is not None:
            _StreamFault(self, fault).serve()
            self.close_connection = True
            return True
        if fault.delay:
            stopping.wait(fault.delay)
        status = fault.status or 200
        if fault.body is not None:
            body = fault.body
        elif fault.status == 0:
            body = b'{"value": ['
        else:
            code = ERROR_CODES.get(status, "error")
            body = error_body(code, f"Injected fault: {status} {code}.")
        extra = {k: v.replace("{token}", self._token()) for k, v in (fault.headers or {}).items()}
        if fault.retry_after is not None:
            seconds = fault.retry_after
            extra["Retry-After"] = str(int(seconds)) if seconds == int(seconds) else str(seconds)
        if fault.truncate:
            self._send(status, body, extra, length=len(body) + 100)
            self.close_connection = True
        else:
            self._send(status, body, extra)
        return True

    def _token(self) -> str:
        return self.headers.get("Authorization", "").removeprefix("Bearer ").strip()

    def _send(
        self,
        status: int,
        body: bytes,
        extra: dict[str, str] | None = None,
        *,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Request-ID", str(uuid.uuid4()))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


class _StreamFault:
    """A hostile 200 answer, written as a chunked body until the client gives up (or the
    sandbox stops): what a broken proxy or a malicious endpoint could send."""

    def __init__(self, handler: _Handler, fault: Fault) -> None:
        self.handler = handler
        self.fault = fault
        self.stopping = handler.sandbox._stopping

    def serve(self) -> None:
        kind = self.fault.kind
        headers = {"Transfer-Encoding": "chunked"}
        if kind == "gzip_bomb":
            headers["Content-Encoding"] = "gzip"
        handler = self.handler
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json; charset=utf-8")
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        try:
            for chunk in getattr(self, f"_{kind}")():
                if self.stopping.is_set():
                    return
                if chunk:
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    handler.wfile.flush()
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client hung up: that is what it should do

    def _huge(self) -> Iterator[bytes]:
        yield b'{"value": ['
        created = datetime.now(UTC) - timedelta(hours=1)
        sent, first = 11, True
        while sent < self.fault.size:
            record = make_referral(created=created, customer="Huge Page Customer")
            chunk = (b"" if first else b",") + json.dumps(record).encode()
            first = False
            sent += len(chunk)
            yield chunk
        yield b"]}"

    def _gzip_bomb(self) -> Iterator[bytes]:
        packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        yield packer.compress(b'{"value": [') + packer.flush(zlib.Z_SYNC_FLUSH)
        spaces = b" " * (1 << 20)  # JSON whitespace: 1 MiB inflates from about 1 KiB
        while True:
            yield packer.compress(spaces) + packer.flush(zlib.Z_SYNC_FLUSH)

    def _endless_body(self) -> Iterator[bytes]:
        yield b'{"value": ['
        created = datetime.now(UTC) - timedelta(hours=1)
        record = json.dumps(make_referral(created=created, customer="Endless Customer")).encode()
        while True:
            yield (record + b",") * 64

    def _endless_next(self) -> Iterator[bytes]:
        link = f"{self.handler.sandbox._link_base()}/engagements/referrals?chain={uuid.uuid4()}"
        yield json.dumps({"value": [], "@odata.nextLink": link}).encode()

    def _slowloris(self) -> Iterator[bytes]:
        yield b"{"
        while not self.stopping.wait(self.fault.delay or 1.0):
            yield b" "


# --- standalone ----------------------------------------------------------------------------
