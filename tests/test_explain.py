"""`status --explain ID`: a waiting lead's next alert (when, to whom); an answered lead says
who answered and when, and nothing about time left or channels."""

from __future__ import annotations

import getpass
from datetime import timedelta

from conftest import World


def test_a_waiting_lead_says_when_the_next_alert_is_due_and_to_whom(world: World) -> None:
    lead = world.add_lead(age=timedelta(days=10), customer="Waiting Lead BV")  # 4 days left
    assert world.cli("run", "--once").code == 0
    explained = world.cli("status", "--explain", lead[:8])
    assert explained.code == 0, explained.err
    assert "current tier: reminder" in explained.out
    # urgent is due at 2 days left, in about 2 days, for both of its channels
    line = next(x for x in explained.out.splitlines() if "next alert:" in x)
    assert "next alert: tier urgent at " in line and " to team, managers" in line
    assert "(in 1d 23h" in line or "(in 2d" in line


def test_after_the_last_tier_the_expired_notice_comes_next(world: World) -> None:
    lead = world.add_lead(age=timedelta(days=13, hours=18))  # 6 hours left: final is due
    assert world.cli("run", "--once").code == 0
    explained = world.cli("status", "--explain", lead)
    assert "next alert: the expired notice at " in explained.out
    assert explained.out.rstrip().count("to managers") == 1


def test_an_answered_lead_says_who_answered_and_stops(world: World) -> None:
    lead = world.add_lead(age=timedelta(days=3), customer="Declined Lead GmbH")
    assert world.cli("run", "--once").code == 0
    answered = world.cli("answer", lead, "decline", "--reason", "not our region")
    assert answered.code == 0, answered.out + answered.err
    explained = world.cli("status", "--explain", lead).out
    assert f"declined by {getpass.getuser()} via command at " in explained
    for gone in ("left", "(none due yet)", "hears this lead", "next alert"):
        assert gone not in explained


def test_a_lead_answered_in_partner_center_says_so(world: World) -> None:
    lead = world.add_lead(age=timedelta(days=3))
    assert world.cli("run", "--once").code == 0
    world.sandbox.update(lead, status="Active", substatus="Accepted")
    assert world.cli("run", "--once").code == 0
    explained = world.cli("status", "--explain", lead).out
    assert "accepted in Partner Center at " in explained
    assert "hears this lead" not in explained and "left" not in explained
