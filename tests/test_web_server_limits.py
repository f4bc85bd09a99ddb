"""Slow requests against the web server (issue 25 item 1): a whole-request deadline, a minimum
rate, the oldest stuck request evicted at the cap, room kept for /healthz, and the webhook
receiver reading its body under the deadline. On the real daemon where the whole process
matters; in-process (the same WebServer) with short limits where only the server does."""

from __future__ import annotations

import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from referral_watch.config.loader import load_config
from referral_watch.daemon import Daemon
from referral_watch.partner_center.webhooks.receiver import Receiver
from referral_watch.web.app import build_app
from referral_watch.web.server import WebServer

from conftest import World, free_port, wait_until

HOOK = "/webhooks/partner-center"


def webhooks_config(port: int) -> str:
    return f'[server]\nlisten = "127.0.0.1:{port}"\n[webhooks]\npath = "{HOOK}"\n'


def answer_of(url: str, data: bytes | None = None, timeout: float = 5) -> int | None:
    """The HTTP status, or None when the server did not answer (refused, reset, timed out)."""
    try:
        with urllib.request.urlopen(url, data=data, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


def slow_body(port: int) -> socket.socket:
    """A webhook POST that promises 60 000 bytes of body and sends one."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        f"POST {HOOK} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        "Content-Length: 60000\r\n\r\n{".encode()
    )
    return sock


class SlowBodies(threading.Thread):
    """Keeps ``count`` slow-body connections open, opening a new one whenever the server
    closes one (as an attacker would); ``cut`` counts those the server closed."""

    def __init__(self, port: int, count: int) -> None:
        super().__init__(daemon=True)
        self.port, self.count = port, count
        self.cut = 0
        self.open: list[socket.socket] = []
        self.done = threading.Event()

    def _replace(self) -> None:
        while not self.done.is_set():
            try:
                self.open.append(slow_body(self.port))
                return
            except OSError:
                self.cut += 1
                time.sleep(0.05)

    def run(self) -> None:
        for _ in range(self.count):
            self._replace()
        while not self.done.is_set():
            closed, _, _ = select.select(self.open, [], [], 0.2)
            for sock in closed:  # readable: the server closed it (or answered and closed)
                sock.close()
                self.open.remove(sock)
                self.cut += 1
                self._replace()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)
        for sock in self.open:
            sock.close()


@pytest.mark.slow
def test_a_hundred_slow_request_bodies_do_not_take_the_server_down(world: World) -> None:
    port = free_port()
    world.extra = webhooks_config(port)
    base = f"http://127.0.0.1:{port}"
    with world.daemon():
        wait_until(lambda: answer_of(f"{base}/healthz") is not None, what="the web server")
        flood = SlowBodies(port, 105)
        flood.start()
        try:
            wait_until(lambda: len(flood.open) >= 105, what="105 slow bodies in flight")
            answers: list[int | None] = []
            until = time.monotonic() + 15  # longer than the whole-request deadline (10 s)
            while time.monotonic() < until:
                answers.append(answer_of(f"{base}/healthz", timeout=5))
                time.sleep(0.2)
        finally:
            flood.stop()
        assert None not in answers, f"/healthz went unanswered {answers.count(None)} times"
        assert flood.cut >= 105  # every slow body was cut; none held its connection for good
        # and the endpoint itself still answers: an unsigned event is refused, not ignored
        assert answer_of(f"{base}{HOOK}", data=b"{}") == 401


@pytest.fixture
def served(world: World) -> Iterator[tuple[WebServer, int]]:
    """The web server in-process with the webhook endpoint, on a free port."""
    port = free_port()
    world.extra = webhooks_config(port)
    daemon = Daemon(load_config(world.write_config()))
    assert daemon.config.server is not None
    receiver = Receiver(daemon.config)
    server = WebServer(build_app(daemon, routes=[receiver.route()]), daemon.config.server)
    server.start()
    yield server, port
    server.stop()


def closed_without_an_answer(sock: socket.socket) -> bool:
    """Wait (at most the socket's timeout) for the server to close; True if it sent nothing."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def trickling(sock: socket.socket, data: bytes, step: int, pause: float) -> None:
    """Send ``data`` ``step`` bytes at a time, ``pause`` seconds apart, on a thread of its own,
    until it is sent, the server closes, or 20 seconds pass."""
    until = time.monotonic() + 20

    def send() -> None:
        for start in range(0, len(data), step):
            if time.monotonic() > until:
                return
            try:
                sock.sendall(data[start : start + step])
            except OSError:
                return  # closed by the server: what the test checks
            time.sleep(pause)

    threading.Thread(target=send, daemon=True).start()


def limits(monkeypatch: pytest.MonkeyPatch, **values: float) -> None:
    """Set the web server's limits for one test (raising=False: main lacked some)."""
    from referral_watch.web import server

    for name, value in values.items():
        monkeypatch.setattr(server, name, value, raising=False)


def whole_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, read to its last byte."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(4096)
    return data


@pytest.fixture
def short_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    limits(monkeypatch, REQUEST_TIMEOUT=3.0, RATE_WINDOW=0.5)  # >= 128 bytes every 0.5 s


@pytest.mark.parametrize(
    ("step", "pause"),
    [
        (1, 0.05),  # a byte at a time: below the minimum rate
        (100, 0.1),  # keeps up the rate, but 60,000 bytes would take a minute: the deadline
    ],
)
def test_a_slow_body_is_cut(
    short_limits: None, served: tuple[WebServer, int], step: int, pause: float
) -> None:
    _, port = served
    sock = slow_body(port)
    sock.settimeout(20)
    trickling(sock, b"x" * 59_999, step, pause)
    assert closed_without_an_answer(sock)
    sock.close()


def test_the_next_request_on_a_kept_alive_connection_has_a_deadline_too(
    short_limits: None, served: tuple[WebServer, int]
) -> None:
    _, port = served
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    first = whole_response(sock)
    assert first.startswith(b"HTTP/1.1 503")  # answered (no poll yet); the connection stays
    head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Pad: {'a' * 400}\r\n\r\n"
    trickling(sock, head.encode(), 1, 0.05)
    assert closed_without_an_answer(sock)
    sock.close()


def test_at_the_cap_the_oldest_stuck_request_makes_way_for_healthz(
    served: tuple[WebServer, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # nothing is cut by time here; the next test shows the probes' room
    limits(monkeypatch, MAX_CONNECTIONS=8, PROBE_ROOM=0, REQUEST_TIMEOUT=30, RATE_WINDOW=15)
    _, port = served
    stuck = [slow_body(port) for _ in range(8)]
    time.sleep(0.2)  # they have all begun to arrive
    assert answer_of(f"http://127.0.0.1:{port}/healthz") == 503  # answered (no poll yet)
    stuck[0].settimeout(20)
    assert closed_without_an_answer(stuck[0])  # the oldest went
    for sock in stuck:
        sock.close()


def test_uploads_never_take_the_room_kept_for_the_probes(
    served: tuple[WebServer, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # uploads may hold 5 connections at most
    limits(monkeypatch, MAX_CONNECTIONS=8, PROBE_ROOM=3, REQUEST_TIMEOUT=30, RATE_WINDOW=15)
    _, port = served
    stuck = []
    for _ in range(8):
        stuck.append(slow_body(port))
        time.sleep(0.05)  # in order: the oldest is known
    for sock in stuck[:3]:
        sock.settimeout(20)
        assert closed_without_an_answer(sock)  # the oldest three made way
    assert answer_of(f"http://127.0.0.1:{port}/healthz") == 503  # answered (no poll yet)
    assert answer_of(f"http://127.0.0.1:{port}/livez") == 200  # the liveness probe too
    readable, _, _ = select.select(stuck[3:], [], [], 0.2)
    assert readable == []  # the five newest still wait for their deadline
    for sock in stuck:
        sock.close()


def test_the_webhook_receiver_reads_its_body_under_a_deadline(
    served: tuple[WebServer, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a body that keeps up the server's rate gets an answer within the deadline."""
    from referral_watch.partner_center.webhooks import receiver as webhook_receiver

    monkeypatch.setattr(webhook_receiver, "REQUEST_TIMEOUT", 1.0)
    _, port = served
    sock = slow_body(port)
    sock.settimeout(20)
    trickling(sock, b"x" * 59_999, 1000, 0.2)  # well above the server's minimum rate
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    sock.close()
