"""What the cycle talks to: the clock, Partner Center (the Api) and the channels (the Sender)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from referral_watch.model import Message

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


class Api(Protocol):
    def pages(self) -> Iterable[Any]: ...

    def get(self, referral_id: str) -> dict[str, Any] | None: ...


class Sender(Protocol):
    def send(self, channel: str, message: Message, *, recipients: Any = ()) -> Any: ...


class NoPolls:
    """The Api of a Cycle that only decides and delivers (``Cycle.notify_now``)."""

    def pages(self) -> list[Any]:
        return []

    def get(self, referral_id: str) -> None:
        return None
