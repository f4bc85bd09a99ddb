"""Issue 10: scheduled manager reports, the `report` command, cron scheduling in the daemon."""

from __future__ import annotations

import csv
import io
import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from referral_watch import cron, schedule
from referral_watch.config import Config, ReportConfig
from referral_watch.config.loader import load_config, parse_config
from referral_watch.daemon import Daemon
from referral_watch.errors import ConfigError
from referral_watch.model import Lead, Referral, TeamMember
from referral_watch.render.messages import TEAMS_MAX, Style
from referral_watch.render.report import (
    CSV_COLUMNS,
    Summary,
    format_csv,
    format_json,
    format_text,
    report_message,
    summarize,
)
from referral_watch.sandbox.records import make_referral
from referral_watch.state.db import ts
from referral_watch.state.store import Store

from conftest import World, faketime_env
from receivers import SmtpReceiver, WebhookReceiver

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)  # a Monday
WEEK = timedelta(days=7)
H = timedelta(hours=1)
D = timedelta(days=1)


def lead(
    lead_id: str,
    *,
    left: timedelta = 10 * D,
    resolution: str | None = None,
    resolved: timedelta | None = None,  # how long before NOW it was resolved
    age: timedelta | None = None,  # how long before NOW it was created (default: deadline - 14d)
    value: str | None = "25000",
    currency: str = "USD",
    team: tuple[str, ...] = (),
    customer: str | None = None,
    updated: timedelta | None = None,  # how long before NOW Partner Center last changed it
    seen: timedelta | None = None,  # how long before NOW it was last stored as waiting
) -> Lead:
    deadline = NOW + left
    created = NOW - age if age is not None else deadline - 14 * D
    referral = Referral(
        id=lead_id,
        name="",
        customer=customer or f"Customer {lead_id}",
        created=created,
        deal_value=Decimal(value) if value is not None else None,
        currency=currency,
        team=tuple(TeamMember(email=e) for e in team),
        updated=NOW - updated if updated is not None else None,
    )
    return Lead(
        referral,
        deadline=deadline,
        first_seen=created,
        last_seen=NOW - seen if seen is not None else NOW,
        resolution=resolution,
        resolved_at=NOW - resolved if resolved is not None else None,
    )


# --- the summary: tables over prepared leads -------------------------------------------------


@pytest.mark.parametrize(
    ("left", "bucket"),
    [
        (timedelta(0), "within_day"),
        (H, "within_day"),
        (D, "within_day"),
        (D + timedelta(minutes=1), "within_three_days"),
        (3 * D, "within_three_days"),
        (3 * D + timedelta(seconds=1), "later"),
        (13 * D, "later"),
        (-timedelta(minutes=1), None),  # past its deadline: expired, not open
    ],
)
def test_open_leads_fall_into_urgency_buckets(left: timedelta, bucket: str | None) -> None:
    summary = summarize([lead("x", left=left)], NOW, WEEK)
    counts = {
        "within_day": summary.within_day,
        "within_three_days": summary.within_three_days,
        "later": summary.later,
    }
    assert counts == {name: int(name == bucket) for name in counts}
    assert summary.open_total == (bucket is not None)


@pytest.mark.parametrize(
    ("hours_to_answer", "median", "p90"),
    [
        ([], None, None),
        ([24], 24 * H, 24 * H),
        ([24, 72], 48 * H, 24 * H + 0.9 * 48 * H),
        ([5, 1, 9, 3, 7], 5 * H, 8.2 * H),
        (list(range(1, 11)), 5.5 * H, 9.1 * H),
    ],
)
def test_median_and_90th_percentile_of_time_to_answer(
    hours_to_answer: list[int], median: timedelta | None, p90: timedelta | None
) -> None:
    leads = [
        lead(f"a{n}", resolution="accepted", resolved=H, age=H + h * H)
        for n, h in enumerate(hours_to_answer)
    ]
    summary = summarize(leads, NOW, WEEK)
    assert summary.median_answer == median
    assert summary.p90_answer == p90
    assert summary.answered_total == len(hours_to_answer)


def test_only_answers_inside_the_period_count_as_answered() -> None:
    leads = [
        lead("in1", resolution="accepted", resolved=2 * D),
        lead("in2", resolution="won", resolved=H),
        lead("in3", resolution="accepted", resolved=6 * D),
        lead("old", resolution="declined", resolved=8 * D),
        lead("gone", resolution="gone", resolved=D),  # vanished: not an answer
        lead("exp", left=-D, resolution="expired", resolved=H),  # not an answer either
        lead("open"),
    ]
    summary = summarize(leads, NOW, WEEK)
    assert summary.answered == (("accepted", 2), ("won", 1))
    assert summary.answered_total == 3


@pytest.mark.parametrize(
    ("case", "item", "counted"),
    [
        ("watched, deadline passed in the period", lead("x", left=-2 * D), True),
        ("watched, deadline passed before the period", lead("x", left=-8 * D), False),
        ("watched, deadline ahead", lead("x", left=H), False),
        (
            "Partner Center said Expired",
            lead("x", left=-D - H, resolution="expired", resolved=D),
            True,
        ),
        (
            "Partner Center said Expired long ago",
            lead("x", left=-10 * D, resolution="expired", resolved=6 * D),
            False,
        ),
        (
            "Expired reported before our deadline",
            lead("x", left=D, resolution="expired", resolved=H),
            True,
        ),
        (
            "gone after its deadline",
            lead("x", left=-3 * D, resolution="gone", resolved=2 * D),
            True,
        ),
        ("gone before its deadline", lead("x", left=5 * D, resolution="gone", resolved=D), False),
        ("answered late", lead("x", left=-3 * D, resolution="accepted", resolved=2 * D), False),
    ],
)
def test_expired_in_the_period(case: str, item: Lead, counted: bool) -> None:
    summary = summarize([item], NOW, WEEK)
    assert len(summary.expired) == int(counted), case


def test_deal_values_are_totalled_per_currency() -> None:
    leads = [
        lead("u1", value="25000", currency="USD"),
        lead("u2", value="1000.50", currency="USD"),
        lead("e1", value="10000", currency="EUR"),
        lead("n1", value=None, currency="USD"),  # no value: nothing to add
        lead("x1", value="500", currency=""),  # a value without a currency stays apart
        lead("lost", left=-D, value="7000", currency="EUR"),
        lead("won", resolution="won", resolved=D, value="99999", currency="USD"),
    ]
    summary = summarize(leads, NOW, WEEK)
    assert summary.open_value == (
        ("", Decimal("500")),
        ("EUR", Decimal("10000")),
        ("USD", Decimal("26000.50")),
    )
    assert summary.expired_value == (("EUR", Decimal("7000")),)


def test_open_leads_per_assignee_most_first() -> None:
    leads = [
        lead("1", team=("alice@example.com",)),
        lead("2", team=("Alice@Example.com", "bob@example.com")),  # open for both
        lead("3", team=("alice@example.com",)),
        lead("4"),
        lead("5"),
        lead("6", team=("carol@example.com",), left=-D),  # expired: not open
        lead("7", team=("carol@example.com",), resolution="accepted", resolved=D),
    ]
    summary = summarize(leads, NOW, WEEK)
    assert summary.per_assignee == (
        ("alice@example.com", 3),
        ("unassigned", 2),
        ("bob@example.com", 1),
    )


def test_the_five_most_urgent_open_leads_soonest_first() -> None:
    leads = [lead(f"l{n}", left=n * H + H) for n in range(8, 0, -1)]
    leads.append(lead("past", left=-H))
    summary = summarize(leads, NOW, WEEK)
    assert [x.id for x in summary.most_urgent] == ["l1", "l2", "l3", "l4", "l5"]
    assert summary.open_total == 8


def test_an_empty_period_reads_as_nothing_everywhere() -> None:
    summary = summarize([], NOW, WEEK)
    assert summary == Summary(
        now=NOW,
        start=NOW - WEEK,
        open_total=0,
        within_day=0,
        within_three_days=0,
        later=0,
        most_urgent=(),
        open_value=(),
        answered=(),
        median_answer=None,
        p90_answer=None,
        expired=(),
        expired_value=(),
        per_assignee=(),
    )
    text = format_text(summary)
    assert "Open leads: 0" in text
    assert "median time to answer  -" in text
    data = json.loads(format_json(summary))
    assert data["answered"]["median_seconds"] is None
    assert data["open"]["most_urgent"] == []
    message = report_message(summary, Style())
    assert "None" in message.body
    assert "Median" not in message.body  # no median of nothing


def test_the_state_file_holds_what_the_summary_needs_and_pruning_still_works(
    tmp_path: Path,
) -> None:
    """Through a real state file: first seen, answered, expired, then keep_resolved pruning."""

    def referral(ref_id: str, created: datetime, **fields: Any) -> Referral:
        from referral_watch.model import parse_referral

        return parse_referral(make_referral(id=ref_id, created=created, **fields))

    def deadline(ref: Referral) -> datetime:
        return ref.created + 14 * D

    with Store(tmp_path / "state.db") as store:
        long_ago = NOW - 120 * D
        with store.transaction():
            store.upsert([referral("ancient", long_ago - D)], deadline, long_ago)
            store.resolve("ancient", "accepted", long_ago)
        with store.transaction():
            store.upsert(
                [
                    referral("answered", NOW - 3 * D, customer="Answered Co"),
                    referral("late", NOW - 16 * D, customer="Late Co", currency="EUR"),
                    referral("fresh", NOW - 2 * H, customer="Fresh Co"),
                ],
                deadline,
                NOW - 2 * D,
            )
            store.resolve("answered", "accepted", NOW - D)
            store.mark_expired(NOW)
        assert store.prune(NOW, keep_resolved=90 * D) == 1  # "ancient" only
        leads = store.leads(include_resolved=True)

    summary = summarize(leads, NOW, WEEK)
    assert summary.open_total == 1
    assert [x.customer for x in summary.most_urgent] == ["Fresh Co"]
    assert summary.answered == (("accepted", 1),)
    assert summary.median_answer == 2 * D  # created 3 days ago, answered 1 day ago
    assert [x.customer for x in summary.expired] == ["Late Co"]
    assert summary.expired_value == (("EUR", Decimal("25000")),)


# --- formats ---------------------------------------------------------------------------------


def sample() -> Summary:
    return summarize(
        [
            lead("a", left=3 * H, customer="Fabrikam Customer Inc", team=("alice@example.com",)),
            lead("b", left=2 * D, currency="EUR", value="10000.5"),
            lead("c", left=9 * D, team=("alice@example.com", "bob@example.com")),
            lead("d", left=-2 * D, customer="Too Late BV"),
            lead("e", resolution="accepted", resolved=D, age=D + 4 * H),
            lead("f", resolution="declined", resolved=2 * D, age=2 * D + 8 * H),
        ],
        NOW,
        WEEK,
    )


def test_csv_opens_with_the_csv_module_into_the_expected_rows() -> None:
    rows = list(csv.DictReader(io.StringIO(format_csv(sample()))))
    assert all(tuple(row) == CSV_COLUMNS for row in rows)
    assert {(row["period_start"], row["period_end"]) for row in rows} == {
        ("2026-02-23T09:30:00Z", "2026-03-02T09:30:00Z")
    }
    assert [(row["metric"], row["key"], row["value"]) for row in rows] == [
        ("open_total", "", "3"),
        ("open_within_1d", "", "1"),
        ("open_within_3d", "", "1"),
        ("open_later", "", "1"),
        ("open_deal_value", "EUR", "10000.5"),
        ("open_deal_value", "USD", "50000"),
        ("answered_total", "", "2"),
        ("answered", "accepted", "1"),
        ("answered", "declined", "1"),
        ("answered", "won", "0"),
        ("answered", "lost", "0"),
        ("answer_median_seconds", "", str(6 * 3600)),  # 4h and 8h
        ("answer_p90_seconds", "", str(int(7.6 * 3600))),
        ("expired_total", "", "1"),
        ("expired_deal_value", "USD", "25000"),
        ("open_per_assignee", "alice@example.com", "2"),
        ("open_per_assignee", "bob@example.com", "1"),
        ("open_per_assignee", "unassigned", "1"),
    ]


def test_json_has_stable_keys_and_plain_values() -> None:
    data = json.loads(format_json(sample()))
    assert set(data) == {
        "version",
        "period_start",
        "period_end",
        "period_seconds",
        "open",
        "answered",
        "expired",
        "open_per_assignee",
    }
    assert data["period_seconds"] == 7 * 86400
    assert data["open"]["total"] == 3
    assert data["open"]["deal_value_by_currency"] == {"EUR": 10000.5, "USD": 50000}
    assert data["open"]["most_urgent"][0] == {
        "id": "a",
        "customer": "Fabrikam Customer Inc",
        "deal_value": 25000,
        "currency": "USD",
        "deadline": "2026-03-02T12:30:00Z",
        "remaining_seconds": 3 * 3600,
    }
    assert data["answered"] == {
        "total": 2,
        "by_resolution": {"accepted": 1, "declined": 1, "won": 0, "lost": 0},
        "median_seconds": 6 * 3600,
        "p90_seconds": int(7.6 * 3600),
    }
    assert [x["customer"] for x in data["expired"]["leads"]] == ["Too Late BV"]
    assert data["open_per_assignee"][0] == {"assignee": "alice@example.com", "open": 2}


def test_text_for_a_terminal() -> None:
    text = format_text(sample(), "Europe/Amsterdam")
    assert "Mon, Feb 23, 2026, 10:30 AM CET to Mon, Mar 2, 2026, 10:30 AM CET" in text
    assert "Open leads: 3" in text
    urgent = [line.split("  ") for line in text.splitlines() if "Fabrikam" in line]
    assert [[cell.strip() for cell in row if cell.strip()] for row in urgent] == [
        ["Fabrikam Customer Inc", "25,000 USD", "3h"]
    ]
    assert "Answered in this period: 2 (1 accepted, 1 declined)" in text
    assert "median time to answer  6h" in text
    assert "Expired unanswered in this period: 1" in text
    assert "Too Late BV" in text


def test_the_email_form_has_every_section() -> None:
    message = report_message(sample(), Style(timezone="Europe/Amsterdam"))
    assert message.title == "Partner Center referrals: the last 7d"
    body = message.body
    assert "**3 waiting for an answer:** 1 expire within a day, 1 within three days" in body
    assert "- **Fabrikam Customer Inc** · 25,000 USD · 3h left" in body
    assert "- Median time to answer: 6h" in body
    assert "- 90th percentile: 7h 36m" in body
    assert "**Expired unanswered in this period:** 1" in body
    assert "Sat, Feb 28, 2026, 10:30 AM CET" in body  # Too Late BV's deadline, in the zone
    assert "Deal value waiting: 10,000.50 EUR · 50,000 USD" in body
    assert "- alice@example.com: 2" in body


def test_the_teams_form_stays_short_with_a_big_pipeline() -> None:
    leads = [
        lead(
            f"l{n}",
            left=n * H + H,
            customer="Very Long Customer Name " * 10 + str(n),
            team=(f"person{n % 40}@example.com",),
        )
        for n in range(300)
    ]
    leads += [lead(f"x{n}", left=-H - n * H) for n in range(40)]
    summary = summarize(leads, NOW, WEEK)
    teams = Style(locale="nl-NL", compact=True, max_length=TEAMS_MAX)
    message = report_message(summary, teams)
    assert len(message.title) + len(message.body) <= TEAMS_MAX
    assert message.title == "Partner Center-referrals: de afgelopen 7d"
    assert "**Onbeantwoord verlopen in deze periode:** 40" in message.body
    assert "**300 wachten op antwoord:** 24 verlopen binnen een dag" in message.body
    assert "+37 meer" in message.body  # 40 assignees, three named

    tight = report_message(summary, Style(compact=True, max_length=400))
    assert len(tight.title) + len(tight.body) <= 400
    assert "**Expired unanswered in this period:** 40" in tight.body  # the essentials stay
    assert "**Answered in this period:** 0" in tight.body
    assert "most urgent first" not in tight.body  # what does not fit is left out whole...
    assert "**Leads per assignee:** person0@example.com 8" in tight.body  # ...the rest may fit
    assert not tight.body.endswith("…")


# --- cron --------------------------------------------------------------------------------------

AMS, NYC = "Europe/Amsterdam", "America/New_York"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("field", "days"),
    [
        ("*", "mon tue wed thu fri sat sun"),
        ("1", "mon"),
        ("0", "sun"),
        ("7", "sun"),
        ("mon", "mon"),
        ("MON", "mon"),
        ("1-5", "mon tue wed thu fri"),
        ("mon-fri", "mon tue wed thu fri"),
        ("5-7", "fri sat sun"),
        ("fri-sun", "fri sat sun"),  # cronsim alone refuses a range ending on Sunday
        ("sat-0", "sat sun"),
        ("*/2", "tue thu sat sun"),
        ("1,3,SAT", "mon wed sat"),
        ("0-6", "mon tue wed thu fri sat sun"),
    ],
)
def test_cron_weekdays_count_from_sunday_like_cron(field: str, days: str) -> None:
    sunday = utc("2026-03-01T00:00:00")
    runs = cron.runs_after(cron.cron_expression(f"0 8 * * {field}"), ZoneInfo("UTC"), sunday)
    week = [run for run, _ in zip(runs, range(7), strict=False) if run < sunday + WEEK]
    assert " ".join(run.strftime("%a").lower() for run in sorted(week, key=_monday_first)) == days


def _monday_first(moment: datetime) -> int:
    return moment.weekday()


def report_config(schedule: str, zone: str = AMS) -> ReportConfig:
    return ReportConfig(name="weekly", schedule=schedule, timezone=zone, notify=["managers"])


@pytest.mark.parametrize(
    ("schedule_text", "after", "expected_utc"),
    [
        ("0 8 * * mon", datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, 7, 0, tzinfo=UTC)),
        ("0 8 * * 1", datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, 7, 0, tzinfo=UTC)),
        # summer time: 08:00 CEST is 06:00 UTC
        ("0 8 * * mon", datetime(2026, 7, 1, tzinfo=UTC), datetime(2026, 7, 6, 6, 0, tzinfo=UTC)),
        # day of month OR weekday, as cron has it: Tuesday the 3rd comes before Monday the 9th
        (
            "30 9 3 * mon",
            datetime(2026, 3, 2, 12, tzinfo=UTC),
            datetime(2026, 3, 3, 8, 30, tzinfo=UTC),
        ),
        (
            "30 9 3 * mon",
            datetime(2026, 3, 3, 12, tzinfo=UTC),
            datetime(2026, 3, 9, 8, 30, tzinfo=UTC),
        ),
    ],
)
def test_a_report_fires_at_its_cron_time_in_its_zone(
    schedule_text: str, after: datetime, expected_utc: datetime
) -> None:
    fire = schedule.report_trigger(report_config(schedule_text)).get_next_fire_time(None, after)
    assert fire == expected_utc


# Both clock changes of 2026 in both zones. Amsterdam: 02:00 CET -> 03:00 CEST on Mar 29
# (01:00 UTC), 03:00 CEST -> 02:00 CET on Oct 25 (01:00 UTC). New York: 02:00 EST -> 03:00 EDT
# on Mar 8 (07:00 UTC), 02:00 EDT -> 01:00 EST on Nov 1 (06:00 UTC).
CRON_JOB_RUNS = [
    # hourly: every real hour, the repeated one twice (02:15 CEST and 02:15 CET), none lost
    ("15 * * * *", AMS, "2026-10-25T00:00", ["00:15", "01:15", "02:15", "03:15"]),
    ("15 * * * *", AMS, "2026-03-29T00:00", ["00:15", "01:15", "02:15"]),
    ("15 * * * *", NYC, "2026-11-01T04:00", ["04:15", "05:15", "06:15", "07:15"]),
    ("15 * * * *", NYC, "2026-03-08T06:00", ["06:15", "07:15", "08:15"]),
    # started inside the repeated hour (the wedge of issue 13): the next real hour
    ("15 * * * *", AMS, "2026-10-25T01:15:30", ["02:15", "03:15"]),
    ("15 * * * *", NYC, "2026-11-01T06:15:30", ["07:15", "08:15"]),
    # a fixed time in the repeated hour runs once; in the skipped hour, right after it
    ("30 2 * * *", AMS, "2026-10-24T12:00", ["10-25 00:30", "10-26 01:30"]),
    ("30 2 * * *", AMS, "2026-10-25T01:15", ["10-26 01:30"]),  # not 00:30 again
    ("30 2 * * *", AMS, "2026-03-28T12:00", ["03-29 01:00", "03-30 00:30"]),
    ("30 1 * * *", NYC, "2026-10-31T12:00", ["11-01 05:30", "11-02 06:30"]),
    ("30 1 * * *", NYC, "2026-11-01T06:10", ["11-02 06:30"]),
    ("30 2 * * *", NYC, "2026-03-07T12:00", ["03-08 07:00", "03-09 06:30"]),
    # a weekly report across the change keeps its local time
    ("0 8 * * sun", AMS, "2026-10-18T12:00", ["10-25 07:00", "11-01 07:00"]),
    ("0 8 * * sun", NYC, "2026-03-01T14:00", ["03-08 12:00", "03-15 12:00"]),
]


def _times(runs: list[datetime], like: list[str]) -> list[str]:
    shape = "%m-%d %H:%M" if " " in like[0] else "%H:%M"
    return [run.strftime(shape) for run in runs]


@pytest.mark.parametrize(("schedule_text", "zone", "start", "expected"), CRON_JOB_RUNS)
def test_the_cron_job_runs_through_both_clock_changes(
    schedule_text: str, zone: str, start: str, expected: list[str]
) -> None:
    """As the scheduler asks: the first run after `start`, then the run after each run."""
    trigger = schedule.report_trigger(report_config(schedule_text, zone))
    now = utc(start)
    runs = [trigger.get_next_fire_time(None, now)]
    while len(runs) < len(expected):
        runs.append(trigger.get_next_fire_time(runs[-1], runs[-1]))
    assert all(run.tzinfo is not None for run in runs)
    assert _times(runs, expected) == expected


def test_the_last_run_is_found_forwards_from_the_last_one_sent() -> None:
    expression = cron.cron_expression("0 8 * * mon")
    zone = ZoneInfo(AMS)
    monday_8 = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
    assert schedule.last_run(expression, zone, monday_8 - D, monday_8 + 3 * H) == monday_8
    assert schedule.last_run(expression, zone, monday_8, monday_8 + 3 * H) is None  # had it
    assert schedule.last_run(expression, zone, monday_8 - 20 * D, monday_8 + H) == monday_8
    assert schedule.last_run(expression, zone, monday_8 - D, monday_8) == monday_8  # on time


@pytest.mark.parametrize(
    ("schedule_text", "bad"),
    [
        ("61 8 * * mon", "bad minute"),
        ("0 25 * * mon", "bad hour"),
        ("0 8 32 * *", "bad day-of-month"),
        ("0 8 * 13 *", "bad month"),
        ("0 8 * * funday", "bad day-of-week"),
        ("0 8 * *", "five fields"),
    ],
)
def test_a_bad_schedule_is_a_config_error_naming_its_key(
    tmp_path: Path, schedule_text: str, bad: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, {"managers": "json://127.0.0.1:9/x"}, schedule_text)
    (problem,) = caught.value.problems
    assert problem.startswith("reports[0].schedule: ")
    assert repr(schedule_text) in problem and bad in problem


# --- the daemon: scheduling, catch-up, delivery -----------------------------------------------


def make_config(
    tmp_path: Path,
    channels: dict[str, str],
    schedule: str = "0 8 * * mon",
    zone: str = "Europe/Amsterdam",
    notify: tuple[str, ...] = ("managers",),
) -> Config:
    channel_lines = "\n".join(f"{name} = {json.dumps(url)}" for name, url in channels.items())
    return parse_config(
        f"""
[auth]
method = "env"
[state]
path = "{tmp_path / "state.db"}"
[policy]
[[policy.tiers]]
name = "new"
remaining = "14d"
notify = {json.dumps(list(channels))}
[channels]
{channel_lines}
[[reports]]
name = "weekly"
schedule = "{schedule}"
timezone = "{zone}"
notify = {json.dumps(list(notify))}
""",
        env={},
    )


def seed(config: Config, now: datetime) -> None:
    """A state file with two open leads and one that expired unanswered."""

    def deadline(ref: Referral) -> datetime:
        return ref.created + 14 * D

    from referral_watch.model import parse_referral

    records = [
        make_referral(id="l1", created=now - 13 * D, customer="Soon Ltd"),
        make_referral(id="l2", created=now - 2 * D, customer="Later Inc"),
        make_referral(id="l3", created=now - 16 * D, customer="Missed BV"),
    ]
    with Store(config.state.path) as store, store.transaction():
        store.upsert([parse_referral(r) for r in records], deadline, now - H)
        store.mark_expired(now)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def managers() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


MONDAY_8_AMS = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)


def set_last(config: Config, moment: datetime) -> None:
    with Store(config.state.path) as store:
        store.set_meta("report.weekly.last", ts(moment))


def reports_queued(config: Config) -> int:
    """Report messages ever put in the outbox (sent, pending or dropped). Sending is
    synchronous, so once a report call returns, whatever it sent has been received."""
    with Store(config.state.path) as store:
        return int(
            store.db.execute("SELECT count(*) FROM outbox WHERE kind = 'report'").fetchone()[0]
        )


def test_a_report_missed_while_down_is_sent_once_at_start(
    tmp_path: Path, managers: WebhookReceiver
) -> None:
    config = make_config(tmp_path, {"managers": managers.json_url})
    clock = Clock(MONDAY_8_AMS + 3 * H)  # started three hours after the Monday report was due
    seed(config, clock.now)
    set_last(config, MONDAY_8_AMS - WEEK)  # last week's went out
    daemon = Daemon(config, clock=clock)

    daemon.catch_up_reports()
    managers.wait_for(1)
    assert managers.bodies[0]["title"] == "Partner Center referrals: the last 7d"
    assert "Soon Ltd" in managers.bodies[0]["message"]

    daemon.catch_up_reports()  # another restart
    clock.now += H
    assert daemon.run_report("weekly") is False  # the cron job for that run: already sent
    assert len(managers.requests) == 1
    assert reports_queued(config) == 1
    with Store(config.state.path) as store:
        assert store.get_meta("report.weekly.last") == ts(MONDAY_8_AMS)
        assert store.backlog() == 0


# (schedule, zone, the last run sent, the daemon starts at, the run it catches up or None)
CATCH_UPS = [
    # issue 13: restarted at 02:15 CET (the second one) after the 02:15 CEST run went out
    ("15 * * * *", AMS, "2026-10-25T00:15", "2026-10-25T01:15:30", "2026-10-25T01:15"),
    ("15 * * * *", AMS, "2026-10-25T01:15", "2026-10-25T01:45", None),
    ("15 * * * *", AMS, "2026-03-29T00:15", "2026-03-29T01:20", "2026-03-29T01:15"),
    ("15 * * * *", NYC, "2026-11-01T05:15", "2026-11-01T06:20", "2026-11-01T06:15"),
    ("15 * * * *", NYC, "2026-03-08T06:15", "2026-03-08T07:20", "2026-03-08T07:15"),
    # down at 02:30 CEST, back in the repeated hour: that run is caught up
    ("30 2 * * *", AMS, "2026-10-24T00:30", "2026-10-25T01:15", "2026-10-25T00:30"),
    ("30 2 * * *", AMS, "2026-10-25T00:30", "2026-10-25T01:45", None),  # not twice
    ("30 2 * * *", AMS, "2026-03-28T01:30", "2026-03-29T02:00", "2026-03-29T01:00"),
    ("30 1 * * *", NYC, "2026-10-31T05:30", "2026-11-01T06:45", "2026-11-01T05:30"),
    ("30 1 * * *", NYC, "2026-11-01T05:30", "2026-11-01T06:45", None),
    ("30 2 * * *", NYC, "2026-03-07T07:30", "2026-03-08T08:00", "2026-03-08T07:00"),
]


@pytest.mark.timeout(20)  # the old arithmetic never returned from the first case
@pytest.mark.parametrize(("schedule_text", "zone", "last", "start", "caught_up"), CATCH_UPS)
def test_the_catch_up_at_start_through_both_clock_changes(
    tmp_path: Path,
    managers: WebhookReceiver,
    schedule_text: str,
    zone: str,
    last: str,
    start: str,
    caught_up: str | None,
) -> None:
    config = make_config(tmp_path, {"managers": managers.json_url}, schedule_text, zone)
    clock = Clock(utc(start))
    seed(config, clock.now)
    set_last(config, utc(last))
    daemon = Daemon(config, clock=clock)
    daemon.catch_up_reports()
    daemon.catch_up_reports()  # a second restart at once sends nothing more
    clock.now += timedelta(minutes=5)
    daemon.run_report("weekly")  # nor does the cron job for the same run
    assert reports_queued(config) == len(managers.requests) == (caught_up is not None)
    with Store(config.state.path) as store:
        assert store.get_meta("report.weekly.last") == ts(utc(caught_up or last))


def test_a_report_more_than_a_day_late_is_not_sent_at_start(
    tmp_path: Path, managers: WebhookReceiver
) -> None:
    config = make_config(tmp_path, {"managers": managers.json_url})
    clock = Clock(MONDAY_8_AMS + D + H)
    seed(config, clock.now)
    set_last(config, MONDAY_8_AMS - WEEK)
    Daemon(config, clock=clock).catch_up_reports()
    assert managers.requests == []
    assert reports_queued(config) == 0


def test_the_first_start_sends_nothing_and_remembers_from_when(
    tmp_path: Path, managers: WebhookReceiver
) -> None:
    config = make_config(tmp_path, {"managers": managers.json_url})
    clock = Clock(MONDAY_8_AMS + H)
    seed(config, clock.now)
    Daemon(config, clock=clock).catch_up_reports()
    assert managers.requests == []
    assert reports_queued(config) == 0
    with Store(config.state.path) as store:
        assert store.get_meta("report.weekly.last") == ts(clock.now)


def test_the_scheduler_holds_the_report_job_at_its_cron_time_in_its_zone(
    tmp_path: Path, managers: WebhookReceiver
) -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    config = make_config(tmp_path, {"managers": managers.json_url}, "0 8 * * mon")
    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.start(paused=True)
    try:
        Daemon(config)._schedule(scheduler)
        job = scheduler.get_job("report:weekly")
        local = job.next_run_time.astimezone(ZoneInfo("Europe/Amsterdam"))
        assert (local.weekday(), local.hour, local.minute) == (0, 8, 0)
        assert job.next_run_time - datetime.now(UTC) <= WEEK
        assert scheduler.get_job("cycle") is not None  # one scheduler for both
    finally:
        scheduler.shutdown(wait=False)


def test_the_scheduler_fires_the_report_job(tmp_path: Path, managers: WebhookReceiver) -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    config = make_config(tmp_path, {"managers": managers.json_url}, "* * * * *")
    seed(config, datetime.now(UTC))
    set_last(config, datetime.now(UTC) - 2 * WEEK)
    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.start(paused=True)
    try:
        Daemon(config)._schedule(scheduler)
        scheduler.remove_job("cycle")  # no Partner Center in this test
        # Fire it now rather than waiting for the next whole minute.
        scheduler.get_job("report:weekly").modify(next_run_time=datetime.now(UTC))
        scheduler.resume()
        managers.wait_for(1)
        assert managers.bodies[0]["title"] == "Partner Center referrals: the last 7d"
        assert "Soon Ltd" in managers.bodies[0]["message"]
    finally:
        scheduler.shutdown(wait=True)


def test_end_to_end_a_report_reaches_a_webhook_and_an_email_inbox(world: World) -> None:
    """Poll the sandbox for real, then the weekly report goes to Teams-style and mail channels."""
    now = datetime.now(UTC)
    world.add_lead(age=13 * D + 20 * H, customer="Urgent Fabrikam", now=now)
    world.add_lead(age=2 * D, customer="Relaxed Contoso", deal_value=5000, currency="EUR", now=now)
    due = now - H  # the report's daily run was an hour ago
    with SmtpReceiver() as smtp:
        world.channels = {"mail": smtp.mailto_url(to="sales-managers@example.com")}
        world.extra = (
            f'[[reports]]\nname = "weekly"\nschedule = "{due.minute} {due.hour} * * *"\n'
            'timezone = "UTC"\nnotify = ["managers", "mail"]\n'
        )
        assert world.cli("run", "--once").code == 0
        alerts = len(world.managers.requests)  # the urgent lead's reminder
        world.managers.fail_next(1)  # the webhook is down at report time
        config = load_config(world.config_path)
        with Store(config.state.path) as store:
            store.set_meta("report.weekly.last", ts(now - 2 * WEEK))
        daemon = Daemon(config, clock=lambda: now)
        fired = daemon.run_report("weekly")

        assert fired is True
        mail = smtp.wait_for(1)[0]
        assert mail.subject == "Partner Center referrals: the last 7d"
        assert "sales-managers@example.com" in mail.rcpt_tos
        assert "Urgent Fabrikam" in mail.text
        assert "5,000 EUR" in mail.text
        assert len(world.managers.requests) == alerts + 1  # tried, refused

        # The failed one waits in the outbox; the next cycle's normal delivery sends it.
        before = len(world.team.requests)
        assert world.cli("run", "--once").code == 0
        assert len(world.managers.requests) == alerts + 2
        report = world.managers.bodies[-1]
        assert report["title"] == "Partner Center referrals: the last 7d"
        assert "Urgent Fabrikam" in report["message"]
        assert len(smtp.messages) == 1  # not twice
        assert len(world.team.requests) == before


def test_a_report_is_settled_like_any_message_and_ops_hears_when_it_is_dropped(
    world: World,
) -> None:
    """Issue 14: one settle path. A channel whose sender breaks does not keep the report from
    the other channel; its copy waits in the outbox, is retried by the cycles and, refused for
    a day, is dropped with a message to ops naming it."""
    from referral_watch.notify import Notifier

    class OneChannelBroken:
        def __init__(self, inner: Notifier) -> None:
            self.inner = inner

        def send(self, channel: str, message: Any, *, recipients: Any = ()) -> Any:
            if channel == "broken":
                raise RuntimeError("a bug in one channel's plugin")
            return self.inner.send(channel, message, recipients=recipients)

    with WebhookReceiver() as ops:
        world.channels = {"broken": "json://127.0.0.1:9/never", "ops": ops.json_url}
        world.extra = (
            '[[reports]]\nname = "weekly"\nschedule = "0 8 * * mon"\ntimezone = "UTC"\n'
            'notify = ["broken", "managers"]\n'
            '[operations]\nnotify = ["ops"]\n'
        )
        config = load_config(world.write_config())
        set_last(config, MONDAY_8_AMS - WEEK)
        clock = Clock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))  # Monday, an hour after 08:00 UTC
        daemon = Daemon(
            config, clock=clock, sender_factory=lambda c: OneChannelBroken(Notifier(c.channels))
        )
        assert daemon.run_report("weekly") is True
        assert [b["title"] for b in world.managers.bodies] == [
            "Partner Center referrals: the last 7d"
        ]
        with Store(config.state.path) as store:
            (waiting,) = store.pending()
            assert (waiting.kind, waiting.channel, waiting.attempts) == ("report", "broken", 1)

        clock.now += D + H  # a day of refusals later, the next cycles retry it, then give up
        assert daemon.cycle() is not None
        assert daemon.cycle() is not None
        daemon.close()
        assert [b["title"] for b in ops.bodies] == ["referral-watch: a message was dropped"]
        assert "channel broken: report" in ops.bodies[0]["message"]
        assert len(world.managers.bodies) == 1  # the report itself went out once
    metrics = daemon.metrics.render().decode()
    assert 'referral_watch_deliveries_total{channel="broken",result="failed"} 2.0' in metrics
    assert 'referral_watch_deliveries_total{channel="managers",result="ok"} 1.0' in metrics


def test_the_report_command_prints_every_format(world: World) -> None:
    now = datetime.now(UTC)
    world.add_lead(age=13 * D + 20 * H, customer="Urgent Fabrikam", now=now)
    answered = world.add_lead(age=3 * D, customer="Quick Answer Co", now=now)
    assert world.cli("run", "--once").code == 0
    world.sandbox.update(answered, substatus="Accepted", status="Active")
    assert world.cli("run", "--once").code == 0

    text = world.cli("report")
    assert text.code == 0, text.err
    assert "Open leads: 1" in text.out
    assert "Answered in this period: 1 (1 accepted)" in text.out

    data = world.cli("report", "--since", "30d", "--format", "json").json()
    assert data["period_seconds"] == 30 * 86400
    assert data["open"]["most_urgent"][0]["customer"] == "Urgent Fabrikam"
    assert data["answered"]["by_resolution"]["accepted"] == 1

    rows = list(csv.DictReader(io.StringIO(world.cli("report", "--format", "csv").out)))
    assert {"metric": "open_within_1d", "value": "1"}.items() <= rows[1].items()

    markdown = world.cli("report", "--format", "markdown").out
    assert markdown.startswith("# Partner Center referrals: the last 7d")
    assert "**Urgent Fabrikam**" in markdown


def test_a_full_report_too_long_for_its_channel_falls_back_to_the_short_form() -> None:
    leads = [lead(f"x{n}", left=-H - n * H, customer="Long Name " * 20) for n in range(40)]
    summary = summarize(leads, NOW, WEEK)
    full = report_message(summary, Style())
    assert "- +30 more" in full.body  # ten expired leads listed, the rest counted
    limit = len(full.title) + len(full.body) - 1
    short = report_message(summary, Style(max_length=limit))
    assert len(short.title) + len(short.body) <= limit
    assert "**Expired unanswered in this period:** 40" in short.body
    assert "Long Name" not in short.body  # no list cut off in the middle


def test_the_daemon_refuses_a_schedule_it_cannot_run(world: World) -> None:
    world.extra = '[[reports]]\nname = "w"\nschedule = "0 25 * * mon"\nnotify = ["managers"]\n'
    outcome = world.cli("run")
    assert outcome.code == 2
    assert "reports[0].schedule" in outcome.err


def test_the_report_command_explains_bad_input(world: World) -> None:
    missing = world.cli("report")
    assert missing.code == 1
    assert "run --once" in missing.err  # no state file yet
    bad = world.cli("report", "--since", "a week")
    assert bad.code == 2
    assert "--since" in bad.err
    assert "Traceback" not in missing.err + bad.err


@pytest.mark.slow
def test_the_daemon_catches_up_a_missed_report_at_start(world: World) -> None:
    """The real daemon process: a report due two hours ago, missed while down, goes out once."""
    now = datetime.now(UTC)
    due = now - 2 * H
    world.add_lead(age=D, customer="Daemon Lead", now=now)
    world.extra = (
        '[schedule]\ninterval = "1s"\njitter = "0s"\n'
        f'[[reports]]\nname = "daily"\nschedule = "{due.minute} {due.hour} * * *"\n'
        'timezone = "UTC"\nnotify = ["managers"]\n'
    )
    world.write_config()
    with Store(world.state_path) as store:
        store.set_meta("report.daily.last", ts(now - 2 * D))
    with world.daemon() as process:
        world.managers.wait_for(1, timeout=20)
        world.team.wait_for(1, timeout=20)  # the poll ran too
        cycles = len(process.events("cycle.done"))
        process.wait_for_log("cycle.done", cycles + 3)  # more cycles: the report does not repeat
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    reports = [b for b in world.managers.bodies if b["title"].startswith("Partner Center")]
    assert len(reports) == 1
    assert "Daemon Lead" in reports[0]["message"]


@pytest.mark.slow
def test_the_daemon_goes_on_polling_through_the_repeated_hour(world: World) -> None:
    """Issue 13: the real daemon under libfaketime, started at 02:15:40 CET (01:15:40 UTC, in
    the hour repeated on 2026-10-25 in Amsterdam) after the 02:15 CEST run went out: the
    02:15 CET run is caught up at start, the 02:16 CET run comes from the cron job twenty seconds
    later, each once, and polling goes on (the old arithmetic never returned, holding the lock).
    """
    start = datetime(2026, 10, 25, 1, 15, 40, tzinfo=UTC)
    fake_clock = faketime_env(start)
    if fake_clock is None:
        pytest.skip("needs libfaketime (Debian's faketime package)")
    world.add_lead(age=H, customer="Fold Hour Lead", now=start)
    world.extra = '[schedule]\ninterval = "1s"\njitter = "0s"\n' + "".join(
        f'[[reports]]\nname = "{name}"\nschedule = "{minute} * * * *"\n'
        'timezone = "Europe/Amsterdam"\nnotify = ["managers"]\n'
        for name, minute in (("hourly", 15), ("next", 16))
    )
    world.write_config()
    with Store(world.state_path) as store:
        store.set_meta("report.hourly.last", ts(datetime(2026, 10, 25, 0, 15, tzinfo=UTC)))
        store.set_meta("report.next.last", ts(datetime(2026, 10, 25, 0, 16, tzinfo=UTC)))
    with world.daemon(env=fake_clock) as process:
        caught_up = process.wait_for_log("report.catch_up")
        assert [e["report"] for e in caught_up] == ["hourly"]
        assert caught_up[0]["scheduled"] == "2026-10-25T01:15:00+00:00"
        queued = process.wait_for_log("report.queued", 2, timeout=40)  # the cron job: 01:16
        assert [e["report"] for e in queued] == ["hourly", "next"]
        cycles = len(process.events("cycle.done"))
        process.wait_for_log("cycle.done", cycles + 3)  # polling goes on after both
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    reports = [b for b in world.managers.bodies if b["title"].startswith("Partner Center")]
    assert len(reports) == 2  # each run once
    assert "Fold Hour Lead" in reports[0]["message"]
    with Store(world.state_path) as store:
        assert store.get_meta("report.hourly.last") == ts(datetime(2026, 10, 25, 1, 15, tzinfo=UTC))
        assert store.get_meta("report.next.last") == ts(datetime(2026, 10, 25, 1, 16, tzinfo=UTC))


def test_time_to_answer_uses_partner_centers_own_answer_time() -> None:
    """Answered 2 h after it came in and noticed 3 h later still counts 2 h; an updatedDateTime
    from before the lead was last seen waiting says nothing about the answer."""
    exact = lead("a", age=10 * H, seen=9 * H, updated=8 * H, resolution="accepted", resolved=5 * H)
    noticed = lead("b", age=10 * H, seen=9 * H, resolution="declined", resolved=6 * H)
    stale = lead("c", age=10 * H, seen=7 * H, updated=9 * H, resolution="won", resolved=6 * H)
    times = {
        x.referral.id: summarize([x], NOW, 7 * D).median_answer for x in (exact, noticed, stale)
    }
    assert times == {"a": 2 * H, "b": 4 * H, "c": 4 * H}
