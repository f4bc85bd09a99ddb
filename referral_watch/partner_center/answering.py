"""Answering a lead in Partner Center (SPEC 14), for `referral-watch answer` and the console.

Read the referral by id for its current eTag and state; if it still waits, PATCH it (JSON Patch,
If-Match) with the given token (a person's delegated token from the console, or the daemon's
own); then resolve the lead in state at once and keep an audit row. Whatever happens is
recorded and logged with the person's email, never with a token. One answer per lead at a
time in this process, and a lead already answered says by whom: a double click answers once.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import structlog

from referral_watch.errors import ReferralWatchError
from referral_watch.model import (
    AuditEntry,
    Lead,
    MalformedReferral,
    awaiting_answer,
    parse_referral,
)

log = structlog.get_logger(__name__)

ACCEPT, DECLINE = "accept", "decline"
ACTIONS = (ACCEPT, DECLINE)
REASON_LIMIT = 500  # characters of a decline reason sent as statusReason


class AnswerApi(Protocol):
    def current(self, referral_id: str, *, token: str | None = None) -> dict[str, Any] | None: ...

    def patch(
        self,
        referral_id: str,
        operations: list[dict[str, Any]],
        *,
        etag: str | None,
        token: str | None = None,
    ) -> Any: ...


class AnswerStore(Protocol):
    def lead(self, lead_id: str) -> Lead | None: ...

    def record_answer(self, entry: AuditEntry, raw: str | None = None) -> None: ...


@dataclass(frozen=True)
class Person:
    """Who answers: ``who`` is their email (or the operator's name), ``name`` how to call them."""

    who: str
    name: str
    via: str  # "console" | "command"


@dataclass(frozen=True)
class Outcome:
    """What became of an answer: the audit entry kept, and the record as Partner Center now
    has it when that is worth showing (after a 412, or when the lead was no longer pending)."""

    entry: AuditEntry
    message: str
    current: dict[str, Any] | None = None
    settled: bool = False  # the lead now has the answer asked for (given now, or before)

    @property
    def ok(self) -> bool:
        return self.entry.answered


class AnswerRefused(ReferralWatchError):
    """The answer was refused before any call (an unknown action, a decline without reason)."""


def operations_for(action: str, reason: str) -> list[dict[str, Any]]:
    """The JSON Patch document for an answer (reference: "Answering a referral")."""
    if action == ACCEPT:
        return [
            {"op": "replace", "path": "/status", "value": "Active"},
            {"op": "replace", "path": "/substatus", "value": "Accepted"},
        ]
    return [
        {"op": "replace", "path": "/status", "value": "Closed"},
        {"op": "replace", "path": "/substatus", "value": "Declined"},
        {"op": "add", "path": "/statusReason", "value": reason},
    ]


def checked_request(action: str, reason: str) -> str:
    """The reason to send, once the request makes sense; AnswerRefused before any call."""
    if action not in ACTIONS:
        raise AnswerRefused(f"the answer must be accept or decline, not {action!r}")
    reason = " ".join(reason.split())
    if action == DECLINE and not reason:
        raise AnswerRefused(
            "a decline needs a reason (Partner Center shows it to the sender): give --reason TEXT"
        )
    if len(reason) > REASON_LIMIT:
        raise AnswerRefused(f"the reason is too long ({len(reason)} characters, at most 500)")
    return reason


def result_word(action: str) -> str:
    return "accepted" if action == ACCEPT else "declined"


def already_text(entry: AuditEntry) -> str:
    """'already accepted by Ann de Vries (ann@contoso.com) on 2026-12-01 08:14 UTC'."""
    who = entry.name if entry.name in ("", entry.who) else f"{entry.name} ({entry.who})"
    return f"already {entry.result} by {who or entry.who} on {entry.at:%Y-%m-%d %H:%M} UTC"


_locks_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}


def _lead_lock(lead_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(lead_id, threading.Lock())


def answer_lead(
    store: AnswerStore,
    api: AnswerApi,
    lead_id: str,
    action: str,
    reason: str,
    person: Person,
    now: datetime,
    *,
    token: str | None = None,
) -> Outcome:
    """Answer one lead in Partner Center; every outcome is audited and logged.

    Raises AnswerRefused (nothing called) for a bad request or an unknown lead.
    """
    reason = checked_request(action, reason)
    with _lead_lock(lead_id):
        lead = store.lead(lead_id)
        if lead is None:
            raise AnswerRefused(f"no lead with id {lead_id!r} in the state file")
        outcome = _answer(store, api, lead, action, reason, person, now, token)
    entry = outcome.entry
    log.info(
        "answer.done" if outcome.ok else "answer.refused",
        lead=lead_id,
        who=person.who,
        via=person.via,
        action=action,
        result=entry.result,
        request_id=entry.request_id,
        detail=entry.detail or None,
    )
    return outcome


def _answer(
    store: AnswerStore,
    api: AnswerApi,
    lead: Lead,
    action: str,
    reason: str,
    person: Person,
    now: datetime,
    token: str | None,
) -> Outcome:
    def audit(result: str, detail: str = "", request_id: str | None = None) -> AuditEntry:
        return AuditEntry(
            lead.id,
            now,
            person.who,
            person.name,
            person.via,
            action,
            result,
            reason,
            detail,
            request_id,
        )

    if lead.answered is not None:
        text = already_text(lead.answered)
        store.record_answer(audit("already", text))
        same = lead.answered.result == result_word(action)
        return Outcome(audit("already", text), f"{lead.referral.customer}: {text}", settled=same)
    try:
        record = api.current(lead.id, token=token)
        if record is None:
            text = "Partner Center no longer knows this referral (404): nothing was answered"
            store.record_answer(audit("gone", text))
            return Outcome(audit("gone", text), text)
        state = _state_of(record)
        if not awaiting_answer(_substatus_of(record)):
            text = (
                f"{lead.referral.customer}: no longer waiting for an answer, Partner Center "
                f"shows it as {state}; nothing was answered"
            )
            store.record_answer(audit("already", text))
            same = state.lower() == result_word(action)
            return Outcome(audit("already", text), text, record, settled=same)
        patched = api.patch(
            lead.id, operations_for(action, reason), etag=record.get("eTag"), token=token
        )
    except ReferralWatchError as exc:
        return _failed(store, api, lead, audit, exc, token)
    entry = audit(result_word(action), request_id=getattr(patched, "request_id", None))
    updated = getattr(patched, "record", None) or _applied(record, action, reason)
    store.record_answer(entry, json.dumps(updated, separators=(",", ":")))
    text = f"{lead.referral.customer}: {entry.result} in Partner Center"
    return Outcome(entry, text, updated, settled=True)


def _failed(
    store: AnswerStore,
    api: AnswerApi,
    lead: Lead,
    audit: Any,
    exc: ReferralWatchError,
    token: str | None,
) -> Outcome:
    status = getattr(exc, "status", None)
    result = {412: "changed", 403: "refused", 404: "gone"}.get(status or 0, "failed")
    request_id = getattr(exc, "request_id", None)
    entry = audit(result, str(exc), request_id)
    store.record_answer(entry)
    current = None
    if result == "changed":  # show the person what it is now
        try:
            current = api.current(lead.id, token=token)
        except ReferralWatchError:
            current = None
    return Outcome(entry, str(exc), current)


def _substatus_of(record: dict[str, Any]) -> str:
    try:
        return parse_referral(record).substatus
    except MalformedReferral:
        return str(record.get("substatus") or "")


def _state_of(record: dict[str, Any]) -> str:
    return _substatus_of(record) or "(no substatus)"


def _applied(record: dict[str, Any], action: str, reason: str) -> dict[str, Any]:
    """The record as the PATCH made it, when Partner Center did not send it back (204)."""
    updated = dict(record)
    for op in operations_for(action, reason):
        updated[op["path"].lstrip("/")] = op["value"]
    return updated
