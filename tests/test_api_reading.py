"""The poll's GETs on our own connections (no proxy): sent and read without httpx's models, yet
what goes on the wire and what is read are what httpx made of them (a real server on loopback)."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import stamina

from referral_watch.config import PartnerCenterConfig
from referral_watch.errors import ApiError
from referral_watch.partner_center.client import PartnerCenter

Answer = tuple[int, dict[str, str], bytes]


class Server:
    """A loopback HTTP/1.1 server answering GETs from a list of (status, headers, body), in
    order, and keeping every request's target (path and query) as it came on the wire."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.targets: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.targets.append(self.path)
                status, headers, body = outer.answers.pop(0)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.netloc = f"127.0.0.1:{self._server.server_port}"
        self.base_url = f"http://{self.netloc}/v1.0"

    def page(self, ids: list[str], link: str | None = None, **headers: str) -> Answer:
        body: dict[str, Any] = {"value": [{"id": lead_id} for lead_id in ids]}
        if link is not None:
            body["@odata.nextLink"] = link
        return 200, headers, json.dumps(body).encode()

    def __enter__(self) -> Server:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class Tokens:
    def get_token(self, *, force_refresh: bool = False) -> str:
        return "token"


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as running, stamina.set_testing(True, attempts=5):
        yield running


def poll(server: Server) -> list[str]:
    config = PartnerCenterConfig(base_url=server.base_url)
    with PartnerCenter(config, Tokens()) as client:
        return [record["id"] for page in client.pages() for record in page.records]


LIST = (
    "/v1.0/engagements/referrals?%24filter=direction+eq+%27Incoming%27+and+substatus+eq+"
    "%27Pending%27&%24orderby=createdDateTime+desc&%24top=100"
)

# (the nextLink as served, with {netloc} for the server's; the target then asked for)
NEXT_LINKS = [
    ("http://{netloc}/v1.0/referrals?$skiptoken=a1", "/v1.0/referrals?$skiptoken=a1"),
    ("https://{netloc}/v1.0/referrals?$skiptoken=a1", "/v1.0/referrals?$skiptoken=a1"),
    ("http://{netloc}/v1.0/referrals?%24skiptoken=a%2Fb", "/v1.0/referrals?%24skiptoken=a%2Fb"),
    ("/v1.0/referrals?$skiptoken=rel", "/v1.0/referrals?$skiptoken=rel"),
    ("http://{netloc}/v1.0/referrals?$skiptoken=a b", "/v1.0/referrals?$skiptoken=a%20b"),
    ("http://{netloc}/v1.0/referrals?$skiptoken=caf\u00e9", "/v1.0/referrals?$skiptoken=caf%C3%A9"),
    ("http://{netloc}/v1.0/x/../referrals?$skiptoken=up", "/v1.0/referrals?$skiptoken=up"),
    ("http://{netloc}/v1.0/./referrals?$skiptoken=here", "/v1.0/referrals?$skiptoken=here"),
    ("http://{netloc}/v1.0/referrals?$skiptoken=f#part", "/v1.0/referrals?$skiptoken=f"),
    ("http://{netloc}/v1.0/{odd}`path?q={x}", "/v1.0/%7Bodd%7D%60path?q={x}"),
    ("http://user@{netloc}/v1.0/referrals?$skiptoken=u", "/v1.0/referrals?$skiptoken=u"),
]


@pytest.mark.parametrize(("served", "asked"), NEXT_LINKS)
def test_a_next_link_is_asked_for_as_httpx_would_send_it(
    server: Server, served: str, asked: str
) -> None:
    link = served.replace("{netloc}", server.netloc)
    server.answers = [server.page(["a"], link), server.page(["b"])]
    assert poll(server) == ["a", "b"]
    assert server.targets == [LIST, asked]


def test_a_next_link_back_to_a_page_read_is_a_loop_however_it_is_spelled(server: Server) -> None:
    server.answers = [
        server.page(["a"], "/v1.0/referrals?$skiptoken=1"),
        server.page(["b"], f"https://{server.netloc}/v1.0/x/../referrals?$skiptoken=1#again"),
    ]
    with pytest.raises(ApiError, match="paging loop"):
        poll(server)


@pytest.mark.parametrize(
    ("encoding", "pack"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
)
def test_a_compressed_page_is_read_inflated(
    server: Server, encoding: str, pack: Callable[[bytes], bytes]
) -> None:
    status, _, body = server.page(["a", "b"], f"http://{server.netloc}/v1.0/referrals?n=2")
    server.answers = [(status, {"Content-Encoding": encoding}, pack(body)), server.page(["c"])]
    assert poll(server) == ["a", "b", "c"]


def test_a_corrupt_gzip_page_is_asked_for_again(server: Server) -> None:
    server.answers = [(200, {"Content-Encoding": "gzip"}, b"not gzip at all"), server.page(["a"])]
    assert poll(server) == ["a"]
    assert server.targets == [LIST, LIST]


def test_the_next_page_is_asked_for_while_this_one_is_handed_over(server: Server) -> None:
    """A poll's pages come one after another (each nextLink names the next): the next page's
    GET goes out before the caller has this page, so the API works on it meanwhile."""
    asked_for_second = threading.Event()
    served = server.answers
    link = f"http://{server.netloc}/v1.0/referrals?$skiptoken=2"
    served += [server.page(["a"], link), server.page(["b"])]

    class Watching(list[Answer]):
        def pop(self, index: int = -1) -> Answer:
            if len(server.targets) == 2:
                asked_for_second.set()
            return super().pop(index)

    server.answers = Watching(served)
    config = PartnerCenterConfig(base_url=server.base_url)
    with PartnerCenter(config, Tokens()) as client:
        pages = client.pages()
        first = next(pages)
        assert asked_for_second.wait(5), "the second page was not asked for ahead"
        assert [r["id"] for r in first.records] == ["a"]
        assert [r["id"] for page in pages for r in page.records] == ["b"]
    assert server.targets == [LIST, "/v1.0/referrals?$skiptoken=2"]


def test_a_page_asked_for_ahead_and_never_read_leaves_no_answer_behind(server: Server) -> None:
    """A poll left after its first page (the caller stopped): the next page, asked for ahead,
    is dropped with its connection; the next poll starts clean on a new one."""
    link = f"http://{server.netloc}/v1.0/referrals?$skiptoken=2"
    server.answers = [server.page(["a"], link), server.page(["b"]), server.page(["c"])]
    config = PartnerCenterConfig(base_url=server.base_url)
    with PartnerCenter(config, Tokens()) as client:
        pages = client.pages()
        assert [r["id"] for r in next(pages).records] == ["a"]
        pages.close()  # the caller stops: page b was asked for, never read
        for _ in range(500):  # (the server answers b to no one before the next poll asks)
            if len(server.targets) == 2:
                break
            time.sleep(0.01)
        assert server.targets[1] == "/v1.0/referrals?$skiptoken=2"
        assert [r["id"] for page in client.pages() for r in page.records] == ["c"]
