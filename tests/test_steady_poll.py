"""A steady poll skips what did not change (issue 29): a record whose bytes are those stored is
not decoded or parsed again; one that changed anywhere, by one byte, is handled like a new one.
Parses are counted (every Referral made), never timed."""

from __future__ import annotations

import copy
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from referral_watch import model
from referral_watch.sandbox.server import make_referral
from referral_watch.state.store import Store

from conftest import World


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The ids of the referrals parsed (a Referral made from a record), in order."""
    made: list[str] = []
    real = model.Referral

    def counting(*args: Any, **fields: Any) -> model.Referral:
        made.append(fields["id"])
        return real(*args, **fields)

    monkeypatch.setattr(model, "Referral", counting)
    yield made


def _changed(world: World, lead_id: str, change: Any) -> None:
    """Serve the lead's record with `change` applied and its eTag kept: only the bytes say
    that it changed."""
    record = copy.deepcopy(world.sandbox.get_record(lead_id))
    assert record is not None
    change(record)
    world.sandbox.add(record)


def test_a_changed_record_is_picked_up_and_an_unchanged_one_is_not_parsed_again(
    world: World, parsed: list[str]
) -> None:
    names = ("notes", "deal value", "status", "deep", "same 1", "same 2")
    ids = {name: world.add_lead(age=timedelta(days=1), customer=name) for name in names}
    assert world.cli("run", "--once").code == 0
    assert set(parsed) == set(ids.values())  # the first poll reads every record (the alerts too)
    parsed.clear()

    def deep(record: dict[str, Any]) -> None:  # one character, four levels down
        record["details"]["requirements"]["industries"][0]["id"] = "Educatiom"

    _changed(world, ids["notes"], lambda r: r["details"].update(notes="Call Ann first."))
    _changed(world, ids["deal value"], lambda r: r["details"].update(dealValue=25001))
    _changed(world, ids["status"], lambda r: r.update(status="Active"))
    _changed(world, ids["deep"], deep)
    assert world.cli("run", "--once").code == 0
    changed = [ids[name] for name in ("notes", "deal value", "status", "deep")]
    assert sorted(parsed) == sorted(changed)  # each once; the two unchanged ones not at all

    with Store(world.state_path) as store:
        leads = {lead.id: lead for lead in store.leads()}
    assert len(leads) == 6  # none is absent: the unchanged ones were seen
    assert leads[ids["notes"]].referral.notes == "Call Ann first."
    assert leads[ids["deal value"]].referral.deal_value == 25001
    assert leads[ids["status"]].referral.status == "Active"
    stored = json.loads(leads[ids["deep"]].referral.raw)
    assert stored["details"]["requirements"]["industries"][0]["id"] == "Educatiom"
    shown = {row["id"]: row for row in world.cli("status", "--json").json()}
    assert shown[ids["deal value"]]["deal_value"] == 25001

    parsed.clear()
    assert world.cli("run", "--once").code == 0
    assert parsed == []  # nothing changed: nothing parsed


def test_after_the_upgrade_from_sha256_digests_each_record_is_read_once_and_nothing_is_resent(
    world: World, parsed: list[str]
) -> None:
    ids = [world.add_lead(age=timedelta(days=1), customer=f"Upgrade {n}") for n in range(3)]
    assert world.cli("run", "--once").code == 0
    sent = len(world.team.bodies)  # type: ignore[attr-defined]
    assert sent > 0
    # The state as 0.2 left it: each digest SHA-256 of the record, cut to 32 hex digits.
    with Store(world.state_path) as store, store.transaction():
        for lead in store.leads():
            digest = hashlib.sha256(lead.referral.raw.encode()).hexdigest()[:32]
            store.db.execute("UPDATE leads SET digest = ? WHERE id = ?", (digest, lead.id))
    parsed.clear()
    assert world.cli("run", "--once").code == 0
    assert sorted(parsed) == sorted(ids)  # no stored digest matches: each record read again
    assert len(world.team.bodies) == sent  # type: ignore[attr-defined]  # but nothing new to say
    parsed.clear()
    assert world.cli("run", "--once").code == 0
    assert parsed == []  # the digests are current again


class _Page(http.server.BaseHTTPRequestHandler):
    """One page whose second record is not UTF-8 (a byte no UTF-8 text has)."""

    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_record_that_is_not_utf8_is_set_aside_and_the_others_are_watched(
    world: World,
) -> None:
    now = datetime.now(UTC)
    good = make_referral(created=now - timedelta(days=1), customer="Good Bytes Ltd")
    bad = json.dumps(make_referral(created=now, customer="Bad \u00e9 Bytes"), ensure_ascii=False)
    bad_bytes = bad.encode("latin-1")  # é as one byte: not UTF-8
    _Page.body = b'{"value":[' + json.dumps(good).encode() + b"," + bad_bytes + b"]}"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ours, write = f"http://127.0.0.1:{server.server_address[1]}/v1.0", world.write_config

    def written() -> Path:
        path = write()
        path.write_text(path.read_text().replace(world.sandbox.base_url, ours))
        return path

    world.write_config = written  # type: ignore[method-assign]
    try:
        outcome = world.cli("run", "--once")
    finally:
        server.shutdown()
        server.server_close()
    with Store(world.state_path) as store:
        assert [lead.id for lead in store.leads()] == [good["id"]]
        [set_aside] = store.quarantined()
    assert set_aside.key.startswith("record:") and "not UTF-8" in set_aside.reason
    assert "internal error" not in outcome.err  # the poll itself went through
