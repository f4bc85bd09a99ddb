"""`silences`: the running silences, with lead, customer, until, reason and who set them."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime, timedelta

from conftest import World


def test_silences_lists_each_running_silence(world: World) -> None:
    assert world.cli("silences").out.strip() == "No lead is silenced."  # no state yet: no error
    quiet = world.add_lead(age=timedelta(days=2), customer="Quiet Customer Ltd")
    loud = world.add_lead(age=timedelta(days=3), customer="Loud Customer Ltd")
    assert world.cli("run", "--once").code == 0
    assert world.cli("silence", quiet[:8], "--for", "2d", "--reason", "waiting on legal").code == 0
    table = world.cli("silences")
    assert table.code == 0, table.err
    row = next(line for line in table.out.splitlines() if "Quiet Customer Ltd" in line)
    assert row.startswith(quiet[:8])
    assert "waiting on legal" in row and getpass.getuser() in row
    assert "Loud Customer Ltd" not in table.out
    listed = world.cli("silences", "--json").json()
    assert [item["id"] for item in listed] == [quiet]
    until = datetime.fromisoformat(listed[0]["until"].replace("Z", "+00:00"))
    assert timedelta(days=1, hours=23) < until - datetime.now(UTC) <= timedelta(days=2)
    assert listed[0]["reason"] == "waiting on legal" and listed[0]["by"] == getpass.getuser()
    assert world.cli("unsilence", quiet).code == 0
    assert world.cli("silences", "--json").json() == []
    assert loud  # never silenced
