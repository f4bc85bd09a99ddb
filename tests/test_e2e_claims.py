"""Claims end to end (SPEC 17) over real HTTP: the sandbox as Partner Center, webhook receivers
as the team and managers channels, a real SMTP server (aiosmtpd) behind the claims' owner
channel, a real state file, and the CLI as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from referral_watch.sandbox.records import format_time

from conftest import World, faketime_env
from receivers import SmtpReceiver

ANN = "ann@contoso.com"
BOB = "bob@contoso.com"
D = timedelta(days=1)
H = timedelta(hours=1)


@pytest.fixture
def claims(world: World) -> Iterator[tuple[World, SmtpReceiver]]:
    """The world with [claims]: owner mail through a local SMTP server (the URL's own
    recipient is sales@, which must never get an owner's reminder)."""
    with SmtpReceiver() as smtp:
        world.channels["owners"] = smtp.mailto_url(to="sales@example.com")
        world.extra = '[claims]\nowner_channel = "owners"\nlapse_after = "2d"\n'
        yield world, smtp


def titles(receiver: object) -> list[str]:
    return [str(body["title"]) for body in receiver.bodies]  # type: ignore[attr-defined]


def bodies(receiver: object) -> list[str]:
    return [str(body["message"]) for body in receiver.bodies]  # type: ignore[attr-defined]


def due_in(world: World, lead: str, left: timedelta) -> None:
    """Partner Center moves the lead's deadline (expirationDateTime) to ``left`` from now."""
    world.sandbox.update(lead, expirationDateTime=format_time(datetime.now(UTC) + left))


def cli_at(world: World, moment: datetime, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process whose clock (libfaketime) starts at ``moment``."""
    env = faketime_env(moment)
    if env is None:
        pytest.skip("needs libfaketime (Debian's faketime package)")
    world.write_config()
    return subprocess.run(
        [sys.executable, "-m", "referral_watch", "--config", str(world.config_path), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_a_claim_sends_the_next_owner_tier_to_the_owner_only(
    claims: tuple[World, SmtpReceiver],
) -> None:
    world, smtp = claims
    lead = world.add_lead(age=H, customer="Fabrikam Customer Inc")
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 1  # the new lead, as ever

    taken = world.cli("claim", lead[:8], "--as", ANN, "--note", "calling them today")
    assert taken.code == 0, taken.err
    assert "claimed by ann@contoso.com" in taken.out
    claimed_by = world.cli("status", "--json").json()[0]["claimed_by"]
    assert claimed_by["email"] == ANN and claimed_by["via"] == "command"
    assert set(claimed_by) == {"email", "name", "at", "lapses_at", "via"}
    assert "ann@contoso.com" in world.cli("status").out  # the owner column

    assert world.cli("run", "--once").code == 0
    assert titles(world.team)[1] == f"Fabrikam Customer Inc taken by {ANN}"
    assert smtp.messages == []  # nothing for the owner yet: no new tier is due

    due_in(world, lead, 6 * D)  # the reminder tier (an "owner" tier by default)
    result = world.cli("run", "--once")
    assert result.code == 0, result.err
    mail = smtp.wait_for(1)
    assert mail[0].rcpt_tos == (ANN,)  # the owner's address, not the URL's sales@
    assert "Fabrikam Customer Inc" in mail[0].subject
    assert len(world.team.bodies) == 2  # the team heard no reminder
    assert world.managers.bodies == []

    due_in(world, lead, 6 * H)  # the last tier: "all" by default
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 3 and len(world.managers.bodies) == 1
    assert f"Taken by **{ANN}**" in bodies(world.team)[2]  # it names the owner
    assert len(smtp.wait_for(2)) == 2 and smtp.messages[1].rcpt_tos == (ANN,)

    explained = world.cli("status", "--explain", lead[:8]).out
    assert f"claimed by {ANN} via command" in explained
    assert "tier reminder (owner): to the owner only" in explained
    assert "answers and claims:" in explained and "calling them today" in explained


def test_a_second_persons_claim_is_refused_naming_the_owner(
    claims: tuple[World, SmtpReceiver],
) -> None:
    world, _ = claims
    lead = world.add_lead(age=H, customer="Contested Ltd")
    assert world.cli("run", "--once").code == 0
    assert world.cli("claim", lead, "--as", ANN).code == 0

    refused = world.cli("claim", lead, "--as", BOB)
    assert refused.code == 1
    assert f"claimed by {ANN}" in refused.err and "--take-over" in refused.err
    assert world.cli("status", "--json").json()[0]["claimed_by"]["email"] == ANN

    again = world.cli("claim", lead, "--as", ANN)  # the owner again: fine, refreshed
    assert again.code == 0, again.err

    taken = world.cli("claim", lead, "--as", BOB, "--take-over")
    assert taken.code == 0, taken.err
    assert f"taken over from {ANN}" in taken.out
    assert world.cli("status", "--json").json()[0]["claimed_by"]["email"] == BOB
    explained = world.cli("status", "--explain", lead).out
    assert f"take-over by {BOB} via command: taken over (from {ANN})" in explained


def test_unclaim_clears_it_and_the_team_hears_the_reminders_again(
    claims: tuple[World, SmtpReceiver],
) -> None:
    world, smtp = claims
    lead = world.add_lead(age=H, customer="Let Go BV")
    assert world.cli("run", "--once").code == 0
    assert world.cli("claim", lead, "--as", ANN).code == 0
    assert world.cli("run", "--once").code == 0  # the team hears it was taken

    dropped = world.cli("unclaim", lead)
    assert dropped.code == 0, dropped.err
    assert f"no longer claimed by {ANN}" in dropped.out
    assert world.cli("status", "--json").json()[0]["claimed_by"] is None
    assert "unclaim" in world.cli("status", "--explain", lead).out

    due_in(world, lead, 6 * D)
    assert world.cli("run", "--once").code == 0
    assert "Let Go BV" in titles(world.team)[-1] and "expires in" in titles(world.team)[-1]
    assert smtp.messages == []
    assert world.cli("unclaim", lead).out.strip() == "Let Go BV was not claimed."


def test_a_lapsed_claim_resumes_escalation(claims: tuple[World, SmtpReceiver]) -> None:
    world, smtp = claims
    now = datetime.now(UTC)
    lead = world.add_lead(age=H, customer="Forgotten Inc")
    assert world.cli("run", "--once").code == 0
    assert world.cli("claim", lead, "--as", ANN).code == 0
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 2  # new; taken by

    # Eight days on (libfaketime): the claim lapsed after two, nobody answered, the lead
    # is in the reminder tier now.
    later = cli_at(world, now + 8 * D, "run", "--once")
    assert later.returncode == 0, later.stderr
    told = titles(world.team.wait_for(4) and world.team)[2:]
    assert f"{ANN.split('@')[0]}'s claim on Forgotten Inc lapsed" in told
    assert any("expires in" in title and "Forgotten Inc" in title for title in told)
    assert smtp.messages == []  # the owner's turn is over
    status = json.loads(cli_at(world, now + 8 * D, "status", "--json").stdout)
    assert status[0]["claimed_by"] is None
    again = cli_at(world, now + 8 * D + H, "run", "--once")
    assert again.returncode == 0 and len(world.team.bodies) == 4  # each told once


def waiting_lead_with_add_to_team(world: World, customer: str) -> str:
    world.extra += "add_to_team = true\n"
    lead = world.add_lead(age=H, customer=customer)
    assert world.cli("run", "--once").code == 0
    return lead


def test_add_to_team_patches_the_referral_once_and_leaves_its_status(
    claims: tuple[World, SmtpReceiver],
) -> None:
    world, _ = claims
    lead = waiting_lead_with_add_to_team(world, "Team Player Ltd")
    before = world.sandbox.get_record(lead)
    assert before is not None
    world.sandbox.requests.clear()

    done = world.cli("claim", lead, "--as", "Ann.de.Vries@contoso.com")
    assert done.code == 0, done.err
    assert "added to the referral's team in Partner Center" in done.out

    patches = [r for r in world.sandbox.requests if r.method == "PATCH"]
    assert len(patches) == 1
    assert patches[0].headers.get("if-match") == before["eTag"]
    assert patches[0].json() == [
        {
            "op": "add",
            "path": "/team/-",
            "value": {"email": "ann.de.vries@contoso.com", "firstName": "", "lastName": ""},
        }
    ]
    after = world.sandbox.get_record(lead)
    assert after is not None
    assert (after["status"], after["substatus"]) == (before["status"], before["substatus"])
    assert [m["email"] for m in after["team"]] == ["ann.de.vries@contoso.com"]


def test_a_refusal_in_partner_center_is_shown_and_the_claim_holds(
    claims: tuple[World, SmtpReceiver],
) -> None:
    world, _ = claims
    lead = waiting_lead_with_add_to_team(world, "Locked Ltd")
    world.sandbox.fail(403, on="patch")
    done = world.cli("claim", lead, "--as", ANN)
    assert done.code == 0, done.err
    assert "warning: Partner Center refused to add ann@contoso.com" in done.out
    assert world.cli("status", "--json").json()[0]["claimed_by"]["email"] == ANN


def test_without_a_claims_section_claim_says_what_to_add(world: World) -> None:
    lead = world.add_lead(age=H)
    assert world.cli("run", "--once").code == 0
    refused = world.cli("claim", lead, "--as", ANN)
    assert refused.code == 1
    assert "[claims]" in refused.err and "Traceback" not in refused.err
    unknown = world.cli("claim", "no-such-lead", "--as", ANN)
    assert unknown.code == 1


def test_claim_without_as_and_without_a_signed_in_account_says_so(
    claims: tuple[World, SmtpReceiver],
) -> None:
    world, _ = claims
    lead = world.add_lead(age=H)
    assert world.cli("run", "--once").code == 0
    refused = world.cli("claim", lead)
    assert refused.code == 1
    assert "--as EMAIL" in refused.err


def test_on_postgresql_the_claim_is_in_the_shared_state_the_active_replica_reads(
    claims: tuple[World, SmtpReceiver], pg_url: str
) -> None:
    world, smtp = claims
    world.state_url = pg_url
    lead = world.add_lead(age=H, customer="Replicated Ltd")
    assert world.cli("run", "--once").code == 0
    taken = world.cli("claim", lead, "--as", ANN)
    assert taken.code == 0, taken.err
    due_in(world, lead, 6 * D)
    assert world.cli("run", "--once").code == 0
    assert titles(world.team)[1] == f"Replicated Ltd taken by {ANN}"
    assert smtp.wait_for(1)[0].rcpt_tos == (ANN,)
    assert world.cli("status", "--json").json()[0]["claimed_by"]["email"] == ANN


def test_an_incident_channel_acknowledges_the_leads_incident_when_it_is_taken(
    claims: tuple[World, SmtpReceiver],
) -> None:
    from receivers import WebhookReceiver

    world, _ = claims
    with WebhookReceiver("/v2/enqueue") as pager:
        world.channels["team"] = f"referral-watch+http://127.0.0.1:{pager.port}/v2/enqueue"
        lead = world.add_lead(age=H, customer="Paged Ltd")
        assert world.cli("run", "--once").code == 0
        assert world.cli("claim", lead, "--as", ANN).code == 0
        assert world.cli("run", "--once").code == 0
        trigger, acknowledge = (request.json for request in pager.wait_for(2))
    assert trigger["event_action"] == "trigger"
    assert acknowledge["event_action"] == "acknowledge"  # as PagerDuty's own acknowledge
    assert acknowledge["dedup_key"] == trigger["dedup_key"] == f"referral-watch/{lead}"
    assert acknowledge["payload"]["summary"] == f"Paged Ltd taken by {ANN}"


def test_check_config_wants_an_email_owner_channel_for_owner_tiers(world: World) -> None:
    world.extra = '[claims]\nlapse_after = "1d"\n'
    missing = world.cli("check-config")
    assert missing.code == 2
    assert "claims.owner_channel: required: policy.tiers[0], policy.tiers[1], policy.tiers[2]" in (
        missing.err
    )
    world.extra = '[claims]\nowner_channel = "team"\n'
    webhook = world.cli("check-config")
    assert webhook.code == 2
    assert "claims.owner_channel: channel 'team' is not an email channel" in webhook.err
    assert world.cli("run", "--once").code == 2  # run refuses it too
