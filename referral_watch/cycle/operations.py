"""Operations: what referral-watch tells about itself (failing cycles, records set aside,
messages dropped), through the outbox like every message, or directly when the state itself
cannot be used (the daemon's state trouble); and the dead-man's switch (heartbeat)."""

from __future__ import annotations

from datetime import datetime

import structlog

from referral_watch import ops
from referral_watch.config import Config
from referral_watch.cycle.ports import Sender
from referral_watch.cycle.result import CycleResult
from referral_watch.model import Message
from referral_watch.redact import scrub
from referral_watch.state.db import from_ts, ts
from referral_watch.state.store import Store

log = structlog.get_logger(__name__)

# Operations hear of at most this many newly quarantined records by name in one message.
QUARANTINE_NAMED = 20


def ops_messages(
    config: Config,
    event: str,
    reason: str,
    now: datetime,
    *,
    skip: str | None = None,
    failures: int = 0,
    since: datetime | None = None,
) -> list[tuple[str, Message]]:
    """(channel, message) for each operations channel but `skip` (the channel that just
    failed): the one wording of operations' news."""
    from referral_watch.render import notices  # Jinja2 and Babel: only when needed
    from referral_watch.render.channels import style_for

    reason = scrub(reason)
    found = []
    for channel in config.operations.notify:
        if channel == skip:
            continue
        style = style_for(config, channel)
        found.append(
            (channel, notices.render_ops(event, reason, now, style, failures=failures, since=since))
        )
    return found


def tell_directly(
    config: Config,
    sender: Sender,
    event: str,
    reason: str,
    now: datetime,
    *,
    failures: int = 0,
    since: datetime | None = None,
) -> None:
    """Send operations' news now, not through the outbox: the state cannot be used."""
    for channel, message in ops_messages(
        config, event, reason, now, failures=failures, since=since
    ):
        outcome = sender.send(channel, message)
        if not outcome.ok:
            log.error("ops.unsent", channel=channel, error=outcome.error)


class Operations:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store

    def enqueue(
        self,
        event: str,
        reason: str,
        now: datetime,
        *,
        skip: str | None = None,
        failures: int = 0,
        since: datetime | None = None,
    ) -> list[int]:
        """Put a message about referral-watch itself in the outbox for each operations
        channel (but `skip`, the channel that just failed); returns the row ids."""
        made = ops_messages(
            self.config, event, reason, now, skip=skip, failures=failures, since=since
        )
        return [
            self.store.enqueue_message("ops", channel, message.title, message.body, now)
            for channel, message in made
        ]

    def tell(self, result: CycleResult, now: datetime) -> list[int]:
        """Queue what operations should hear after this cycle; returns the outbox row ids."""
        state = ops.OpsState(
            alerting_since=from_ts(self.store.get_meta("ops.alerting_since")),
            last_alert=from_ts(self.store.get_meta("ops.last_alert")),
        )
        failures = self.store.failures_in_a_row()
        event, new_state = ops.ops_event(
            result.cycle_ok, failures, state, self.config.operations, now
        )
        told = self._tell_quarantined(now)
        if event is None:
            return told
        reason = result.error or ""
        log.warning("ops.event", ops_event=event, failures=failures, reason=reason)
        told += self.enqueue(
            event, reason, now, failures=failures, since=state.alerting_since or now
        )
        with self.store.transaction():
            self.store.set_meta(
                "ops.alerting_since",
                ts(new_state.alerting_since) if new_state.alerting_since else None,
            )
            self.store.set_meta(
                "ops.last_alert", ts(new_state.last_alert) if new_state.last_alert else None
            )
        return told

    def _tell_quarantined(self, now: datetime) -> list[int]:
        """One message naming the records set aside since operations last heard: each
        record is told once, however many cycles it stays bad."""
        items = self.store.quarantined(unnotified=True)
        if not items:
            return []
        lines = [f"{q.key} ({q.stage}): {q.reason}" for q in items[:QUARANTINE_NAMED]]
        if len(items) > QUARANTINE_NAMED:
            lines.append(f"... and {len(items) - QUARANTINE_NAMED} more (see `status`)")
        log.warning("ops.event", ops_event=ops.QUARANTINED, records=len(items))
        told = self.enqueue(ops.QUARANTINED, "\n".join(lines), now, failures=len(items))
        with self.store.transaction():
            self.store.mark_quarantine_notified(q.key for q in items)
        return told

    def heartbeat(self, poll_ok: bool) -> None:
        """Ping the dead-man's switch: `url` after a good poll, `fail_url` after a failed one.
        The URLs hold the check's key, so only the outcome is logged."""
        beat = self.config.heartbeat
        url = None if beat is None else beat.url if poll_ok else beat.fail_url
        if beat is None or url is None:
            return
        import httpx

        ping = "success" if poll_ok else "fail"
        try:
            response = httpx.get(url, timeout=beat.timeout.total_seconds())
        except httpx.HTTPError as exc:
            log.warning("heartbeat.failed", ping=ping, error=type(exc).__name__)
            return
        if response.is_error:
            log.warning("heartbeat.refused", ping=ping, status=response.status_code)
