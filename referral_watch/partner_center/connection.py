"""The Partner Center API's HTTP/1.1 connections, kept alive, on the standard library's
http.client, as an httpx transport.

A poll asks for its pages one after another (each page's nextLink names the next), so whatever a
request costs on our side adds to the poll's time. httpx's own connection layer (httpcore and h11,
pure Python) spent about 1 ms of CPU per page of 100 leads here; http.client, which parses the
status line and headers in C-backed buffered reads, about a third of that (`make bench`). The
poll's GETs ask ``send`` directly, with text and no httpx models (reading.py); everything else
(answers, lookups through ``handle_request``) goes through httpx's URLs, requests and responses.

Used only where the environment names no proxy: with HTTP(S)_PROXY or ALL_PROXY set, httpx's own
transport and its proxy support carry the requests (see ``for_environment``). TLS: the context httpx
itself would build (SSL_CERT_FILE / SSL_CERT_DIR, else certifi), made at the first https request.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator

import httpx

# Idle connections kept per host; a poll uses one, answers from the console may add a few.
MAX_IDLE = 4
CHUNK = 64 * 1024

Key = tuple[str, str, int]
# What a kept-alive connection the server closed meanwhile raises at its next request.
_CLOSED_BY_SERVER = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class _Stale(Exception):
    """A reused connection the server had closed: the request may go again on a new one."""


def for_environment() -> httpx.BaseTransport | None:
    """The transport for the API: this one, or None (httpx's own) where a proxy is configured."""
    return None if urllib.request.getproxies() else KeptAlive()


class KeptAlive(httpx.BaseTransport):
    """httpx transport: one http.client connection per request in flight, kept for the next."""

    def __init__(self) -> None:
        self._idle: dict[Key, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        headers = [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers.raw
        ]
        body = self.send(
            key,
            request.method,
            url.raw_path.decode("ascii"),
            headers,
            request.read() or None,
            request.extensions.get("timeout", {}),
            request=request,
        )
        answer = body.answer
        return httpx.Response(
            answer.status,
            headers=answer.getheaders(),
            stream=body,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": answer.reason.encode("latin-1", "replace"),
            },
        )

    def ahead(
        self,
        key: Key,
        target: str,
        headers: list[tuple[str, str]],
        timeouts: dict[str, float | None],
    ) -> Ahead | None:
        """A GET sent now on a kept connection, its answer read later by ``send(...,
        ahead=)``; None when no kept connection is free or it could not be sent (the GET then
        goes as usual, when asked for)."""
        connection = self._take(key)
        if connection is None:
            return None
        try:
            _put(connection, "GET", target, headers, None, timeouts)
        except Exception:
            connection.close()
            return None
        return Ahead(key, target, connection)

    def send(
        self,
        key: Key,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        content: bytes | None,
        timeouts: dict[str, float | None],
        *,
        request: httpx.Request | None = None,
        ahead: Ahead | None = None,
    ) -> Body:
        """One request (``target``: the path and query, ``headers`` with Host) on a kept
        connection to ``key``, or a new one; its answer's head read (``Body.answer``), the body
        to read from the Body after. The client's poll asks this directly, without httpx's
        models; every failure is httpx's error for it (``request`` is named in it when given).
        ``ahead``: the same GET, already sent (see ``ahead``): only its answer is read."""
        if ahead is not None and (ahead.key, ahead.target, method) != (key, target, "GET"):
            ahead.close()  # sent for another request: not this one's answer
            ahead = None
        if ahead is not None:
            try:
                return self._answer(key, ahead.connection, request, True)
            except _Stale:  # the server had closed the connection: again, on a new one
                pass
        elif (connection := self._take(key)) is not None:
            try:
                return self._exchange(
                    key, connection, method, target, headers, content, timeouts, request, True
                )
            except _Stale:  # the server closed it as we reused it: nothing was read
                if method != "GET":
                    raise httpx.RemoteProtocolError(
                        "the server closed the connection", request=request
                    ) from None
        connection = self._open(key, timeouts.get("connect"))
        try:
            connection.connect()
        except Exception as exc:
            connection.close()
            raise _as_httpx(exc, request, connecting=True) from exc
        return self._exchange(
            key, connection, method, target, headers, content, timeouts, request, False
        )

    def _exchange(
        self,
        key: Key,
        connection: http.client.HTTPConnection,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        content: bytes | None,
        timeouts: dict[str, float | None],
        request: httpx.Request | None,
        reused: bool,
    ) -> Body:
        """One request and its answer's head on ``connection``; the body streams after.
        _Stale when a ``reused`` connection turns out closed by the server."""
        try:
            _put(connection, method, target, headers, content, timeouts)
        except Exception as exc:
            raise _failed(connection, exc, request, reused) from exc
        return self._answer(key, connection, request, reused)

    def _answer(
        self,
        key: Key,
        connection: http.client.HTTPConnection,
        request: httpx.Request | None,
        reused: bool,
    ) -> Body:
        """The head of the answer to the request sent on ``connection``."""
        try:
            answer = connection.getresponse()
        except Exception as exc:
            raise _failed(connection, exc, request, reused) from exc
        return Body(self, key, connection, answer, request)

    def close(self) -> None:
        with self._lock:
            self._closed = True  # an answer still being read closes its connection after
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    # -- the pool

    def _take(self, key: Key) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                connections = self._idle.get(key)
                if not connections:
                    return None
                connection = connections.pop()
            if _usable(connection):
                return connection
            connection.close()  # the server closed it while it was idle

    def give_back(self, key: Key, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            connections = self._idle.setdefault(key, [])
            if not self._closed and len(connections) < MAX_IDLE:
                connections.append(connection)
                return
        connection.close()

    def _open(self, key: Key, timeout: float | None) -> http.client.HTTPConnection:
        scheme, host, port = key
        if scheme == "https":
            if self._tls is None:
                self._tls = httpx.create_ssl_context()  # what httpx would verify against
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls)
        return http.client.HTTPConnection(host, port, timeout=timeout)


class Ahead:
    """A GET sent before its answer is wanted: the poll's next page, asked for while the page
    before it is handed over (the page's nextLink names it), so the API works on it meanwhile."""

    def __init__(self, key: Key, target: str, connection: http.client.HTTPConnection) -> None:
        self.key = key
        self.target = target
        self.connection = connection

    def close(self) -> None:
        """Never read: the connection goes, its answer unread."""
        self.connection.close()


def _put(
    connection: http.client.HTTPConnection,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    content: bytes | None,
    timeouts: dict[str, float | None],
) -> None:
    """A request sent on ``connection`` (its answer not read)."""
    connection.putrequest(
        method,
        target,
        skip_host=True,  # the headers carry Host and Accept-Encoding
        skip_accept_encoding=True,
    )
    for name, value in headers:
        connection.putheader(name, value)
    if connection.sock is not None:
        connection.sock.settimeout(timeouts.get("read"))
    connection.endheaders(content)


def _failed(
    connection: http.client.HTTPConnection,
    exc: Exception,
    request: httpx.Request | None,
    reused: bool,
) -> BaseException:
    """What a failed exchange raises: _Stale when a ``reused`` connection turns out closed by
    the server, else httpx's error; the connection is closed either way."""
    connection.close()
    if reused and isinstance(exc, _CLOSED_BY_SERVER):
        return _Stale()
    return _as_httpx(exc, request, connecting=False)


class Body(httpx.SyncByteStream):
    """A response's body as it arrives (``answer``: its status and headers); the connection goes
    back to the pool once the body has been read to its end, and is closed when the reader stops
    early."""

    def __init__(
        self,
        pool: KeptAlive,
        key: Key,
        connection: http.client.HTTPConnection,
        answer: http.client.HTTPResponse,
        request: httpx.Request | None,
    ) -> None:
        self._pool = pool
        self._key = key
        self._connection: http.client.HTTPConnection | None = connection
        self.answer = answer
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        try:
            while chunk := self.answer.read1(CHUNK):
                yield chunk
            missing = self.answer.length
            if missing:  # read1 ends quietly when the server closes before Content-Length
                raise http.client.IncompleteRead(b"", missing)
            if missing == 0:  # read1 leaves a complete answer open: close it (b"") so the
                self.answer.read()  # connection can be kept
        except BaseException as exc:
            self._drop()
            raise _as_httpx(exc, self._request, connecting=False) from exc

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self.answer.isclosed() and not self.answer.will_close:
            self._pool.give_back(self._key, connection)  # read to its end: reusable
        else:
            self.answer.close()
            connection.close()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _usable(connection: http.client.HTTPConnection) -> bool:
    """An idle connection the server has not closed: nothing to read on it (a closed one reads
    as end of file; any bytes on an idle connection would be a protocol error)."""
    sock = connection.sock
    if sock is None:
        return False
    poller = select.poll()  # not select(): any descriptor number
    try:
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _as_httpx(
    exc: BaseException, request: httpx.Request | None, *, connecting: bool
) -> BaseException:
    """The httpx exception for what http.client or the socket raised, so the callers' handling
    (retries, messages) is the same whichever transport carried the request."""
    if not isinstance(exc, Exception):
        return exc  # KeyboardInterrupt and the like pass as they are
    text = str(exc) or type(exc).__name__
    kind: type[httpx.TransportError]
    if isinstance(exc, socket.timeout | TimeoutError):
        kind = httpx.ConnectTimeout if connecting else httpx.ReadTimeout
    elif isinstance(exc, http.client.HTTPException):  # bad status line, too many headers, cut off
        kind = httpx.RemoteProtocolError
    elif isinstance(exc, ssl.SSLError | ConnectionRefusedError | socket.gaierror):
        kind = httpx.ConnectError
    elif isinstance(exc, OSError):
        kind = httpx.ConnectError if connecting else httpx.ReadError
    else:
        return exc
    return kind(text, request=request)
