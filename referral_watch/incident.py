"""The structured channel for incident tools: `referral-watch+https://host/path`.

Each message becomes one JSON event per lead, shaped as PagerDuty's Events API v2 event
(https://developer.pagerduty.com/docs/events-API-v2/overview/): a tier alert *triggers* the
lead's incident, the answered and expired notices *resolve* it, a claim's "taken by" notice
*acknowledges* it (a lapse triggers it again), and every event of one lead carries the same
`dedup_key`, so PagerDuty, Opsgenie's and Grafana OnCall's PagerDuty-compatible intakes, or any
webhook receiver can de-duplicate and auto-resolve. Apprise's json:// cannot
do this: its extra payload fields are fixed per URL, not per lead.

`?routing_key=...` in the URL goes into the body (PagerDuty's integration key), never into the
request line; every other query parameter stays in the URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from referral_watch.model import CLAIMED, EXPIRED, RESOLVED, Lead, Message
from referral_watch.text import iso_utc

SCHEME_PREFIX = "referral-watch+"
SCHEMES = frozenset({"referral-watch+https", "referral-watch+http"})
SOURCE = "referral-watch"
# Apprise's notification types -> PagerDuty's severities (critical, error, warning, info).
SEVERITY = {"info": "info", "success": "info", "warning": "warning", "failure": "critical"}
# Notices that end a lead's incident: it was answered, or it expired and can no longer be.
RESOLVING = frozenset({RESOLVED, EXPIRED})
TIMEOUT_S = 15.0


def is_incident_url(url: str) -> bool:
    return url.strip().lower().startswith(SCHEME_PREFIX)


def url_problem(url: str) -> str | None:
    """Why this is not a usable incident URL, or None."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in SCHEMES:
        return (
            "use referral-watch+https://host/path (or referral-watch+http:// on a trusted network)"
        )
    if not parts.hostname:
        return "no host: use referral-watch+https://host/path"
    return None


def target(url: str) -> tuple[str, str | None]:
    """(the https URL to post to, the routing key from ?routing_key= or None)."""
    parts = urlsplit(url.strip())
    query = parse_qsl(parts.query, keep_blank_values=True)
    key = next((value for name, value in query if name == "routing_key"), None)
    rest = urlencode([(name, value) for name, value in query if name != "routing_key"])
    scheme = parts.scheme.lower().removeprefix(SCHEME_PREFIX)
    return urlunsplit((scheme, parts.netloc, parts.path or "/", rest, parts.fragment)), key


def events(message: Message, now: datetime, routing_key: str | None = None) -> list[dict[str, Any]]:
    """The events for one message: one per lead it is about (a digest names several), or one
    for a message about no lead (operations, reports, tests; its own dedup key per kind)."""
    severity = SEVERITY.get(message.notify_type, "info")
    base: dict[str, Any] = {"routing_key": routing_key} if routing_key else {}
    if not message.about:
        kind = message.kind or "message"
        return [
            {
                **base,
                "event_action": "trigger",
                "dedup_key": f"{SOURCE}/{kind}",
                "payload": _payload(
                    message.title, severity, now, kind, None, {"text": message.body}
                ),
            }
        ]
    action = (
        "resolve"
        if message.kind in RESOLVING
        else "acknowledge"
        if message.kind == CLAIMED
        else "trigger"
    )
    single = len(message.about) == 1
    out = []
    for lead, link in message.about:
        summary = message.title if single else f"{lead.referral.customer}: {message.title}"
        details = lead_details(lead, now, message, link)
        out.append(
            {
                **base,
                "event_action": action,
                "dedup_key": dedup_key(lead.id),
                "payload": _payload(summary, severity, now, message.kind, message.tier, details),
                "links": [{"href": link, "text": "Open in Partner Center"}],
            }
        )
    return out


def dedup_key(lead_id: str) -> str:
    """One incident per lead: every event about it carries this key (at most 255 characters,
    PagerDuty's limit)."""
    return f"{SOURCE}/{lead_id}"[:255]


def _payload(
    summary: str,
    severity: str,
    now: datetime,
    kind: str,
    tier: str | None,
    details: Mapping[str, Any],
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "summary": summary[:1024],  # PagerDuty's limit
        "source": SOURCE,
        "severity": severity,
        "timestamp": iso_utc(now),
        "component": "partner-center-referrals",
        "class": kind,
        "custom_details": dict(details),
    }
    if tier:
        payload["group"] = tier
    return payload


def lead_details(lead: Lead, now: datetime, message: Message, link: str) -> dict[str, Any]:
    ref = lead.referral
    return {
        "lead_id": lead.id,
        "customer": ref.customer,
        "kind": message.kind,
        "tier": message.tier,
        "deadline": iso_utc(lead.deadline),
        "remaining_seconds": int((lead.deadline - now).total_seconds()),
        "resolution": lead.resolution,
        "deal_value": float(ref.deal_value) if ref.deal_value is not None else None,
        "currency": ref.currency or None,
        "referral_kind": ref.kind,
        "link": link,
        "text": message.body,
    }


def send(url: str, message: Message, now: datetime) -> str | None:
    """Post the message's events; None when every one was accepted (2xx), else why not
    (secret-free: no URL, no routing key)."""
    import httpx

    address, key = target(url)
    try:
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as client:
            for event in events(message, now, key):
                response = client.post(address, json=event)
                if response.status_code >= 300:
                    return f"the incident endpoint answered HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        return f"the incident endpoint cannot be reached ({type(exc).__name__})"
    return None
