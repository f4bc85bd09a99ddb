"""PURE: one record of a page as the intake meets it: its JSON text, its id (even when it cannot
be decoded), the key it is set aside under, and why it cannot be read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from referral_watch import jsontext
from referral_watch.model import MalformedReferral, parse_referral


@dataclass
class Seen:
    """What this poll has received so far: records (by digest) and lead ids."""

    digests: dict[str, str] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)

    def note(self, digest: str, lead_id: str) -> None:
        self.digests[digest] = lead_id
        self.ids.add(lead_id)

    def unchanged(self, digest: str, stored: dict[str, str]) -> bool:
        """Whether a record is a watched lead's, unchanged (``stored``: its digest -> the lead)
        and met first in this poll: then it is noted seen, and nothing else is to be done."""
        lead_id = stored.get(digest)
        if lead_id is None or digest in self.digests or lead_id in self.ids:
            return False
        self.note(digest, lead_id)
        return True


UNDECODED = object()


def canonical_bytes(record: Any) -> bytes | None:
    """The JSON of a record from a source that keeps no bytes as served (not a PartnerCenter
    page), serialized canonically: the same text parse_referral would store, as UTF-8; None
    when it cannot be serialized."""
    try:
        text = json.dumps(record, separators=(",", ":"), sort_keys=True)
    except (ValueError, TypeError, RecursionError):
        return None
    return text.encode("utf-8", "surrogatepass")


def text_of(page: Any, index: int, data: bytes | memoryview) -> tuple[str, str]:
    """(the record's JSON text, "") or ("", why it cannot be read: not UTF-8)."""
    try:
        return (page.text(index) if hasattr(page, "text") else bytes(data).decode("utf-8")), ""
    except UnicodeDecodeError as exc:
        return "", f"unreadable record (not UTF-8: {exc.reason} at byte {exc.start})"


def decode(page: Any, index: int) -> tuple[Any, str]:
    """(the record, "") or (None, why it cannot be decoded)."""
    try:
        return page.record(index), ""
    except RecursionError:
        return None, "unreadable record (JSON nested too deeply)"
    except ValueError as exc:
        return None, f"unreadable record (not JSON: {str(exc)[:80]})"


def record_key(raw: str) -> str:
    """The quarantine key of a record without a usable id: the same record, the same key."""
    return "record:" + hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()[:16]


def unparsable(record: Any, raw: str) -> str:
    try:
        parse_referral(record, raw)
    except MalformedReferral as exc:
        return str(exc)
    except Exception as exc:
        return f"unreadable record ({type(exc).__name__})"
    return "record has no id"


def lead_id_of(record: Any) -> str | None:
    if isinstance(record, dict):
        lead_id = record.get("id")
        if lead_id is None:  # any case: "ID", "Id"
            lead_id = next((v for k, v in record.items() if str(k).lower() == "id"), None)
    else:
        lead_id = None
    return lead_id.strip() if isinstance(lead_id, str) and lead_id.strip() else None


def id_in_text(raw: str) -> str | None:
    """The id of a record too deep (or too odd) to decode, read from its text."""
    lead_id = jsontext.member(raw, "id")
    return lead_id.strip() if isinstance(lead_id, str) and lead_id.strip() else None
