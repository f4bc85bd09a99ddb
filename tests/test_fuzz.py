"""Hypothesis fuzzing of everything that reads outside input, and of the cycle's shortcuts.

- the referral JSON: any shape gives a Referral or a logged skip, never an exception escaping
  the cycle;
- a page of the API: its records read as json.loads would read them;
- durations and the config loader: a value or a ConfigError/ValueError naming the problem;
- the steady cycle's shortcut (policy_candidates): it never hides a lead due_alerts would
  alert about.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from referral_watch import policy
from referral_watch.config import DURATION_LIMIT, Config, format_duration, parse_duration
from referral_watch.config.loader import parse_config
from referral_watch.cycle.decide import Decide
from referral_watch.cycle.result import CycleResult
from referral_watch.cycle.runner import Cycle
from referral_watch.errors import ApiError, ConfigError
from referral_watch.model import TIER, Alert, MalformedReferral, Referral, parse_referral
from referral_watch.partner_center import client as partner_center
from referral_watch.partner_center import responses
from referral_watch.partner_center.client import Page
from referral_watch.sandbox.records import make_referral
from referral_watch.state.db import ts
from referral_watch.state.store import Store

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _quiet_logging() -> Iterator[None]:
    # The cycle logs every skipped record; keep that off pytest's (possibly closed) streams.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    yield
    structlog.reset_defaults()


# --- JSON strategies ------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=25,
)
stamps = st.one_of(
    st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ).map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond * 10:07d}Z"),
    st.text(max_size=30),
    json_values,
)
REFERRAL_KEYS = (
    "id",
    "name",
    "createdDateTime",
    "updatedDateTime",
    "expirationDateTime",
    "status",
    "substatus",
    "qualification",
    "type",
    "direction",
    "customerProfile",
    "details",
    "team",
    "inviteContext",
)


@st.composite
def referral_like(draw: st.DrawFn) -> Any:
    """Mostly records of the documented shape with odd values, sometimes anything at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    days = draw(st.integers(0, 20))  # half past: no deadline falls exactly on NOW
    record = make_referral(created=NOW - timedelta(days=days, minutes=30))
    for key in draw(st.lists(st.sampled_from(REFERRAL_KEYS), max_size=5, unique=True)):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            record.pop(key, None)
        elif key.endswith("DateTime"):
            record[key] = draw(stamps)
        else:
            record[key] = draw(json_values)
    if draw(st.booleans()):
        record["id"] = draw(st.sampled_from(["lead-1", "lead-2", " lead-1 ", "", "  "]))
    return record


# --- the referral parser and the cycle ------------------------------------------------------


@FUZZ
@given(referral_like())
def test_any_record_parses_or_is_malformed(record: Any) -> None:
    try:
        referral = parse_referral(record)
    except MalformedReferral:
        return
    assert isinstance(referral, Referral)
    assert referral.id == referral.id.strip() and referral.id
    assert referral.created.tzinfo is not None
    json.loads(referral.raw)  # what the store keeps is JSON again


class FakeApi:
    """Pages of whatever records the test gives, as PartnerCenter yields them (with texts)
    or as a test double does (records only)."""

    def __init__(self, pages: list[list[Any]], with_texts: bool) -> None:
        self._pages = pages
        self._with_texts = with_texts

    def pages(self) -> Iterator[Any]:
        for number, records in enumerate(self._pages):
            if self._with_texts:
                yield Page([json.dumps(r) for r in records], number, None)
            else:
                yield _Records(records)

    def get(self, referral_id: str) -> dict[str, Any] | None:
        return None  # every absent lead is gone


class _Records:
    def __init__(self, records: list[Any]) -> None:
        self.records = records


class Sent:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def send(self, channel: str, message: Any, *, recipients: Any = ()) -> Any:
        self.messages.append(channel)
        return type("Ok", (), {"ok": True, "error": None})()


def config() -> Config:
    return parse_config(
        """
[auth]
method = "env"
[state]
path = "unused.db"
[policy]
on_expired = ["team"]
[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]
[[policy.tiers]]
name = "final"
remaining = "12h"
notify = ["team"]
repeat = "4h"
[channels]
team = "json://127.0.0.1:9/hook"
""",
        env={},
    )


@FUZZ
@given(
    st.lists(st.lists(referral_like(), max_size=6), min_size=1, max_size=3),
    st.booleans(),
)
def test_no_record_shape_escapes_the_cycle(pages: list[list[Any]], with_texts: bool) -> None:
    records = [r for page in pages for r in page]
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "state.db") as store:
        sender = Sent()
        cycle = Cycle(config(), store, FakeApi(pages, with_texts), sender, lambda: NOW)
        result = cycle.run()
        assert result.poll_ok, result.error
        assert result.fetched == len(records)
        stored = {lead.id for lead in store.leads(include_resolved=True)}
        parsed = {r.id for r in _parsable(records)}
        assert stored == parsed  # every usable record kept, once
        assert result.malformed == len(records) - len(_parsable(records))
        # A moment later (nothing can fall due in a microsecond): nothing new, nothing twice.
        later = NOW + timedelta(microseconds=1)
        again = Cycle(config(), store, FakeApi(pages, with_texts), sender, lambda: later).run()
        assert again.poll_ok and again.new == 0 and again.queued == 0


def _parsable(records: list[Any]) -> list[Referral]:
    out = []
    for record in records:
        with contextlib.suppress(MalformedReferral):
            out.append(parse_referral(record))
    return out


# --- a page of the API -------------------------------------------------------------------------

pages_json = st.fixed_dictionaries(
    {"value": st.lists(json_values, max_size=5)},
    optional={
        "@odata.nextLink": st.none() | st.text(max_size=20) | st.integers(),
        "@odata.context": st.text(max_size=10),
        "other": json_values,
    },
)


def _response(content: bytes) -> httpx.Response:
    request = httpx.Request("GET", "http://127.0.0.1/v1.0/engagements/referrals")
    return httpx.Response(200, content=content, request=request)


@FUZZ
@given(pages_json, st.sampled_from([None, 1, 2]))
def test_a_page_reads_as_json_would_read_it(body: dict[str, Any], indent: int | None) -> None:
    content = json.dumps(body, indent=indent, ensure_ascii=bool(indent)).encode()
    items, link = responses.read_page(_response(content), 0)
    texts = partner_center.Page(items, 0, None).texts
    assert [json.loads(text) for text in texts] == body["value"]
    assert link == body.get("@odata.nextLink")


@FUZZ
@given(st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_a_page_that_is_not_a_page_is_an_api_error(content: bytes) -> None:
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("value"), list):
        items, _ = responses.read_page(_response(content), 0)
        texts = partner_center.Page(items, 0, None).texts
        assert [json.loads(t) for t in texts] == body["value"]
        return
    with pytest.raises(ApiError, match="unreadable page"):
        responses.read_page(_response(content), 0)


# --- durations ----------------------------------------------------------------------------

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@FUZZ
@given(st.text(max_size=20))
def test_any_text_is_a_duration_or_a_value_error(text: str) -> None:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        assert "not a duration" in str(exc) or "longer than ten years" in str(exc)
        return
    assert timedelta(0) <= value <= DURATION_LIMIT


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(sorted(UNITS))), min_size=1))
def test_a_written_duration_means_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    expected = timedelta(seconds=sum(n * UNITS[unit] for n, unit in parts))
    if expected > DURATION_LIMIT or len(text) > 64:  # bounded (issue 20): a clear error
        with pytest.raises(ValueError, match=r"longer than ten years|not a duration"):
            parse_duration(text)
        return
    assert parse_duration(text) == expected
    assert parse_duration(f"  {text} ") == expected


@FUZZ
@given(st.integers(0, int(DURATION_LIMIT.total_seconds())))
def test_format_duration_round_trips(seconds: int) -> None:
    value = timedelta(seconds=seconds)
    assert parse_duration(format_duration(value)) == value


# --- the config loader ----------------------------------------------------------------------

SECTIONS = {
    "partner_center": ["base_url", "filter", "page_size", "timeout", "link_template"],
    "auth": ["method", "tenant_id", "client_id", "cache_path", "token_env", "command"],
    "state": ["path", "keep_resolved"],
    "schedule": ["interval", "jitter"],
    "policy": ["response_window", "digest_over", "digest_limit", "on_expired", "tiers"],
    "channels": ["team", "managers"],
    "messages": ["locale", "timezone"],
    "operations": ["notify", "after_failures", "repeat"],
    "server": ["listen"],
    "heartbeat": ["url", "fail_url", "timeout"],
    "reports": ["name", "schedule", "timezone", "notify"],
}
CHANNEL_KEYS = ["url", "quiet_hours", "quiet_days", "timezone", "locale", "match", "to_assignees"]
TIER_KEYS = ["name", "remaining", "notify", "repeat", "bypass_quiet", "title", "body"]
plausible = st.sampled_from(
    [
        "15m",
        "1d12h",
        "team",
        "msal",
        "env",
        "UTC",
        "Europe/Amsterdam",
        "nl-NL",
        "20:00-08:00",
        "json://127.0.0.1/x",
        "${MISSING}",
        "${file:/nonexistent/secret}",
        "127.0.0.1:9464",
        "",
        "Sat",
        "0 8 * * mon",
        "https://api.example.com/v1.0",
    ]
)
toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | plausible
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(CHANNEL_KEYS + TIER_KEYS + ["x"]), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def config_tables(draw: st.DrawFn) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from([*sorted(SECTIONS), "typo"]), unique=True)):
        keys = SECTIONS.get(section, ["x"])
        table = {k: draw(toml_values) for k in draw(st.lists(st.sampled_from(keys), unique=True))}
        if section == "policy" and draw(st.booleans()):
            table["tiers"] = draw(
                st.lists(st.dictionaries(st.sampled_from(TIER_KEYS), toml_values), max_size=3)
            )
        tables[section] = table
    return tables


def toml(value: Any) -> str:
    """A TOML inline value (the config tables are written as inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "inf" if value == math.inf else "-inf" if value == -math.inf else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml(v)}" for k, v in value.items()) + "}"


@FUZZ
@given(config_tables())
def test_any_config_is_valid_or_a_config_error_naming_keys(tables: dict[str, Any]) -> None:
    text = "\n".join(f"{name} = {toml(table)}" for name, table in tables.items())
    try:
        parsed = parse_config(text, env={})
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        assert "Traceback" not in str(exc)
        return
    assert isinstance(parsed, Config) and parsed.policy.tiers


@FUZZ
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    try:
        parse_config(text, env={})
    except ConfigError as exc:
        assert exc.problems


# --- the steady cycle's shortcut ----------------------------------------------------------

tier_configs = st.lists(
    st.tuples(
        st.integers(1, 20 * 24),
        st.sampled_from([None, 2, 4]),
        st.sets(st.sampled_from(["a", "b"]), min_size=1),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda t: t[0],
)


def _policy_config(tiers: list[tuple[int, int | None, set[str]]], expired: bool) -> Config:
    lines = ['[auth]\nmethod = "env"\n[state]\npath = "unused.db"\n[policy]']
    if expired:
        lines.append('on_expired = ["b"]\non_resolved = ["a"]')
    for n, (hours, repeat, notify) in enumerate(tiers):
        lines.append(f'[[policy.tiers]]\nname = "t{n}"\nremaining = "{hours}h"')
        lines.append(f"notify = {json.dumps(sorted(notify))}")
        if repeat:
            lines.append(f'repeat = "{repeat}h"')
    lines.append('[channels]\na = "json://127.0.0.1:9/a"\nb = "json://127.0.0.1:9/b"')
    return parse_config("\n".join(lines), env={})


@st.composite
def histories(
    draw: st.DrawFn,
) -> tuple[list[tuple[int, str | None]], list[tuple[int, str, str, str, int]]]:
    leads = draw(
        st.lists(
            st.tuples(
                st.integers(-3 * 24, 21 * 24),  # deadline in hours from NOW
                st.sampled_from([None, None, None, "accepted", "expired", "gone"]),
            ),
            min_size=1,
            max_size=6,
        )
    )
    rows = draw(
        st.lists(
            st.tuples(
                st.integers(0, len(leads) - 1),
                st.sampled_from(["a", "b"]),
                st.sampled_from(["t0", "t1", "t2"]),
                st.sampled_from(["pending", "delivered", "skipped", "superseded"]),
                st.integers(0, 10),  # hours before NOW
            ),
            max_size=10,
        )
    )
    return leads, rows


@FUZZ
@given(tier_configs, histories(), st.booleans(), st.integers(-24, 72), st.integers(0, 10))
def test_candidates_never_hide_a_lead_that_is_due(
    tiers: list[tuple[int, int | None, set[str]]],
    history: tuple[list[tuple[int, str | None]], list[tuple[int, str, str, str, int]]],
    notices: bool,
    looked_before: int,
    rows_before: int,
) -> None:
    """Also when the leads were looked at before (`looked_before` hours earlier, with the
    first `rows_before` rows written then): what the store remembers from that look never
    hides a lead that is due now."""
    cfg = _policy_config(tiers, notices)
    leads, rows = history
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "state.db") as store:
        with store.transaction():
            for n, (hours, resolution) in enumerate(leads):
                ref = parse_referral(make_referral(id=f"lead-{n}", created=NOW - timedelta(days=1)))
                store.upsert([ref], lambda _r, h=hours: NOW + timedelta(hours=h), NOW)
                if resolution:
                    store.resolve(ref.id, resolution, NOW)
            earlier = NOW - timedelta(hours=looked_before)
            for n, (lead, channel, tier, state, age) in enumerate(rows):
                if n == rows_before:
                    store.policy_candidates(policy.tier_points(cfg, earlier), earlier)
                store.db.execute(
                    "INSERT INTO outbox (lead_id, kind, channel, tier, severity, state, created)"
                    " VALUES (?, ?, ?, ?, 0, ?, ?)",
                    (f"lead-{lead}", TIER, channel, tier, state, ts(NOW - timedelta(hours=age))),
                )
            if rows_before >= len(rows):
                store.policy_candidates(policy.tier_points(cfg, earlier), earlier)
        everyone = store.leads(for_policy=True)
        expected = policy.due_alerts(everyone, store.history(), cfg, NOW)
        chosen = store.policy_candidates(
            policy.tier_points(cfg, NOW),
            NOW,
            expired_notices=bool(cfg.policy.on_expired),
            resolved_notices=bool(cfg.policy.on_resolved),
        )
        shortcut = policy.due_alerts(
            store.leads(for_policy=True, ids=chosen), store.history(chosen), cfg, NOW
        )
    assert _keyed(shortcut) == _keyed(expected)


@FUZZ
@given(
    tier_configs,
    st.lists(st.integers(-3 * 24, 21 * 24), min_size=1, max_size=6),  # deadlines, hours
    st.integers(0, 15 * 24),  # hours after the first cycle
)
def test_new_leads_decided_at_once_are_not_hidden_later(
    tiers: list[tuple[int, int | None, set[str]]], deadlines: list[int], later_hours: int
) -> None:
    """A first cycle decides new leads from the referrals in hand and notes when each one's
    next tier falls due from those decisions: no lead due later is hidden by that note."""
    cfg = _policy_config(tiers, True)
    later = NOW + timedelta(hours=later_hours)
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "state.db") as store:
        with store.transaction():
            for n, hours in enumerate(deadlines):
                ref = parse_referral(make_referral(id=f"lead-{n}", created=NOW - timedelta(days=1)))
                store.upsert([ref], lambda _r, h=hours: NOW + timedelta(hours=h), NOW)
            Decide(cfg, store).new_leads(store.leads(for_policy=True), NOW, CycleResult())
        expected = policy.due_alerts(store.leads(for_policy=True), store.history(), cfg, later)
        chosen = store.policy_candidates(policy.tier_points(cfg, later), later)
        shortcut = policy.due_alerts(
            store.leads(for_policy=True, ids=chosen), store.history(chosen), cfg, later
        )
    assert _keyed(shortcut) == _keyed(expected)


def _keyed(alerts: list[Alert]) -> list[tuple[Any, ...]]:
    return sorted((a.lead_id, a.kind, a.channel, a.tier or "", a.skipped) for a in alerts)
