"""Real local receivers for delivery tests: a webhook (HTTP) server and an SMTP server.

Both listen on 127.0.0.1 only, pick a free port themselves and are context managers:

    with WebhookReceiver() as hook:
        ...send to hook.json_url...
        hook.wait_for(1)
        assert hook.bodies[0]["title"] == "..."

    with SmtpReceiver() as smtp:
        ...send to smtp.mailto_url(to="a@example.com")...
        smtp.wait_for(1)
        assert smtp.messages[0].subject == "..."
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import quote

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from conftest import free_port, wait_until

LOOPBACK = "127.0.0.1"


# --- webhook -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str  # including the query string
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        """The body parsed as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None


class _HookHandler(BaseHTTPRequestHandler):
    server: _HookServer

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = ReceivedRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        status = self.server.receiver._accept(request)
        payload = b'{"ok": true}' if status < 400 else b'{"error": "failing on purpose"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = do_PUT = do_GET = do_PATCH = do_DELETE = _record

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class _HookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        super().__init__((LOOPBACK, receiver.fixed_port), _HookHandler)


class WebhookReceiver:
    """A threaded HTTP server on 127.0.0.1 recording every request it gets.

    ``fail_next(n, status=500)`` makes the next n requests fail (they are still recorded);
    ``delay`` seconds pass before each answer (a slow channel); with ``port`` it listens
    there, so it can be stopped and started again at the same address (a target that is down
    for a while); ``tls=True`` serves https with a throw-away CA (``ca_path``).
    """

    def __init__(
        self, path: str = "/hook", *, delay: float = 0.0, port: int = 0, tls: bool = False
    ) -> None:
        self.path = path
        self.delay = delay
        self.fixed_port = port  # 0: any free one; else the same port again after a restart
        self.tls = (
            tls  # https with a throw-away CA (``ca_path``), for plugins that speak only https
        )
        self.ca_path: str | None = None
        self.requests: list[ReceivedRequest] = []
        self._lock = threading.Lock()
        self._answering = threading.Event()  # set on stop: no slow answer outlives the receiver
        self._failures: list[int] = []
        self._server: _HookServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> WebhookReceiver:
        self._answering.clear()
        self._server = _HookServer(self)
        if self.tls:
            self._serve_tls(self._server)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def _serve_tls(self, server: _HookServer) -> None:
        import os
        import ssl
        import tempfile

        import trustme

        ca = trustme.CA()
        handle, self.ca_path = tempfile.mkstemp(prefix="receiver-ca-", suffix=".pem")
        os.close(handle)
        ca.cert_pem.write_to_path(self.ca_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(LOOPBACK).configure_cert(context)
        server.socket = context.wrap_socket(server.socket, server_side=True)

    def stop(self) -> None:
        self._answering.set()
        if self.ca_path is not None:
            import os

            os.unlink(self.ca_path)
            self.ca_path = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # addresses
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("WebhookReceiver is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Plain http:// address of the hook path."""
        return f"http://{LOOPBACK}:{self.port}{self.path}"

    @property
    def json_url(self) -> str:
        """An Apprise json:// URL posting to this receiver."""
        return f"json://{LOOPBACK}:{self.port}{self.path}"

    # behaviour
    def fail_next(self, count: int = 1, status: int = 500) -> None:
        with self._lock:
            self._failures.extend([status] * count)

    def _accept(self, request: ReceivedRequest) -> int:
        if self.delay:
            self._answering.wait(self.delay)
        with self._lock:
            self.requests.append(request)
            return self._failures.pop(0) if self._failures else 200

    # inspection
    @property
    def bodies(self) -> list[Any]:
        """Every request body parsed as JSON (None for a non-JSON body), in arrival order."""
        with self._lock:
            return [r.json for r in self.requests]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[ReceivedRequest]:
        wait_until(lambda: len(self.requests) >= count, timeout, f"{count} webhook request(s)")
        with self._lock:
            return list(self.requests)


# --- SMTP --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))

    @property
    def text(self) -> str:
        """The plain-text body (or the HTML one when there is no plain part)."""
        part = self.message.get_body(preferencelist=("plain", "html"))
        if part is None:
            return ""
        content = part.get_content()
        return content if isinstance(content, str) else ""

    @property
    def html(self) -> str:
        part = self.message.get_body(preferencelist=("html",))
        if part is None:
            return ""
        content = part.get_content()
        return content if isinstance(content, str) else ""


class _Collector:
    def __init__(self, receiver: SmtpReceiver) -> None:
        self.receiver = receiver

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode("utf-8")
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        mail = ReceivedMail(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            message=message,
        )
        with self.receiver._lock:
            self.receiver.messages.append(mail)
        return "250 Message accepted for delivery"


class SmtpReceiver:
    """An aiosmtpd server on 127.0.0.1 (no TLS, no auth) collecting every message."""

    def __init__(self, sender: str = "referral-watch@example.com") -> None:
        self.sender = sender
        self.messages: list[ReceivedMail] = []
        self._lock = threading.Lock()
        self._controller: Controller | None = None
        self.port = 0

    def start(self) -> SmtpReceiver:
        last_error: OSError | None = None
        for _ in range(5):  # another process may grab the probed port in between
            port = free_port()
            controller = Controller(_Collector(self), hostname=LOOPBACK, port=port)
            try:
                controller.start()
            except OSError as exc:
                last_error = exc
                continue
            self._controller, self.port = controller, port
            return self
        raise RuntimeError(f"could not start the SMTP receiver: {last_error}")

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def mailto_url(self, to: str | None = "a@example.com", **extra: str) -> str:
        """An Apprise mailto:// URL delivering here: plain SMTP, no STARTTLS, no login.

        ``to=None`` leaves the recipients out (Apprise then writes to the sender).
        """
        params = {"from": self.sender, **({"to": to} if to else {}), **extra}
        query = "&".join(f"{k}={quote(v, safe='@,')}" for k, v in params.items())
        return f"mailto://{LOOPBACK}:{self.port}?{query}"

    def wait_for(self, count: int, timeout: float = 20.0) -> list[ReceivedMail]:
        wait_until(lambda: len(self.messages) >= count, timeout, f"{count} mail message(s)")
        with self._lock:
            return list(self.messages)
