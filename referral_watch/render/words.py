"""PURE: the per-message vocabulary: translations, zone, number and date formats, links and
the words every message kind shares (alerts, digests, claim notices)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from urllib.parse import quote

from referral_watch.model import TIER, Lead, Referral
from referral_watch.render.channels import DEFAULT_LINK, Style
from referral_watch.render.i18n import (
    N_,
    money_text,
    relative_text,
    time_left_text,
    translations,
    when_text,
)
from referral_watch.text import clip, escaper, md, visible

TITLE_MAX = 119
LIST_MAX = 10  # team members / products shown before "+N more"


def clip_title(text: str) -> str:
    return clip(text, TITLE_MAX)


def lead_link(style: Style, referral_id: str) -> str:
    """The link to one lead: the channel's link template with {id} filled in."""
    # errors="replace": an id holding a lone surrogate still gives a link, never a crash
    return style.link_template.replace("{id}", quote(referral_id, safe="", errors="replace"))


# --- the per-message vocabulary --------------------------------------------------------------

_RESOLUTION_WORDS = {
    "accepted": N_("accepted"),
    "declined": N_("declined"),
    "won": N_("won"),
    "lost": N_("lost"),
    "expired": N_("expired"),
    "gone": N_("no longer in Partner Center"),
}


class Words:
    """Translations, zone and formats for one message."""

    def __init__(self, style: Style, now: datetime) -> None:
        self.style = style
        self.now = now
        translations_ = translations(style.locale)
        self._: Callable[[str], str] = translations_.gettext
        self.esc = escaper(style.markup)  # Partner Center text -> this channel's markup
        self.ngettext: Callable[[str, str, int], str] = translations_.ngettext

    def title_text(self, text: str) -> str:
        """Outside text for a title: plain in email subjects, webhook titles and Slack (Apprise
        escapes Slack's), Markdown-escaped for Teams, whose card renders its title."""
        flat = visible(" ".join(text.split()))
        return md(flat) if self.style.markup == "teams" else flat

    def when(self, moment: datetime | None) -> str:
        return when_text(moment, self.style.timezone, self.style.locale) if moment else ""

    def money(self, amount: Decimal | None, currency: str) -> str:
        return money_text(amount, currency, self.style.locale)

    def left(self, remaining: timedelta) -> str:
        return time_left_text(remaining, self.style.locale)

    def relative(self, delta: timedelta) -> str:
        """Babel's 'in 3 hours' / '2 uur geleden' (delta < 0 is in the past)."""
        return relative_text(delta, self.style.locale)

    def link(self, referral_id: str) -> str:
        return lead_link(self.style, referral_id)

    def list_link(self) -> str:
        """A link for many leads: the template when it names no single lead."""
        template = self.style.link_template
        return DEFAULT_LINK if "{id}" in template else template

    def kind(self, referral: Referral) -> str:
        return self._("Co-sell opportunity") if referral.kind == "co-sell" else self._("Lead")

    def field(self, label: str, value: str) -> str:
        return f"- **{self._(label)}:** {value}"

    def open_link(self, url: str) -> str:
        text = self._("Open in Partner Center")
        return f"[{text}]({url})"

    def answer_url(self, referral_id: str, action: str) -> str:
        """The console's answer page for one lead (SPEC 14): a plain link, no secret in it."""
        lead = quote(referral_id, safe="", errors="replace")
        return f"{self.style.answer_base}/leads/{lead}/answer?action={action}"

    def claim_url(self, referral_id: str) -> str:
        """The console's claim page for one lead (SPEC 17): a plain link, no secret in it."""
        lead = quote(referral_id, safe="", errors="replace")
        return f"{self.style.claim_base}/leads/{lead}/claim"

    def take_label(self, lead: Lead, *, inline: bool = False) -> str | None:
        """'Take it', 'Take over' when someone holds the lead, None when there is no link:
        claims off, or the owner's own channel (the owner holds it already). ``inline``: the
        lower-case words of a digest line."""
        if not self.style.claim_base:
            return None
        if lead.claimed(self.now) is None:
            return self._("take it") if inline else self._("Take it")
        if self.style.owner_channel:
            return None
        return self._("take over") if inline else self._("Take over")

    def actions(self, lead: Lead, kind: str) -> list[tuple[str, str]]:
        """What a person can do from this message, as (label, URL): Accept, Decline and Take
        it for a tier alert (when the console offers them), and Open in Partner Center."""
        ref_id = lead.referral.id
        found: list[tuple[str, str]] = []
        if kind == TIER and self.style.answer_base:
            found.append((self._("Accept"), self.answer_url(ref_id, "accept")))
            found.append((self._("Decline"), self.answer_url(ref_id, "decline")))
        take = self.take_label(lead) if kind == TIER else None
        if take:
            found.append((take, self.claim_url(ref_id)))
        found.append((self._("Open in Partner Center"), self.link(ref_id)))
        return found

    def links(self, lead: Lead, kind: str) -> str:
        """'Open in Partner Center', and for a tier alert Accept / Decline / Take it (when the
        console offers them), as Markdown links on one line."""
        *doing, (open_text, open_url) = self.actions(lead, kind)
        return " · ".join(f"[{text}]({url})" for text, url in [(open_text, open_url), *doing])

    def capped(self, items: Sequence[str], limit: int = LIST_MAX) -> str:
        shown = [self.esc(clip(item, 80)) for item in items[:limit]]
        if len(items) > limit:
            shown.append(self._("+{count} more").format(count=len(items) - limit))
        return ", ".join(shown)

    def resolution(self, resolution: str | None) -> str:
        word = _RESOLUTION_WORDS.get(resolution or "")
        return self._(word) if word else self.esc(resolution or "")
