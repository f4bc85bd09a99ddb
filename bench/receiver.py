"""A tiny counting webhook receiver for the benchmark (tests/receivers.py is test-only)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            title = str(json.loads(body).get("title", ""))
        except (ValueError, AttributeError):
            title = ""
        self.server.sink.record(title)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        super().__init__(("127.0.0.1", 0), _Handler)


class Sink:
    """Counts the messages (and keeps the titles) Apprise posts to one json:// channel."""

    def __init__(self) -> None:
        self.titles: list[str] = []
        self._lock = threading.Lock()
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self._server.server_address[1]}/hook"

    def record(self, title: str) -> None:
        with self._lock:
            self.titles.append(title)

    def count(self) -> int:
        with self._lock:
            return len(self.titles)

    def __enter__(self) -> Sink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
