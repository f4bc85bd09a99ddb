"""The referral records the sandbox serves: one in the documented shape (``make_referral``),
and the generated sample leads of the demo and `referral-watch sandbox` (one in every tier)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

DEFAULT_NOTES = (
    "We are interested in deploying Microsoft 365 and are looking for support in training "
    "our employees. Can you help?"
)


def format_time(value: datetime) -> str:
    """Partner Center's timestamp form: UTC, 7 fractional digits, 'Z'."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond * 10:07d}Z"


def make_referral(
    *,
    id: str | None = None,
    customer: str = "Fabrikam Customer Inc",
    created: datetime,
    expiration: datetime | None = None,
    substatus: str = "Pending",
    status: str = "New",
    direction: str = "Incoming",
    type: str = "Independent",
    qualification: str = "Direct",
    country: str = "US",
    deal_value: float | str | None = 25000,
    currency: str = "USD",
    notes: str = DEFAULT_NOTES,
    team: list[dict[str, Any]] | None = None,
    invited_by: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A realistic referral record in the documented shape; ``extra`` overrides top-level keys."""
    ref_id = id or str(uuid.uuid4())
    stamp = format_time(created)
    record: dict[str, Any] = {
        "id": ref_id,
        "engagementId": str(uuid.uuid5(uuid.NAMESPACE_URL, ref_id)),
        "organizationId": "7d23e5ca-19dc-4eaa-aac8-5e6b559f0d1d",
        "organizationName": "Contoso Company",
        "name": f"{customer} opportunity",
        "createdDateTime": stamp,
        "updatedDateTime": stamp,
        "expirationDateTime": format_time(expiration) if expiration else None,
        "status": status,
        "substatus": substatus,
        "qualification": qualification,
        "type": type,
        "direction": direction,
        "customerProfile": {
            "name": customer,
            "address": {
                "addressLine1": "One Microsoft Way",
                "city": "Redmond",
                "postalCode": "98052",
                "country": country,
            },
            "size": "1to50employees",
            "team": [],
            "ids": {},
        },
        "consent": {"consentToToShareInfoWithOthers": False, "consentToContact": True},
        "details": {
            "notes": notes,
            "dealValue": deal_value,
            "currency": currency,
            "requirements": {
                "industries": [{"id": "Education"}],
                "products": [{"id": "Microsoft365"}],
                "services": [{"id": "LearningAndCertification"}],
                "solutions": [{"id": "SOL-Microsoft365", "name": "Microsoft365", "type": "Name"}],
            },
        },
        "team": list(team or []),
        "links": {
            "self": {
                "uri": f"https://api.partner.microsoft.com/v1.0/engagements/referrals/{ref_id}",
                "method": "GET",
            }
        },
    }
    if invited_by is not None:
        org_name = "Microsoft" if invited_by.lower() == "msft" else invited_by
        record["inviteContext"] = {
            "notes": "Please help with this opportunity.",
            "invitedBy": {"organizationId": invited_by, "organizationName": org_name},
        }
    record.update(extra)
    return record


# --- the server --------------------------------------------------------------------------------


# Time left of the first sample leads: one in each tier of the example config (final at 12h,
# urgent at 2d, reminder at 7d, new), the first expiring within the hour, so a first poll shows
# every kind of alert. The rest spread over the two weeks.
SAMPLE_TIME_LEFT = (
    timedelta(minutes=40),
    timedelta(hours=9, minutes=30),
    timedelta(days=1, hours=6),
    timedelta(days=4, hours=2),
    timedelta(days=13, hours=20),
)
WINDOW = timedelta(days=14)  # no expirationDateTime: the deadline is created + 14 days


def sample_id(n: int) -> str:
    """A random-looking id that is the same every run (its first 8 characters differ between
    the leads of a sample, so their short ids do too)."""
    digest = hashlib.sha256(f"referral-watch sandbox lead {n}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def sample_leads(count: int, *, now: datetime) -> Iterator[dict[str, Any]]:
    """``count`` pending incoming leads whose deadlines fall in every tier relative to ``now``,
    then a few that a poll of waiting leads skips: one outgoing per ten, one already accepted."""
    customers = ("Fabrikam", "Northwind Traders", "Contoso Pharma", "Adventure Works", "Tailspin")
    countries = ("US", "NL", "BE", "DE", "GB")
    for n in range(count):
        if n < len(SAMPLE_TIME_LEFT):
            left = SAMPLE_TIME_LEFT[n]
        else:  # spread over the window, an hour or more left
            left = timedelta(hours=1) + timedelta(minutes=(n * 397) % (13 * 24 * 60 + 23 * 60))
        yield make_referral(
            id=sample_id(n),
            customer=f"{customers[n % len(customers)]} #{n}",
            created=now - WINDOW + left,
            country=countries[n % len(countries)],
            deal_value=1000 * (1 + n % 97),
        )
    # (direction, status, substatus) of the records a poll of waiting leads does not get
    others = [("Outgoing", "New", "Pending")] * (count // 10) + [("Incoming", "Active", "Accepted")]
    for n, (direction, status, substatus) in enumerate(others[: len(others) * (count > 0)]):
        yield make_referral(
            id=sample_id(count + n),
            customer=f"{customers[n % len(customers)]} #{count + n}",
            created=now - timedelta(days=3),
            country=countries[n % len(countries)],
            direction=direction,
            status=status,
            substatus=substatus,
        )
