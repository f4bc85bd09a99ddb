"""How the sandbox answers ``PATCH /engagements/referrals/{id}``: JSON Patch, transitions, eTags.

The documented rules (reference: "Answering a referral"; Microsoft's "Update a lead or
opportunity", https://learn.microsoft.com/en-us/partner-center/developer/patch-a-referral, which
also adds a team member with ``add /team/-``): only ``replace`` and ``add``; status
New may become New, Active or Closed; Active takes the substatus Accepted, Closed takes Won,
Lost, Declined or Expired, New takes Pending or Received; a Closed referral is final. The
record's ``eTag`` is a quoted string that changes on every update; ``If-Match`` with another
value gets 412. Pure functions: the server in sandbox.py holds the lock and the records.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

SUBSTATUSES = {
    "New": frozenset({"Pending", "Received"}),
    "Active": frozenset({"Accepted"}),
    "Closed": frozenset({"Won", "Lost", "Declined", "Expired"}),
}
NEXT_STATUSES = {
    "New": frozenset({"New", "Active", "Closed"}),
    "Active": frozenset({"Active", "Closed"}),
}
PATCH_OPS = frozenset({"replace", "add"})


class PatchRejected(Exception):
    """The PATCH is refused with this HTTP status and Partner Center error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PatchOp:
    op: str
    path: tuple[str, ...]
    value: Any


def new_etag() -> str:
    """A fresh eTag in the documented form: a quoted string."""
    return f'"{uuid.uuid4().hex}"'


def read_patch(body: bytes) -> list[PatchOp]:
    """The JSON Patch document of a request body, or PatchRejected(400)."""
    try:
        document = json.loads(body or b"null")
    except ValueError:
        raise PatchRejected(400, "invalidRequest", "The body is not JSON.") from None
    if not isinstance(document, list) or not document:
        raise PatchRejected(400, "invalidRequest", "The body must be a JSON Patch array.")
    return [_op(item) for item in document]


def _op(item: Any) -> PatchOp:
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        raise PatchRejected(400, "invalidRequest", "Each operation needs an op and a path.")
    if item.get("op") not in PATCH_OPS:
        raise PatchRejected(
            400, "invalidRequest", f"Operation {item.get('op')!r} is not supported (replace, add)."
        )
    steps = tuple(item["path"].strip("/").split("/"))
    if not item["path"].startswith("/") or "" in steps or "value" not in item:
        raise PatchRejected(400, "invalidRequest", f"Path {item['path']!r} is not valid.")
    return PatchOp(item["op"], steps, item["value"])


def check_if_match(record: dict[str, Any], if_match: str | None) -> None:
    """412 when If-Match names another version than the record's current eTag."""
    if if_match is None or if_match.strip() == "*":
        return
    if if_match.strip() != record.get("eTag"):
        raise PatchRejected(
            412,
            "preconditionFailed",
            "The referral was changed since the given eTag; read it again.",
        )


def apply_patch(record: dict[str, Any], ops: list[PatchOp], now_text: str) -> dict[str, Any]:
    """The record after the operations, with a new eTag and updatedDateTime; or PatchRejected."""
    updated: dict[str, Any] = json.loads(json.dumps(record))
    for op in ops:
        _set(updated, op)
    _check_transition(record, updated)
    updated["eTag"] = new_etag()
    updated["updatedDateTime"] = now_text
    if updated.get("substatus") == "Accepted" and record.get("substatus") != "Accepted":
        updated["acceptedDateTime"] = now_text
    return updated


def _set(record: dict[str, Any], op: PatchOp) -> None:
    target: Any = record
    for step in op.path[:-1]:
        target = target.get(step) if isinstance(target, dict) else None
        if target is None and op.op == "add" and step == "team" and step == op.path[0]:
            # A record without a team: `add /team/-` starts one. Microsoft documents the
            # append, not a missing array: the sandbox's own choice.
            target = record.setdefault("team", [])
        if not isinstance(target, dict | list):
            raise PatchRejected(400, "invalidRequest", f"Path /{'/'.join(op.path)} does not exist.")
    leaf = op.path[-1]
    # Which fields are read-only is not documented: the sandbox's own choice.
    if op.path[0] in ("id", "eTag", "createdDateTime", "direction"):
        raise PatchRejected(400, "invalidRequest", f"/{op.path[0]} cannot be changed.")
    if isinstance(target, list):
        _set_item(target, op, leaf)
        return
    if op.op == "replace" and leaf not in target:
        raise PatchRejected(400, "invalidRequest", f"Path /{'/'.join(op.path)} does not exist.")
    target[leaf] = op.value


def _set_item(items: list[Any], op: PatchOp, leaf: str) -> None:
    """An array element (RFC 6902): `add /team/-` appends a member (Microsoft's "Update a lead
    or opportunity" example), `add /team/0` inserts one, `replace /team/0` replaces one."""
    if op.op == "add" and leaf == "-":
        items.append(op.value)
        return
    if (
        not leaf.isdigit()
        or int(leaf) > len(items)
        or (op.op == "replace" and int(leaf) == len(items))
    ):
        raise PatchRejected(400, "invalidRequest", f"Path /{'/'.join(op.path)} does not exist.")
    if op.op == "add":
        items.insert(int(leaf), op.value)
    else:
        items[int(leaf)] = op.value


def _check_transition(before: dict[str, Any], after: dict[str, Any]) -> None:
    old, new = before.get("status"), after.get("status")
    allowed = NEXT_STATUSES.get(str(old), frozenset())
    if (new != old and new not in allowed) or (old == "Closed" and after != before):
        raise PatchRejected(
            400, "invalidRequest", f"A referral with status {old} cannot become {new}."
        )
    substatus = after.get("substatus")
    if substatus not in SUBSTATUSES.get(str(new), frozenset()):
        raise PatchRejected(
            400, "invalidRequest", f"Substatus {substatus} is not valid with status {new}."
        )
    # Microsoft documents a decline as carrying a statusReason, not that one without it is
    # refused: the 400 (like every 400's code and wording here) is the sandbox's own.
    if substatus == "Declined" and not str(after.get("statusReason") or "").strip():
        raise PatchRejected(400, "invalidRequest", "A declined referral needs a statusReason.")
