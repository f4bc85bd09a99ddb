"""PURE: the delivery plan. From the outbox's due rows: which messages go out (batched and held
as the policy says), each message's text, and what is left of a digest when a lead in it cannot
be worded. No clock (``now`` is an argument), no state: the leads are given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from referral_watch import policy
from referral_watch.config import Config
from referral_watch.errors import ReferralWatchError
from referral_watch.model import Batch, Lead, Message, PendingRow


def batches(
    rows: Sequence[PendingRow],
    leads: Mapping[str, Lead],
    config: Config,
    now: datetime,
    *,
    news_only: bool = False,
    deadlines: Mapping[str, datetime] | None = None,
) -> tuple[list[Batch], int]:
    """(the messages to send, how many rows are held back): the policy batches and holds lead
    alerts; news for operations (``news_only``: a report, an ops alert) is never held nor
    batched, and independent of lead logic. ``leads`` and ``deadlines``: as
    policy.delivery_batches takes them."""
    if news_only:
        return [Batch(r.channel, r.kind, r.tier, (r.id,), ()) for r in rows], 0
    found = policy.delivery_batches(rows, leads, config, now, deadlines)
    return found, len(rows) - sum(len(b.row_ids) for b in found)


def message_for(
    batch: Batch,
    known: Sequence[Lead],
    text: tuple[str, str],
    config: Config,
    now: datetime,
) -> Message:
    """The message of one batch: ``known``, its leads still in the state (in the batch's
    order); ``text``, the fixed title and body of a message about no lead (ops, test, report).
    ReferralWatchError when none of its leads is left."""
    from referral_watch.render import messages as render  # Jinja2 and Babel: only when needed

    style = render.style_for(config, batch.channel)
    if not batch.lead_ids:
        return Message(*text, kind=batch.kind)
    tier = config.policy.tier(batch.tier) if batch.tier else None
    if not known:
        raise ReferralWatchError("the lead is no longer in the state file")
    if batch.digest:
        message = render.render_digest(known, batch.kind, tier, batch.more, now, style)
    else:
        message = render.render_alert(known[0], batch.kind, tier, now, style)
        known = known[:1]
    # What it is about, for structured channels (incident tools): each lead with its link.
    about = tuple((lead, render.lead_link(style, lead.id)) for lead in known)
    return replace(message, kind=batch.kind, tier=batch.tier, about=about)


def alone(batch: Batch, lead_id: str) -> Batch:
    """One lead of a digest as a message of its own (to find the lead that cannot be worded)."""
    return replace(batch, lead_ids=(lead_id,), digest=False, more=0)


@dataclass(frozen=True)
class Salvage:
    """What to set aside of a message that cannot be made, and what still goes out."""

    lead_ids: list[str]  # the leads set aside
    row_ids: list[int]  # their outbox rows (all of the message's, when it is not a digest)
    rest: Batch | None  # the digest without them, or None: nothing left to send


def salvage(batch: Batch, rows: Mapping[int, PendingRow], unworded: Sequence[str]) -> Salvage:
    """A message failed to render: a digest goes out without the leads that cannot be worded
    alone (``unworded``); anything else (or a digest where each lead renders alone) is set
    aside whole."""
    bad = list(unworded)
    if not batch.digest or not bad:
        bad = list(batch.lead_ids)
    bad_rows = [i for i in batch.row_ids if rows[i].lead_id in bad] if batch.digest else []
    rest = [i for i in batch.row_ids if i not in bad_rows]
    if not bad_rows or not rest:
        return Salvage(bad, bad_rows or list(batch.row_ids), None)
    lead_ids = tuple(i for i in batch.lead_ids if i not in bad)
    return Salvage(bad, bad_rows, replace(batch, row_ids=tuple(rest), lead_ids=lead_ids))
