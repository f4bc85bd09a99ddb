"""PURE: one record of a page as the intake meets it: its JSON text, its id (even when it cannot
be decoded), the key it is set aside under, and why it cannot be read; and what a poll has met
so far (Seen), against the digests of the records the state holds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from referral_watch import jsontext
from referral_watch.model import MalformedReferral, parse_referral

Watched = list[tuple[str, str | None]]  # (lead id, digest of its stored record or None)


class Seen:
    """What a poll has met so far, against the watched leads' stored records.

    ``stored``: the digests of the watched leads' records as stored when the poll began
    (``Store.watched_digests``), ``count`` how many leads were watched. A record with one of
    those digests, met first in this poll, is its lead's, unchanged: it only leaves
    ``pending``, and nothing else is done for it. Which lead each digest is, ``watched``
    reads (``Store.digests``) when something first needs it (a record that did change, a
    lead the poll did not return), and at the latest before the poll's first write
    (``before_writing``): what it reads is the state as the poll found it. A steady poll,
    nothing changed and nothing missing, never reads it.

    The records that are read (new, changed, or met again) are noted in ``digests`` (digest
    -> lead) and ``ids``.
    """

    def __init__(self, stored: set[str], count: int, watched: Callable[[], Watched]) -> None:
        self.stored = stored
        self.pending = set(stored)  # the stored digests not met yet in this poll
        # Every watched lead has a digest of its own: the leads not met are those of pending.
        self._each_own = len(stored) == count
        self._watched = watched
        self._leads: Watched | None = None
        self._owners: dict[str, str] = {}  # stored digest -> its lead
        self._digest_of: dict[str, str] = {}  # lead -> its stored digest
        self.digests: dict[str, str] = {}
        self.ids: set[str] = set()

    def note(self, digest: str, lead_id: str) -> None:
        """A record read in this poll (new, changed, or met again)."""
        self.digests[digest] = lead_id
        self.ids.add(lead_id)

    def unchanged(self, digest: str) -> bool:
        """Whether a record is a watched lead's, unchanged, met first in this poll (its lead
        not read earlier in it either): then it is marked met."""
        if digest not in self.pending:
            return False
        if self.ids and self._owner(digest) in self.ids:
            return False
        self.pending.discard(digest)
        return True

    def all_unchanged(self, digests: list[str]) -> bool:
        """Whether ``unchanged`` holds for every record of a page, one after another (a
        steady poll's pages, nearly all), found at once: then they are all marked met. Else
        none is, and the page's records are met one by one."""
        pending = self.pending
        if not pending.issuperset(digests):
            return False
        if self.ids and not self.ids.isdisjoint(map(self._owner, digests)):
            return False
        before = len(pending)
        pending.difference_update(digests)
        if before - len(pending) != len(digests):  # one record twice in the page
            pending.update(digests)
            return False
        return True

    def met(self, digest: str) -> str | None:
        """The lead of a record met earlier in this poll with these very bytes, or None."""
        lead_id = self.digests.get(digest)
        if lead_id is None and self._met_unchanged(digest):
            lead_id = self._owner(digest)
        return lead_id

    def repeated(self, lead_id: str) -> bool:
        """Whether the lead was met earlier in this poll (another copy of its record)."""
        if lead_id in self.ids:
            return True
        self._read()
        return self._met_unchanged(self._digest_of.get(lead_id))

    def unmet(self) -> list[str]:
        """The watched leads this poll did not return (to ask about one by one)."""
        if self._each_own and not self.pending:
            return []
        leads = self._read()
        return [
            lead_id
            for lead_id, digest in leads
            if lead_id not in self.ids and not self._met_unchanged(digest)
        ]

    def before_writing(self) -> None:
        """The poll is about to write a lead: which lead each stored digest is must be read
        now, if at all (a write would change it)."""
        self._read()

    def _met_unchanged(self, digest: str | None) -> bool:
        """Whether a stored digest was met unchanged in this poll (it has left ``pending``)."""
        return digest is not None and digest in self.stored and digest not in self.pending

    def _owner(self, digest: str) -> str | None:
        self._read()
        return self._owners.get(digest)

    def _read(self) -> Watched:
        if self._leads is None:
            self._leads = self._watched()
            for lead_id, digest in self._leads:
                if digest is not None:
                    self._owners[digest] = lead_id
                    self._digest_of[lead_id] = digest
        return self._leads


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
