"""`run --once --dry-run`: one real cycle whose messages are shown, not sent, and whose every
change to the state is undone.

The cycle is the daemon's own (`Cycle.run`: poll, store, decide, render, "deliver"); only two
edges differ. The sender keeps each message instead of sending it, and the store holds one
transaction open for the whole cycle, turning the cycle's own transactions into savepoints,
and rolls it back at the end: no lead, poll, outbox row or silence is recorded, so the real
run that follows sends exactly what the dry run showed. Nothing else is contacted either (the
heartbeat is not pinged).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from referral_watch.config import ChannelConfig, Config
from referral_watch.errors import StateError
from referral_watch.model import Message
from referral_watch.render.channels import channel_kind
from referral_watch.state.store import Store


@dataclass(frozen=True)
class Preview:
    """One message a real run would send."""

    channel: str
    to: str  # who gets it: email addresses, or the channel's URL with its secrets masked
    title: str
    body: str
    notify_type: str


@dataclass(frozen=True)
class _Kept:
    ok: bool = True
    error: str | None = None


class PreviewSender:
    """A Sender that keeps every message (in the order the cycle hands them over)."""

    def __init__(self, channels: dict[str, ChannelConfig]) -> None:
        self.channels = channels
        self.previews: list[Preview] = []
        self._lock = threading.Lock()  # the cycle sends to channels side by side

    def send(self, channel: str, message: Message, *, recipients: Sequence[str] = ()) -> _Kept:
        config = self.channels.get(channel)
        if config is None:
            return _Kept(False, "unknown channel")
        to = recipients_text(config, recipients)
        body = message.body_with_links()  # a Teams card's buttons, shown as links
        preview = Preview(channel, to, message.title, body, message.notify_type)
        with self._lock:
            self.previews.append(preview)
        return _Kept()


def recipients_text(channel: ChannelConfig, recipients: Sequence[str] = ()) -> str:
    """Who a message on this channel reaches, fit to print: the email addresses for an email
    channel (a to_assignees channel's lead team when it has one, a claimed lead's owner on the
    claims' owner channel), else the URL, secrets masked."""
    if channel_kind(channel.url) == "email":
        from referral_watch.notify import valid_recipients

        chosen = valid_recipients(recipients) if channel.addressed else []
        addresses = chosen or _email_targets(channel.url)
        if addresses:
            return ", ".join(addresses)
    from referral_watch.notify import redact_url

    return redact_url(channel.url)


def _email_targets(url: str) -> list[str]:
    """The addresses an Apprise mailto(s):// URL sends to: its path targets and to=, cc=,
    bcc=; none of them means the account's own address (user@host)."""
    parts = urlsplit(url.strip())
    found = [unquote(p) for p in parts.path.split("/") if "@" in unquote(p)]
    for key, value in parse_qsl(parts.query):
        if key.lower() in ("to", "cc", "bcc"):
            found += [a.strip() for a in value.replace(";", ",").split(",") if "@" in a]
    if not found and parts.username and parts.hostname:
        user = unquote(parts.username)
        found.append(user if "@" in user else f"{user}@{parts.hostname}")
    return list(dict.fromkeys(found))


class UndoneStore(Store):
    """A Store whose changes are all undone on close: one transaction from open to close
    (holding the writer's lock, as a cycle's transactions do), each `transaction()` a
    savepoint inside it."""

    def __init__(self, where: Path | str) -> None:
        super().__init__(where, create=False)
        self._savepoints = 0
        try:
            self.dialect.begin(self.db)
        except self.dialect.errors as exc:
            self.db.close()
            raise StateError(self.dialect.explain(exc)) from None
        except StateError:
            self.db.close()
            raise

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        self._savepoints += 1
        name = f"dry_run_{self._savepoints}"
        self._run(f"SAVEPOINT {name}")
        try:
            yield self.db
        except self.dialect.errors as exc:
            self._undo(name)
            raise StateError(self.dialect.explain(exc)) from None
        except BaseException:
            self._undo(name)
            raise
        self._run(f"RELEASE SAVEPOINT {name}")

    def _run(self, statement: str) -> None:
        try:
            self.db.execute(statement)
        except self.dialect.errors as exc:
            raise StateError(self.dialect.explain(exc)) from None

    def _undo(self, name: str) -> None:
        errors: tuple[type[BaseException], ...] = (StateError, *self.dialect.errors)
        try:
            self.db.execute(f"ROLLBACK TO SAVEPOINT {name}")
            self.db.execute(f"RELEASE SAVEPOINT {name}")
        except errors:
            pass  # the database rolled the whole transaction back already: close() ends it

    def close(self) -> None:
        try:
            self._rollback()
        finally:
            super().close()


@contextmanager
def undone_store(config: Config) -> Iterator[Store]:
    """The state to run a dry cycle on: the real one, changes undone; a first dry run (no state
    file yet) works on a scratch file that is removed afterwards, creating nothing."""
    from referral_watch.state.replica import state_lock

    location = config.state.location
    if isinstance(location, Path) and not location.exists():
        with (
            tempfile.TemporaryDirectory(prefix="referral-watch-dry-run-") as folder,
            Store(Path(folder) / "state.db") as scratch,
        ):
            yield scratch
        return
    # The real state: kept off a running daemon (exit 3), as `run --once` is.
    with state_lock(config), UndoneStore(location) as store:
        yield store


def dry_run(config: Config, api: Any) -> tuple[Any, list[Preview]]:
    """One cycle against `api`: (its CycleResult, the messages it would have sent)."""
    from referral_watch.daemon import new_cycle

    quiet = config.model_copy(update={"heartbeat": None})  # the dead-man's switch hears nothing
    sender = PreviewSender(dict(config.channels))
    with undone_store(config) as store:
        result = new_cycle(quiet, store, api, sender).run()
    return result, sender.previews
