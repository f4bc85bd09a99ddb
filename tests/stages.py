"""What the unit tests of the cycle's stages share: the usual config, a state file, fake edges
(an Api of given pages, a Sender that records what it was given)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from referral_watch.config import Config
from referral_watch.config.loader import parse_config
from referral_watch.model import Message

from policies import policy

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)

CONFIG: Config = parse_config(
    '[auth]\nmethod = "env"\n\n'
    + policy()
    + '\n[channels]\nteam = "json://127.0.0.1:9/team"\nmanagers = "json://127.0.0.1:9/managers"\n',
    env={},
)


@dataclass
class FakePage:
    records: list[Any]


@dataclass
class FakeApi:
    """Partner Center as a list of pages and a dict of records by id (a by-id lookup)."""

    pages_given: list[list[Any]] = field(default_factory=list)
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)

    def pages(self) -> Iterable[FakePage]:
        return [FakePage(list(page)) for page in self.pages_given]

    def get(self, referral_id: str) -> dict[str, Any] | None:
        return self.by_id.get(referral_id)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    error: str | None = None


@dataclass
class FakeSender:
    """Records every message; refuses on the channels in ``refusing``, raises on ``broken``."""

    sent: list[tuple[str, Message]] = field(default_factory=list)
    refusing: set[str] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)

    def send(self, channel: str, message: Message, *, recipients: Any = ()) -> Outcome:
        if channel in self.broken:
            raise RuntimeError("a sender bug")
        if channel in self.refusing:
            return Outcome(False, "HTTP 500 from the channel")
        self.sent.append((channel, message))
        return Outcome(True)
