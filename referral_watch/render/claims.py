"""PURE: the wording of claims (SPEC 17): the team's "Fabrikam taken by Ann de Vries" and
"Ann's claim on Fabrikam lapsed" notices, and the owner line of a claimed lead's alerts."""

from __future__ import annotations

from datetime import datetime, timedelta

from referral_watch.model import CLAIMED, LAPSED, Claim, Lead, Message
from referral_watch.render.channels import Style
from referral_watch.render.i18n import N_
from referral_watch.render.words import Words, clip_title
from referral_watch.text import Part, clip, fit

NOTE_MAX = 280
NAME_MAX = 80

__all__ = ["owner_line", "render_claim_notice"]


def _name(w: Words, claim: Claim) -> str:
    return w.esc(clip(claim.name or claim.email, NAME_MAX))


def owner_line(w: Words, lead: Lead) -> str | None:
    """'Taken by Ann de Vries since …; reminders go to them until …' for a lead claimed now
    (every tier alert names the owner); None when nobody holds it."""
    claim = lead.claimed(w.now)
    if claim is None:
        return None
    return w._("Taken by {name} since {since} (until {lapses} unless answered).").format(
        name=f"**{_name(w, claim)}**", since=w.when(claim.at), lapses=w.when(claim.lapses_at)
    )


def render_claim_notice(lead: Lead, kind: str, now: datetime, style: Style) -> Message:
    """The team's notice that a lead was taken (CLAIMED) or that the claim lapsed (LAPSED)."""
    if kind not in (CLAIMED, LAPSED):
        raise ValueError(f"not a claim notice: {kind!r}")
    w = Words(style, now)
    claim = lead.claim
    customer = lead.referral.customer
    who = claim.name or claim.email if claim is not None else w._("someone")
    if kind == CLAIMED:
        title = w._("{customer} taken by {name}").format(
            customer=w.title_text(customer), name=w.title_text(who)
        )
        lines = [
            w._("{name} took {customer}; reminders go to them until it is answered.").format(
                name=f"**{w.esc(clip(who, NAME_MAX))}**",
                customer=f"**{w.esc(clip(customer, 150))}**",
            )
        ]
    else:
        first = claim.first_name if claim is not None else who
        title = w._("{first_name}'s claim on {customer} lapsed").format(
            first_name=w.title_text(first), customer=w.title_text(customer)
        )
        lines = [
            w._(
                "{name} took {customer} but it was not answered in time; reminders go to "
                "the team again."
            ).format(
                name=f"**{w.esc(clip(who, NAME_MAX))}**",
                customer=f"**{w.esc(clip(customer, 150))}**",
            )
        ]
    remaining = max(lead.remaining(now), timedelta(0))
    lines.append(w.field(N_("Time left"), w.left(remaining)))
    if claim is not None and claim.note.strip() and kind == CLAIMED:
        lines.append(w.field(N_("Note"), w.esc(clip(" ".join(claim.note.split()), NOTE_MAX))))
    lines.append(w.field(N_("Referral id"), w.esc(lead.referral.id)))
    lines.append(w.open_link(w.link(lead.referral.id)))
    short = clip_title(title)
    parts = [Part(line + "\n") for line in lines[:-1]] + [Part(lines[-1])]
    body = fit(short, parts, style.max_length)
    return Message(short, body, notify_type="info" if kind == CLAIMED else "warning")
