"""uvicorn on a thread of the daemon's process, hardened for a port anyone may reach.

A connection costs the process a file descriptor, and the daemon needs descriptors for its
state file and its API and channel connections. So the server keeps at most
``MAX_CONNECTIONS`` open (a new one beyond that pushes out the oldest idle one, so a flood of
idle sockets cannot lock out /healthz), and a connection that has not sent a complete request
head within ``REQUEST_TIMEOUT`` seconds of opening is closed (uvicorn's own keep-alive timer
only starts after a first response).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from referral_watch.config import ServerConfig
from referral_watch.errors import ReferralWatchError

log = structlog.get_logger(__name__)

MAX_CONNECTIONS = 100
# Connections accepted per turn of the event loop (asyncio's batch, and the kernel's queue):
# small, so a burst cannot take many descriptors before the cap above closes the excess.
ACCEPT_BATCH = 64
REQUEST_TIMEOUT = 10.0  # seconds for a new connection to send its request head
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


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a connection cap and a deadline for the first request."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            REQUEST_TIMEOUT, self._no_request_in_time
        )
        if len(self.connections) > MAX_CONNECTIONS:
            self._keep_within_the_cap()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self._head_timer is not None:
            self._head_timer.cancel()  # a request arrived; keep-alive timing takes over
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _no_request_in_time(self) -> None:
        self._head_timer = None
        if self.cycle is None and not self.transport.is_closing():
            self.transport.abort()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _keep_within_the_cap(self) -> None:
        # Closed transports leave the set a moment later (connection_lost is called soon).
        live = [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol) and not c.transport.is_closing()
        ]
        excess = len(live) - MAX_CONNECTIONS
        if excess <= 0:
            return
        idle = sorted((c for c in live if c._idle()), key=lambda c: c.opened)
        for victim in idle[:excess] or [self]:
            victim.transport.abort()


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
    sock = socket.socket(family, socket.SOCK_STREAM)
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
