"""PURE: the wording of notices that are about no single lead: the channel test, operations'
news (a failing poll, records set aside, a message dropped) and the report's headings."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from referral_watch.model import Message
from referral_watch.render.channels import Style
from referral_watch.render.i18n import time_left_text, translations
from referral_watch.render.words import Words, clip_title
from referral_watch.text import Part, fit, md


def _plain(title: str, paragraphs: Sequence[str], style: Style) -> Message:
    """Short notices: one paragraph per line (a single newline is not a break everywhere)."""
    title = clip_title(title)
    parts = [Part(p + "\n") for p in paragraphs[:-1]] + [Part(p) for p in paragraphs[-1:]]
    return Message(title, fit(title, parts, style.max_length))


def render_test(channel: str, now: datetime, style: Style) -> Message:
    """A clearly marked test message for ``test-notify``."""
    w = Words(style, now)
    return _plain(
        w._("TEST: referral-watch can reach this channel"),
        [
            w._("This is a test message from referral-watch for {channel}, sent {when}.").format(
                channel=f"**{w.esc(channel)}**", when=w.when(now)
            ),
            w._(
                "Reminders about Partner Center leads that need an answer will arrive here. "
                "There is nothing to do."
            ),
        ],
        style,
    )


def _failing_lines(w: Words, reason: str, failures: int, since: datetime | None) -> list[str]:
    lines = [
        w.ngettext(
            "Polling Partner Center has failed {count} time in a row.",
            "Polling Partner Center has failed {count} times in a row.",
            failures,
        ).format(count=failures)
    ]
    if since is not None:
        lines.append(
            w._("Failing since {when} ({ago}).").format(
                when=w.when(since), ago=w.relative(since - w.now)
            )
        )
    if reason:
        lines.append(w._("Reason: {reason}").format(reason=w.esc(reason)))
    lines += [
        w._(
            "referral-watch retries every cycle; until a poll succeeds it sees no new leads "
            "and no answers."
        ),
    ]
    return lines


def render_ops(
    event: str,
    reason: str,
    now: datetime,
    style: Style,
    *,
    failures: int = 0,
    since: datetime | None = None,
) -> Message:
    """Alerts about referral-watch itself for ``operations.notify``.

    event: "failing", "still_failing", "recovered", or "dropped" (a message that could not be
    delivered for a day; ``reason`` names the channel and lead).
    """
    w = Words(style, now)
    if event in ("failing", "still_failing"):
        title = (
            w._("referral-watch: polling Partner Center is failing")
            if event == "failing"
            else w._("referral-watch: polling Partner Center is still failing")
        )
        return _plain(title, _failing_lines(w, reason, failures, since), style)
    if event == "recovered":
        lines = [w._("Polling Partner Center works again since {when}.").format(when=w.when(now))]
        if failures:
            lines.append(
                w.ngettext(
                    "It had failed {count} time in a row.",
                    "It had failed {count} times in a row.",
                    failures,
                ).format(count=failures)
            )
        return _plain(w._("referral-watch: polling Partner Center works again"), lines, style)
    if event == "dropped":
        lines = [w._("A message could not be delivered for a day and was dropped.")]
        if reason:
            lines.append(w._("Details: {reason}").format(reason=w.esc(reason)))
        return _plain(w._("referral-watch: a message was dropped"), lines, style)
    if event == "quarantined":  # failures = how many records; reason = one line each
        lines = [
            w.ngettext(
                "{count} record was set aside: it failed on its way, and the other leads go on.",
                "{count} records were set aside: they failed on their way, and the other leads "
                "go on.",
                failures,
            ).format(count=failures)
        ]
        lines += [f"- {md(line)}" for line in reason.splitlines() if line]
        lines.append(w._("`referral-watch status` lists them until they are fixed."))
        return _plain(w._("referral-watch: records set aside"), lines, style)
    raise ValueError(f"unknown operations event {event!r}")


def report_headings(locale: str, period: timedelta) -> dict[str, str]:
    """Localized headings for the ``report`` summary (keys are stable, English)."""
    _ = translations(locale).gettext
    return {
        "title": _("Partner Center referrals: the last {period}").format(
            period=time_left_text(period, locale)
        ),
        "open": _("Open leads, most urgent first"),
        "answered": _("Answered in this period"),
        "expired": _("Expired unanswered in this period"),
        "median": _("Median time to answer"),
        "assignees": _("Leads per assignee"),
        "none": _("None"),
        "waiting": _("{count} waiting for an answer"),
        "buckets": _("{day} expire within a day, {three} within three days, {later} later."),
        "open_value": _("Deal value waiting: {values}"),
        "expired_value": _("Deal value lost: {values}"),
        "p90": _("90th percentile"),
        "left": _("{time_left} left"),
        "due": _("deadline {when}"),
        "more": _("+{count} more"),
        "period": _("From {start} to {end}."),
        "unassigned": _("unassigned"),
        "no_currency": _("(no currency)"),
        "accepted": _("accepted"),
        "declined": _("declined"),
        "won": _("won"),
        "lost": _("lost"),
        "claims": _("Claims: time to claim and to answer (median / 90th percentile)"),
        "team": _("the whole team"),
        "claim_line": _("{who}: {claimed} claimed ({to_claim}), {answered} answered ({to_answer})"),
    }
