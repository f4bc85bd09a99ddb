"""What goes over the sandbox's wire: its API paths, the error codes and bodies it answers
with, the requests it records, the faults it can be told to serve, and a list query."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

API_PREFIX = "/v1.0"
LIST_PATHS = (f"{API_PREFIX}/engagements/referrals", f"{API_PREFIX}/referrals")
ITEM_PREFIX = f"{API_PREFIX}/engagements/referrals/"

STREAM_FAULTS = ("huge", "gzip_bomb", "endless_body", "endless_next", "slowloris")

ERROR_CODES = {
    400: "invalidRequest",
    401: "unauthenticated",
    403: "accessDenied",
    404: "itemNotFound",
    409: "conflict",
    412: "preconditionFailed",
    429: "tooManyRequests",
    500: "internalServerError",
    502: "badGateway",
    503: "serviceNotAvailable",
    504: "gatewayTimeout",
}


class Headers(dict[str, str]):
    """Request headers, looked up case-insensitively (keys are stored lower-cased)."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: Headers
    body: bytes = b""

    def json(self) -> Any:
        """The request body as JSON (a PATCH's JSON Patch document)."""
        return json.loads(self.body)


@dataclass
class Fault:
    status: int
    times: int
    on: str
    page: int | None
    retry_after: float | None
    body: bytes | None
    delay: float
    truncate: bool
    hang: bool
    kind: str | None = None  # one of STREAM_FAULTS: a hostile body instead of an answer
    size: int = 0  # "huge": bytes in the page
    headers: dict[str, str] | None = None  # extra headers; "{token}" becomes the caller's token

    def matches(self, on: str, page: int | None) -> bool:
        return self.on == on and (self.page is None or self.page == page)


@dataclass
class Query:
    filter: str | None
    order: str | None
    top: int
    offset: int


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
