"""Hypothesis over the whole path (issue 20): arbitrary JSON values in every referral field,
through parse -> store -> decide -> render -> status, never raise out of a stage.

Each example is a page of hostile records served the way PartnerCenter serves them (the JSON
texts as received), run through two real cycles on a real SQLite file with the real renderer;
the sender only checks that each message could go out on a wire (valid UTF-8 text).
"""

from __future__ import annotations

import json
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

from referral_watch import jsontext
from referral_watch.config import Config
from referral_watch.config.loader import parse_config
from referral_watch.cycle.runner import Cycle
from referral_watch.partner_center.client import Page
from referral_watch.partner_center.responses import read_page
from referral_watch.render import status_view
from referral_watch.sandbox.records import make_referral
from referral_watch.state.db import printable
from referral_watch.state.store import Store

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
WHOLE_PATH = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
DEEP = "__deep__"  # replaced by 1,000+ levels of nesting in the served text

ZONES = ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Etc/GMT+12", "America/St_Johns"]


@pytest.fixture(autouse=True)
def _quiet_logging() -> Iterator[None]:
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    yield
    structlog.reset_defaults()


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
extreme_numbers = st.sampled_from(
    [1e308, -1e308, 1e28, 1e30, "1e30", "1e999999999", -0.0, 2**63, 10**400, "9" * 5000, "NaN"]
)
timestamps = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59), timezones=st.timezones()
).map(lambda moment: moment.isoformat())
edge_stamps = st.sampled_from(
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59.9999999Z",
        "9999-12-31T23:59:59-12:00",
        "2026-11-24T09:00:00.0000000Z",
    ]
)
surrogates = st.sampled_from(["\ud800", "lead-\udfff", "a\ud83dz", "\udc00\ud800"])
huge_strings = st.sampled_from(["x" * 300_000, "é" * 70_000, "<!channel> " * 1000])
hostile = st.one_of(
    json_values, extreme_numbers, timestamps, edge_stamps, surrogates, huge_strings, st.just(DEEP)
)

# Where a value can go: top-level keys and the nested fields the parser reads.
FIELDS = [
    ("id",),
    ("name",),
    ("createdDateTime",),
    ("updatedDateTime",),
    ("expirationDateTime",),
    ("status",),
    ("substatus",),
    ("qualification",),
    ("type",),
    ("direction",),
    ("customerProfile",),
    ("customerProfile", "name"),
    ("customerProfile", "address"),
    ("details",),
    ("details", "dealValue"),
    ("details", "currency"),
    ("details", "notes"),
    ("details", "requirements"),
    ("team",),
    ("inviteContext",),
    ("unusedField",),
]


@st.composite
def hostile_record(draw: st.DrawFn, number: int) -> Any:
    record = make_referral(
        id=f"lead-{number}", created=NOW - timedelta(days=draw(st.integers(0, 20)), minutes=30)
    )
    for path in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True)):
        target = record
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[path[-1]] = draw(hostile)
    return record


def served(record: Any) -> str:
    """The record's JSON text as a server would send it, deep parts included."""
    text = json.dumps(record)
    depth = 1000 + len(text) % 200
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)


class HostileApi:
    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def pages(self) -> Iterator[Page]:
        yield Page(self.texts, 0, None)

    def get(self, referral_id: str) -> dict[str, Any] | None:
        return None


class WireSender:
    """Accepts every message that could be put on a wire: UTF-8 text."""

    def __init__(self) -> None:
        self.sent = 0

    def send(self, channel: str, message: Any, *, recipients: Any = ()) -> Any:
        message.title.encode("utf-8")
        message.body.encode("utf-8")
        self.sent += 1
        return type("Ok", (), {"ok": True, "error": None})()


def config(zone: str) -> Config:
    return parse_config(
        f"""
[auth]
method = "env"
[state]
path = "unused.db"
[messages]
timezone = "{zone}"
[policy]
on_expired = ["team"]
digest_over = 3
[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]
[[policy.tiers]]
name = "final"
remaining = "12h"
notify = ["team", "ops"]
[channels]
team = {{ url = "json://127.0.0.1:9/hook", timezone = "{zone}" }}
ops = "json://127.0.0.1:9/ops"
[operations]
notify = ["ops"]
"""
    )


@WHOLE_PATH
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=5).flatmap(
        lambda numbers: st.tuples(*(hostile_record(n) for n in numbers))
    ),
    st.sampled_from(ZONES),
)
def test_no_value_in_any_field_raises_out_of_a_stage(records: tuple[Any, ...], zone: str) -> None:
    texts = [served(record) for record in records]
    settings_ = config(zone)
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "state.db") as store:
        sender = WireSender()
        for moment in (NOW, NOW + timedelta(days=13)):
            result = Cycle(settings_, store, HostileApi(texts), sender, lambda m=moment: m).run()
            assert result.crashed is None, result.error
            assert result.poll_ok, result.error
            assert result.failed == 0
        leads = store.leads(include_resolved=True)
        set_aside = store.quarantined()
        # Every record is watched or set aside (a repeated id counts once).
        ids = {lead.id for lead in leads} | {item.key for item in set_aside}
        for record in records:
            given_id = record.get("id")
            if isinstance(given_id, str) and given_id.strip() and given_id != DEEP:
                assert printable(given_id.strip())[:200] in ids
            else:
                assert any(key.startswith("record:") for key in ids)
        for lead in leads:
            json.dumps(status_view.as_json(lead, NOW))
        status_view.table(leads, settings_, NOW, store.last_poll(), quarantined=set_aside)
        for item in set_aside:
            json.dumps(status_view.quarantined_json(item)).encode("utf-8")


# --- the page splitter for pages too deep for msgspec ----------------------------------------

pages = st.fixed_dictionaries(
    {"value": st.lists(json_values, max_size=5)},
    optional={"@odata.nextLink": st.text(max_size=20), "other": json_values},
)


@settings(max_examples=100, deadline=None)
@given(pages, st.sampled_from([None, 1]))
def test_the_deep_page_splitter_reads_as_json_would(
    page: dict[str, Any], indent: int | None
) -> None:
    text = json.dumps(page, indent=indent, ensure_ascii=indent is None)
    members = jsontext.top_level(text)
    assert {key: json.loads(value) for key, value in members.items()} == json.loads(text)
    items = [json.loads(item) for item in jsontext.array_items(members["value"])]
    assert json.dumps(items) == json.dumps(page["value"])  # (NaN != NaN, text compares)


# --- a served item decoded ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(pages, st.booleans())
def test_each_served_item_decodes_to_what_the_json_module_makes_of_its_text(
    page: dict[str, Any], ascii_only: bool
) -> None:
    """Page.record decodes an item with msgspec where it can and with json where msgspec
    refuses (inf, NaN, lone surrogates): a lead's fields are the same either way."""
    body = json.dumps(page, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    items, _ = read_page(httpx.Response(200, content=body), 0)
    served = Page(items, 0, None)
    for index in range(len(served)):
        try:
            expected = json.dumps(json.loads(served.text(index)), sort_keys=True)
        except ValueError as exc:  # not UTF-8 (a lone surrogate written raw): the same error
            with pytest.raises(type(exc)):
                served.record(index)
            continue
        assert json.dumps(served.record(index), sort_keys=True) == expected  # NaN compares
