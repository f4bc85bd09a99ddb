"""PURE: the per-message vocabulary: translations, zone, number and date formats, links and
the words every message kind shares (alerts, digests, claim notices)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from urllib.parse import quote

from referral_watch.model import TIER, Referral
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

    def links(self, referral_id: str, kind: str) -> str:
        """'Open in Partner Center', and for a tier alert with answering on, Accept / Decline."""
        opened = self.open_link(self.link(referral_id))
        if kind != TIER or not self.style.answer_base:
            return opened
        accept, decline = self._("Accept"), self._("Decline")
        accept_url = self.answer_url(referral_id, "accept")
        decline_url = self.answer_url(referral_id, "decline")
        return f"{opened} · [{accept}]({accept_url}) · [{decline}]({decline_url})"

    def capped(self, items: Sequence[str], limit: int = LIST_MAX) -> str:
        shown = [self.esc(clip(item, 80)) for item in items[:limit]]
        if len(items) > limit:
            shown.append(self._("+{count} more").format(count=len(items) - limit))
        return ", ".join(shown)

    def resolution(self, resolution: str | None) -> str:
        word = _RESOLUTION_WORDS.get(resolution or "")
        return self._(word) if word else self.esc(resolution or "")
