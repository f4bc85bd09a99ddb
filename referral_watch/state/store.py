"""The state: one object over the table groups, each in its own module (leads, outbox,
quarantine, webhook events, journal, console queries), opened with its schema current."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from referral_watch.errors import StateError
from referral_watch.state.claims import Claims
from referral_watch.state.console import Console
from referral_watch.state.journal import Journal
from referral_watch.state.outbox import Outbox
from referral_watch.state.quarantine import Quarantine
from referral_watch.state.schema import prepare
from referral_watch.state.webhook_events import WebhookEvents


class Store(Journal, Console, Outbox, Quarantine, WebhookEvents, Claims):
    """One open state (a SQLite file, or a PostgreSQL database given by its URL). Not shared
    between threads: open one per thread."""

    def __init__(
        self,
        where: Path | str,
        *,
        create: bool = True,
        name: str | None = None,
        connection: Any = None,
    ) -> None:
        """``connection``: one already open whose schema is current (a pool's, state.pool)."""
        super().__init__(where, create=create, name=name, connection=connection)
        if connection is not None:
            return
        try:
            prepare(self)  # the schema's version checked, then brought up to date
        except self.dialect.errors as exc:
            self.db.close()
            raise StateError(self.dialect.explain(exc)) from None
        except StateError:
            self.db.close()
            raise
