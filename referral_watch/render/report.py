"""PURE: the manager summary (issue 10) and its formats.

``summarize(leads, now, since)`` reads only what the state file knows about each lead (when it was
created, its deadline, when and how it was resolved) and never the clock. The formatters turn a
Summary into text or Markdown for people, JSON and CSV for spreadsheets and BI tools, and a
channel Message (full form for email, short form for Teams).

Definitions (they are the contract the docs and the tests describe):

- *open*: still waiting for an answer (no resolution) and its deadline not yet passed;
  bucketed by time left: within a day, within three days, later.
- *answered in the period*: resolution accepted/declined/won/lost with ``resolved_at`` in the
  period; time to answer = the answered record's ``updatedDateTime`` when it is later than the
  last waiting record (else ``resolved_at``, when a poll noticed) - ``created``.
- *expired in the period*: the deadline passed unanswered inside the period. That is a lead still
  unresolved past its deadline, a lead Partner Center reported as Expired (at the earlier of its
  deadline and when we learned it), or a lead that vanished (``gone``) after its deadline.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from referral_watch.model import ANSWERS, AuditEntry, Lead, Message
from referral_watch.render.channels import Style
from referral_watch.render.claim_report import (
    ClaimStats,
    claim_stats,
    claims_facts,
    claims_json,
    claims_rows,
    percentile,
)
from referral_watch.render.i18n import money_text, time_left_text, when_text
from referral_watch.render.notices import report_headings
from referral_watch.text import Part, clip, columns, csv_cell, escaper, fit, iso_utc, terminal

__all__ = [
    "CSV_COLUMNS",
    "FORMATS",
    "LeadLine",
    "Summary",
    "expired_at",
    "format_csv",
    "format_json",
    "format_markdown",
    "format_text",
    "percentile",
    "render_report",
    "report_message",
    "summarize",
]

FORMATS = ("text", "markdown", "json", "csv")
CSV_COLUMNS = ("period_start", "period_end", "metric", "key", "value")
JSON_VERSION = 1

DAY = timedelta(days=1)
THREE_DAYS = timedelta(days=3)
TOP = 5  # most urgent open leads listed
COMPACT_TOP = 3  # ... in the short (Teams) form
LIST_MAX = 10  # expired leads / assignees listed in the full form before "+N more"
UNASSIGNED = "unassigned"
ANSWER_ORDER = ("accepted", "declined", "won", "lost")
CLI_LOCALE = "en-US"  # the command line stays English

# Wording render's catalogs do not have yet (English only for now; to move into the catalogs).


# --- the summary -------------------------------------------------------------------------


@dataclass(frozen=True)
class LeadLine:
    """One lead as a report lists it."""

    id: str
    customer: str
    deal_value: Decimal | None
    currency: str
    deadline: datetime

    @classmethod
    def of(cls, lead: Lead) -> LeadLine:
        ref = lead.referral
        return cls(ref.id, ref.customer, ref.deal_value, ref.currency, lead.deadline)


@dataclass(frozen=True)
class Summary:
    now: datetime
    start: datetime  # the period is [start, now]
    open_total: int
    within_day: int
    within_three_days: int
    later: int
    most_urgent: tuple[LeadLine, ...]  # the TOP open leads, soonest deadline first
    open_value: tuple[tuple[str, Decimal], ...]  # (currency, total), by currency
    answered: tuple[tuple[str, int], ...]  # (resolution, count) in ANSWER_ORDER, zeros left out
    median_answer: timedelta | None
    p90_answer: timedelta | None
    expired: tuple[LeadLine, ...]  # expired in the period, most recent first
    expired_value: tuple[tuple[str, Decimal], ...]
    per_assignee: tuple[tuple[str, int], ...]  # open leads, most first
    claims: ClaimStats | None = None  # time to claim and to answer (SPEC 17); None: no claims

    @property
    def period(self) -> timedelta:
        return self.now - self.start

    @property
    def answered_total(self) -> int:
        return sum(count for _, count in self.answered)


def expired_at(lead: Lead, now: datetime) -> datetime | None:
    """When the lead's deadline passed unanswered, or None (answered, or not expired yet)."""
    if lead.resolution in ANSWERS:
        return None
    if lead.resolution == "expired":
        # Partner Center archived it: at its deadline, or earlier if it said so before ours.
        return min(lead.deadline, lead.resolved_at or lead.deadline)
    # Still watched (up to now), or gone / closed otherwise (up to when we learned it).
    end = lead.resolved_at if lead.resolution is not None and lead.resolved_at else now
    return lead.deadline if lead.deadline < end else None


def summarize(
    leads: Iterable[Lead],
    now: datetime,
    since: timedelta,
    claim_events: Sequence[AuditEntry] = (),
) -> Summary:
    """The summary over the period [now - since, now]. Pass every lead, resolved ones too, and
    the audit's claim events (``Store.claim_events``) for the claims part."""
    start = now - since
    all_leads = list(leads)
    waiting = _waiting(all_leads, now)
    answered = _answered_in(all_leads, start, now)
    times = [_answer_time(x) for x in answered]
    expired = _expired_in(all_leads, start, now)
    kinds = Counter(x.resolution for x in answered)
    within_day, within_three_days, later = _by_time_left(waiting, now)
    return Summary(
        now=now,
        start=start,
        open_total=len(waiting),
        within_day=within_day,
        within_three_days=within_three_days,
        later=later,
        most_urgent=tuple(LeadLine.of(x) for x in waiting[:TOP]),
        open_value=_totals(waiting),
        answered=tuple((k, kinds[k]) for k in ANSWER_ORDER if kinds[k]),
        median_answer=percentile(times, 0.5),
        p90_answer=percentile(times, 0.9),
        expired=tuple(LeadLine.of(x) for x in expired),
        expired_value=_totals(expired),
        per_assignee=_per_assignee(waiting),
        claims=_claims(all_leads, claim_events, start, now, answered),
    )


def _claims(
    leads: Sequence[Lead],
    events: Sequence[AuditEntry],
    start: datetime,
    now: datetime,
    answered: Sequence[Lead],
) -> ClaimStats | None:
    """The claims part: None when nobody has claimed anything."""
    if not events:
        return None
    return claim_stats(leads, events, start, now, {x.id: _answered_moment(x) for x in answered})


def _waiting(leads: Sequence[Lead], now: datetime) -> list[Lead]:
    """Open: still waiting for an answer and its deadline not passed; soonest first."""
    found = (x for x in leads if x.resolution is None and x.deadline >= now)
    return sorted(found, key=lambda x: (x.deadline, x.id))


def _answered_in(leads: Sequence[Lead], start: datetime, now: datetime) -> list[Lead]:
    return [
        x
        for x in leads
        if x.resolution in ANSWERS and x.resolved_at is not None and start <= x.resolved_at <= now
    ]


def _expired_in(leads: Sequence[Lead], start: datetime, now: datetime) -> list[Lead]:
    """Expired in the period, most recent first."""
    return sorted(
        (x for x in leads if _between(expired_at(x, now), start, now)),
        key=lambda x: (expired_at(x, now), x.id),
        reverse=True,
    )


def _by_time_left(waiting: Sequence[Lead], now: datetime) -> tuple[int, int, int]:
    """(within a day, within three days, later) of the open leads."""
    left = [x.deadline - now for x in waiting]
    return (
        sum(1 for r in left if r <= DAY),
        sum(1 for r in left if DAY < r <= THREE_DAYS),
        sum(1 for r in left if r > THREE_DAYS),
    )


def _answer_time(lead: Lead) -> timedelta:
    return max(timedelta(0), _answered_moment(lead) - lead.referral.created)


def _answered_moment(lead: Lead) -> datetime:
    created = lead.referral.created
    answered = lead.resolved_at or created
    # The by-id fetch that found the answer stored that record: its updatedDateTime is when the
    # team answered, not when the next poll noticed. Trusted only after the lead was last
    # stored as waiting (an older text's updatedDateTime says nothing about the answer).
    updated = lead.referral.updated
    if updated is not None and lead.last_seen < updated <= answered:
        answered = updated
    return answered


def _between(moment: datetime | None, start: datetime, end: datetime) -> bool:
    return moment is not None and start <= moment <= end


def _totals(leads: Iterable[Lead]) -> tuple[tuple[str, Decimal], ...]:
    totals: dict[str, Decimal] = {}
    for lead in leads:
        ref = lead.referral
        if ref.deal_value is not None:
            totals[ref.currency] = totals.get(ref.currency, Decimal(0)) + ref.deal_value
    return tuple(sorted(totals.items()))


def _per_assignee(leads: Iterable[Lead]) -> tuple[tuple[str, int], ...]:
    counts: Counter[str] = Counter()
    for lead in leads:
        # A lead assigned to two people is open for each of them.
        emails = {e.strip().lower() for e in lead.referral.team_emails if e.strip()}
        counts.update(emails or {UNASSIGNED})
    return tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# --- channel messages (localized headings) --------------------------------------------------


class _Wording:
    """Headings from render's catalogs, numbers and dates in the channel's locale and zone."""

    def __init__(self, summary: Summary, style: Style) -> None:
        self.style = style
        self.heads = report_headings(style.locale, summary.period)
        self.esc = escaper(style.markup)  # names from Partner Center -> the channel's markup
        self.now = summary.now

    def money(self, amount: Decimal | None, currency: str) -> str:
        return money_text(amount, currency, self.style.locale)

    def values(self, totals: Sequence[tuple[str, Decimal]]) -> str:
        return " · ".join(
            self.money(total, cur or self.heads["no_currency"]) for cur, total in totals
        )

    def span(self, value: timedelta | None) -> str:
        return time_left_text(value, self.style.locale) if value is not None else "-"

    def when(self, moment: datetime) -> str:
        return when_text(moment, self.style.timezone, self.style.locale)

    def who(self, assignee: str) -> str:
        return self.heads["unassigned"] if assignee == UNASSIGNED else self.esc(assignee)


def _open_part(w: _Wording, s: Summary) -> str:
    count = w.heads["waiting"].format(count=s.open_total)
    buckets = w.heads["buckets"].format(day=s.within_day, three=s.within_three_days, later=s.later)
    return f"**{count}:** {buckets}"


def _urgent_lines(w: _Wording, s: Summary, limit: int, compact: bool) -> list[str]:
    lines = []
    for line in s.most_urgent[:limit]:
        width = 40 if compact else 80
        pieces = [f"**{w.esc(clip(line.customer, width))}**"]
        value = w.money(line.deal_value, line.currency)
        if value and not compact:
            pieces.append(value)
        pieces.append(w.heads["left"].format(time_left=w.span(line.deadline - s.now)))
        lines.append("- " + " · ".join(pieces))
    return lines or [w.heads["none"]]


def _answered_part(w: _Wording, s: Summary) -> str:
    kinds = ", ".join(f"{count} {w.heads[kind]}" for kind, count in s.answered)
    return f"{s.answered_total} ({kinds})" if kinds else "0"


def _expired_lines(w: _Wording, s: Summary) -> list[str]:
    lines = []
    for line in s.expired[:LIST_MAX]:
        pieces = [f"**{w.esc(clip(line.customer, 80))}**"]
        value = w.money(line.deal_value, line.currency)
        if value:
            pieces.append(value)
        pieces.append(w.heads["due"].format(when=w.when(line.deadline)))
        lines.append("- " + " · ".join(pieces))
    if len(s.expired) > LIST_MAX:
        lines.append("- " + w.heads["more"].format(count=len(s.expired) - LIST_MAX))
    return lines


def _assignee_lines(w: _Wording, s: Summary, limit: int) -> list[str]:
    lines = [f"- {w.who(name)}: {count}" for name, count in s.per_assignee[:limit]]
    if len(s.per_assignee) > limit:
        lines.append("- " + w.heads["more"].format(count=len(s.per_assignee) - limit))
    return lines or [w.heads["none"]]


def _full_body(w: _Wording, s: Summary) -> str:
    h = w.heads
    parts = [
        w.heads["period"].format(start=w.when(s.start), end=w.when(s.now)),
        _open_part(w, s),
    ]
    if s.open_value:
        parts.append(w.heads["open_value"].format(values=w.values(s.open_value)))
    parts.append(f"**{h['open']}**\n\n" + "\n".join(_urgent_lines(w, s, TOP, False)))
    answered = f"**{h['answered']}:** {_answered_part(w, s)}"
    if s.median_answer is not None:
        answered += (
            f"\n\n- {h['median']}: {w.span(s.median_answer)}"
            f"\n- {w.heads['p90']}: {w.span(s.p90_answer)}"
        )
    parts.append(answered)
    expired = f"**{h['expired']}:** {len(s.expired)}"
    if s.expired:
        expired += "\n\n" + "\n".join(_expired_lines(w, s))
    parts.append(expired)
    if s.expired_value:
        parts.append(w.heads["expired_value"].format(values=w.values(s.expired_value)))
    parts.append(f"**{h['assignees']}**\n\n" + "\n".join(_assignee_lines(w, s, LIST_MAX)))
    if s.claims is not None:
        parts.append(_claims_part(w, s.claims))
    return "\n\n".join(parts)


def _claims_part(w: _Wording, stats: ClaimStats) -> str:
    """Claims: time to claim and to answer (median / 90th percentile), the team then people."""
    rows = claims_rows(stats, w.span)[1:]
    rows[0] = (w.heads["team"], *rows[0][1:])
    lines = [
        "- "
        + w.heads["claim_line"].format(
            who=w.esc(who),
            claimed=claimed,
            to_claim=to_claim,
            answered=answered,
            to_answer=to_answer,
        )
        for who, claimed, to_claim, answered, to_answer in rows
    ]
    return f"**{w.heads['claims']}**\n\n" + "\n".join(lines)


def _compact_parts(w: _Wording, s: Summary) -> list[Part]:
    """The paragraphs; optional ones are dropped when the channel is short."""
    h = w.heads
    answered = f"**{h['answered']}:** {_answered_part(w, s)}"
    if s.median_answer is not None:
        answered += f" · {h['median']}: {w.span(s.median_answer)}"
    assignees = ", ".join(f"{w.who(n)} {c}" for n, c in s.per_assignee[:COMPACT_TOP])
    if len(s.per_assignee) > COMPACT_TOP:
        assignees += ", " + w.heads["more"].format(count=len(s.per_assignee) - COMPACT_TOP)
    return [
        Part(_open_part(w, s)),
        Part(f"**{h['expired']}:** {len(s.expired)}"),
        Part(answered),
        Part(f"**{h['open']}**\n\n" + "\n".join(_urgent_lines(w, s, COMPACT_TOP, True)), False),
        Part(f"**{h['assignees']}:** {assignees or h['none']}", False),
    ]


def report_message(summary: Summary, style: Style, compact: bool | None = None) -> Message:
    """The summary as a channel message: full form (email), or short form (Teams: compact)."""
    w = _Wording(summary, style)
    title = w.heads["title"]
    short = style.compact if compact is None else compact
    if not short:
        body = _full_body(w, summary)
        if style.max_length is None or len(title) + len(body) <= style.max_length:
            return Message(title, body)
        # Too long for the channel (Slack): the short form, rather than a report cut mid-list.
    return Message(title, fit(title, _compact_parts(w, summary), style.max_length, "\n\n"))


# --- command-line formats (English) ----------------------------------------------------------


def format_markdown(summary: Summary, timezone: str = "UTC") -> str:
    message = report_message(summary, Style(locale=CLI_LOCALE, timezone=timezone), compact=False)
    return f"# {message.title}\n\n{message.body}\n"


def _cli_money(totals: Sequence[tuple[str, Decimal]]) -> str:
    no_currency = report_headings(CLI_LOCALE, timedelta(0))["no_currency"]
    return "; ".join(money_text(t, c or no_currency, CLI_LOCALE) for c, t in totals)


def _cli_time(moment: datetime, timezone: str) -> str:
    return when_text(moment, timezone, CLI_LOCALE)


def _rows(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    return columns(rows, indent) or [f"{indent}(none)"]


def format_text(summary: Summary, timezone: str = "UTC") -> str:
    """A plain-text summary for a terminal."""
    s = summary
    w = _Wording(s, Style(locale=CLI_LOCALE, timezone=timezone))
    span = time_left_text(s.period, CLI_LOCALE)
    lines = [
        f"Partner Center referrals: the last {span}",
        f"{_cli_time(s.start, timezone)} to {_cli_time(s.now, timezone)}",
        "",
        f"Open leads: {s.open_total}",
        *_rows(
            [
                ("expire within a day", str(s.within_day)),
                ("expire within three days", str(s.within_three_days)),
                ("later", str(s.later)),
                ("deal value", _cli_money(s.open_value) or "-"),
            ]
        ),
        "",
        "Most urgent:",
        *_rows(
            [
                (
                    clip(x.customer, 40),
                    money_text(x.deal_value, x.currency, CLI_LOCALE) or "-",
                    time_left_text(x.deadline - s.now, CLI_LOCALE),
                )
                for x in s.most_urgent
            ]
        ),
        "",
        f"Answered in this period: {_answered_part(w, s)}",
        *_rows(
            [
                ("median time to answer", _cli_span(s.median_answer)),
                ("90th percentile", _cli_span(s.p90_answer)),
            ]
        ),
        "",
        f"Expired unanswered in this period: {len(s.expired)}",
        *_rows(
            [
                (
                    clip(x.customer, 40),
                    money_text(x.deal_value, x.currency, CLI_LOCALE) or "-",
                    f"deadline {_cli_time(x.deadline, timezone)}",
                )
                for x in s.expired
            ]
        ),
    ]
    if s.expired_value:
        lines += _rows([("deal value lost", _cli_money(s.expired_value))])
    lines += ["", "Open leads per assignee:", *_rows([(n, str(c)) for n, c in s.per_assignee])]
    if s.claims is not None:
        lines += [
            "",
            "Claims: time to claim and to answer",
            *_rows(claims_rows(s.claims, _cli_span)),
        ]
    return terminal("\n".join(lines)) + "\n"


def _cli_span(value: timedelta | None) -> str:
    return time_left_text(value, CLI_LOCALE) if value is not None else "-"


def _seconds(value: timedelta | None) -> int | None:
    return None if value is None else round(value.total_seconds())


def _number(amount: Decimal | None) -> int | float | None:
    if amount is None:
        return None
    return int(amount) if amount == amount.to_integral_value() else float(amount)


def _lead_json(line: LeadLine, now: datetime) -> dict[str, Any]:
    return {
        "id": line.id,
        "customer": line.customer,
        "deal_value": _number(line.deal_value),
        "currency": line.currency or None,
        "deadline": iso_utc(line.deadline),
        "remaining_seconds": _seconds(line.deadline - now),
    }


def as_json(summary: Summary) -> dict[str, Any]:
    """The stable JSON document (``version`` changes only when keys change meaning)."""
    s = summary
    return {
        "version": JSON_VERSION,
        "period_start": iso_utc(s.start),
        "period_end": iso_utc(s.now),
        "period_seconds": _seconds(s.period),
        "open": {
            "total": s.open_total,
            "within_1d": s.within_day,
            "within_3d": s.within_three_days,
            "later": s.later,
            "deal_value_by_currency": {c: _number(t) for c, t in s.open_value},
            "most_urgent": [_lead_json(x, s.now) for x in s.most_urgent],
        },
        "answered": {
            "total": s.answered_total,
            "by_resolution": {k: dict(s.answered).get(k, 0) for k in ANSWER_ORDER},
            "median_seconds": _seconds(s.median_answer),
            "p90_seconds": _seconds(s.p90_answer),
        },
        "expired": {
            "total": len(s.expired),
            "deal_value_by_currency": {c: _number(t) for c, t in s.expired_value},
            "leads": [_lead_json(x, s.now) for x in s.expired],
        },
        "open_per_assignee": [{"assignee": n, "open": c} for n, c in s.per_assignee],
        **({"claims": claims_json(s.claims)} if s.claims is not None else {}),
    }


def format_json(summary: Summary) -> str:
    return json.dumps(as_json(summary), indent=2) + "\n"


def _csv_facts(s: Summary) -> list[tuple[str, str, Any]]:
    """(metric, key, value): one fact per row, so new currencies or people add rows, not columns."""
    facts: list[tuple[str, str, Any]] = [
        ("open_total", "", s.open_total),
        ("open_within_1d", "", s.within_day),
        ("open_within_3d", "", s.within_three_days),
        ("open_later", "", s.later),
    ]
    facts += [("open_deal_value", c, _number(t)) for c, t in s.open_value]
    facts.append(("answered_total", "", s.answered_total))
    facts += [("answered", k, dict(s.answered).get(k, 0)) for k in ANSWER_ORDER]
    facts += [
        ("answer_median_seconds", "", _seconds(s.median_answer)),
        ("answer_p90_seconds", "", _seconds(s.p90_answer)),
        ("expired_total", "", len(s.expired)),
    ]
    facts += [("expired_deal_value", c, _number(t)) for c, t in s.expired_value]
    facts += [("open_per_assignee", n, c) for n, c in s.per_assignee]
    if s.claims is not None:
        facts += claims_facts(s.claims)
    return facts


def format_csv(summary: Summary) -> str:
    """Long format: period_start, period_end, metric, key, value (empty value = no data)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    start, end = iso_utc(summary.start), iso_utc(summary.now)
    for metric, key, value in _csv_facts(summary):
        cells = (start, end, metric, key, "" if value is None else value)
        writer.writerow([csv_cell(cell) for cell in cells])
    return out.getvalue()


def render_report(summary: Summary, fmt: str, timezone: str = "UTC") -> str:
    """The summary in one of FORMATS, as the `report` command prints it."""
    if fmt == "text":
        return format_text(summary, timezone)
    if fmt == "markdown":
        return format_markdown(summary, timezone)
    if fmt == "json":
        return format_json(summary)
    if fmt == "csv":
        return format_csv(summary)
    raise ValueError(f"unknown report format {fmt!r} (one of {', '.join(FORMATS)})")
