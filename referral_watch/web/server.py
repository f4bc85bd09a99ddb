"""uvicorn on a thread of the daemon's process, hardened for a port anyone may reach.

A connection costs the process a file descriptor, and the daemon needs descriptors for its
state file and its API and channel connections. uvicorn bounds request heads (h11's size
limit), idle keep-alive time and concurrency, but not the time a request takes to arrive
(uvicorn issue #157: no request-start or request-complete timeout), so ``GuardedH11Protocol``
adds what it lacks:

- a whole-request deadline: a request's head and body must arrive within ``REQUEST_TIMEOUT``
  seconds (the first request counts from the connection's opening, a later one from its first
  byte), and once bytes flow, at least ``MIN_RATE`` bytes a second in every ``RATE_WINDOW``:
  a trickle is cut within seconds, a stall at the deadline;
- a cap of ``MAX_CONNECTIONS``: a new connection beyond it pushes out the one that has waited
  longest, idle or stuck mid-request, never one being served;
- room for the probes: requests other than /healthz, /livez and /metrics may hold at most
  ``MAX_CONNECTIONS - PROBE_ROOM`` connections in flight, so no flood of uploads (or slow pages)
  can take the last slots from Kubernetes' probes and Prometheus.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from typing import Any

import h11
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from referral_watch.config import ServerConfig
from referral_watch.errors import ReferralWatchError
from referral_watch.web.signin import PROBE_PATHS

log = structlog.get_logger(__name__)

MAX_CONNECTIONS = 100
# Connections accepted per turn of the event loop (asyncio's batch, and the kernel's queue):
# small, so a burst cannot take many descriptors before the cap above closes the excess.
ACCEPT_BATCH = 64
REQUEST_TIMEOUT = 10.0  # seconds for a whole request, head and body, to arrive
MIN_RATE = 256  # bytes a second a request must keep up once it has begun to arrive ...
RATE_WINDOW = 2.0  # ... measured over windows of this many seconds
PROBE_ROOM = 10  # connections only the probes (/healthz, /livez, /metrics) may use
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open between requests
STARTUP_TIMEOUT = 10.0
# Behind a reverse proxy on the same host, X-Forwarded-For/-Proto are believed; from anyone
# else they are ignored (a client could claim to be anything).
TRUSTED_PROXIES = "127.0.0.1,::1"
HANDLED_SIGNALS = {
    signal.SIGINT,
    signal.SIGTERM,
    *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []),
}
# h11's states of the client once its whole request is in (or it can send no more).
_ARRIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR, h11.SWITCHED_PROTOCOL)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a whole-request deadline, a minimum rate, a
    connection cap that evicts the stuck, and room kept for the probes."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # loop time the request in arrival must be in by
        self._flowing = False  # bytes of that request have arrived
        self._window = 0  # bytes since the last rate check
        self._since = 0.0  # loop time this connection began to wait (for a request, or idle)
        self._expect(self.loop.time())
        if len(self.connections) > MAX_CONNECTIONS:
            self._keep_within_the_cap()

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        if self._deadline is None:  # the next request on a kept-alive connection begins
            self._expect(now)
        if not self._flowing:
            self._flowing = True
            self._window = 0
            self._schedule(min(RATE_WINDOW, self._deadline - now))  # type: ignore[operator]
        self._window += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not before:
            self._make_room_for_probes()
        if self._deadline is not None and self.conn.their_state in _ARRIVED:
            self._arrived()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    # --- the deadline and the rate ---------------------------------------------------------

    def _expect(self, start: float) -> None:
        self._since = start
        self._deadline = start + REQUEST_TIMEOUT
        self._flowing = False
        self._schedule(REQUEST_TIMEOUT)

    def _arrived(self) -> None:
        self._since = self.loop.time()
        self._deadline = None
        self._flowing = False
        self._cancel_timer()

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_later(max(delay, 0.0), self._check)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._deadline is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if now >= self._deadline - 0.001:
            self._cut("request not complete within the deadline")
        elif self._flowing and self._window < MIN_RATE * RATE_WINDOW and not self.flow.read_paused:
            self._cut("request arriving slower than the minimum rate")
        else:
            self._window = 0
            self._schedule(min(RATE_WINDOW, self._deadline - now))

    def _cut(self, why: str) -> None:
        log.debug("server.request_cut", reason=why, client=self.client)
        self.transport.abort()

    # --- the cap ---------------------------------------------------------------------------

    def _serving(self) -> bool:
        """A request has arrived and its response is not finished: never pushed out."""
        return (
            self._deadline is None and self.cycle is not None and not self.cycle.response_complete
        )

    def _live(self) -> list[GuardedH11Protocol]:
        # Closed transports leave the set a moment later (connection_lost is called soon).
        return [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol) and not c.transport.is_closing()
        ]

    def _keep_within_the_cap(self) -> None:
        live = self._live()
        excess = len(live) - MAX_CONNECTIONS
        if excess <= 0:
            return
        # Idle or stuck mid-request, longest waiting first: a slow body that has been
        # trickling for seconds goes before a probe that connected a moment ago.
        waiting = sorted(
            (c for c in live if c is not self and not c._serving()), key=lambda c: c._since
        )
        for victim in waiting[:excess] or [self]:
            victim.transport.abort()

    def _make_room_for_probes(self) -> None:
        """A request other than a probe may not take the probes' room: the oldest other one
        still arriving goes, else this one."""
        if self.scope.get("path") in PROBE_PATHS:
            return
        others = [
            c
            for c in self._live()
            if c.cycle is not None
            and not c.cycle.response_complete
            and c.scope.get("path") not in PROBE_PATHS
        ]
        if len(others) <= MAX_CONNECTIONS - PROBE_ROOM:
            return
        arriving = sorted(
            (c for c in others if c is not self and c._deadline is not None),
            key=lambda c: c._deadline or 0.0,
        )
        (arriving[0] if arriving else self).transport.abort()


class WebServer:
    """Serves an ASGI app on ``[server] listen`` until ``stop()``."""

    def __init__(self, app: Any, settings: ServerConfig) -> None:
        self.settings = settings
        self.config = uvicorn.Config(
            app,
            http=GuardedH11Protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=True,
            forwarded_allow_ips=TRUSTED_PROXIES,
            # Backstop for requests in flight; connections are capped by the protocol above.
            limit_concurrency=MAX_CONNECTIONS + 1,
            timeout_keep_alive=KEEP_ALIVE,
            timeout_graceful_shutdown=3,
            server_header=False,
            backlog=ACCEPT_BATCH,
        )
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (a clear error naming the address if that fails), then serve on a thread."""
        sock = bind(self.settings)
        self._thread = threading.Thread(
            target=self._run, kwargs={"sock": sock}, name="http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if not self.server.started:
            raise ReferralWatchError(
                f"the web server on {self.settings.listen} ([server] listen) did not start"
            )
        log.info("server.listening", listen=self.settings.listen)

    def _run(self, sock: socket.socket) -> None:
        # The daemon's signals are for its main thread (Python runs handlers only there): if
        # the kernel handed SIGTERM to this thread, or to the worker threads it starts, the
        # main thread would sleep on until its next scheduled job and not stop.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        self.server.run(sockets=[sock])

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def bind(settings: ServerConfig) -> socket.socket:
    """A listening socket on ``settings.listen``, or ReferralWatchError naming the address."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
    # that say they are TCP, and with it on, a response's body waited ~40 ms for the client's
    # delayed ACK of its head on every kept-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
        sock.listen(ACCEPT_BATCH)
    except OSError as exc:
        sock.close()
        hint = " (another process uses that port: pick another one)" if _in_use(exc) else ""
        raise ReferralWatchError(
            f"cannot listen on {settings.listen} ([server] listen): {exc.strerror}{hint}"
        ) from None
    sock.set_inheritable(False)
    return sock


def _in_use(exc: OSError) -> bool:
    import errno

    return exc.errno == errno.EADDRINUSE
