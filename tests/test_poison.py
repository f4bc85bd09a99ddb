"""Poison records (issue 20): one odd record from the API never silences the other leads.

Each test crafts a page through the sandbox, runs `run --once` as a user would, and checks the
three promises: the other leads are alerted, operations hear about the bad record (once), and
nothing is lost (the bad record shows in `status`, a second run repeats nothing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from referral_watch import policy
from referral_watch.cycle.intake import Intake
from referral_watch.cycle.runner import Cycle
from referral_watch.render import messages as render
from referral_watch.sandbox.records import make_referral

from conftest import World
from receivers import WebhookReceiver

NOW = datetime.now(UTC)


@pytest.fixture
def ops_world(world: World) -> Iterator[tuple[World, WebhookReceiver]]:
    """The world with an operations channel told after the first failure."""
    with WebhookReceiver() as ops:
        world.channels = {"ops": ops.json_url}
        world.extra = '[operations]\nnotify = ["ops"]\nafter_failures = 1\n'
        yield world, ops


def customers_in(bodies: list[Any]) -> list[str]:
    """The customer each alert's title names ("<urgency>: <customer>")."""
    return [str(body["title"]).split(": ", 1)[-1] for body in bodies]


def good(customer: str, hours: int = 2) -> dict[str, Any]:
    return make_referral(created=NOW - timedelta(hours=hours), customer=customer)


def serve(world: World, records: list[Any], times: int = 3, **page: Any) -> None:
    """The next `times` list requests answer exactly these records."""
    body = json.dumps({"value": records, **page}).encode()
    world.sandbox.fail(0, body=body, times=times)


def titles(receiver: WebhookReceiver) -> list[str]:
    return [str(body["title"]) for body in receiver.bodies]


def set_aside(world: World) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in world.cli("status", "--json", "--quarantined").json()}


def run_twice_and_check(
    world: World,
    ops: WebhookReceiver,
    bad: list[str],
    customers: list[str],
    stored: tuple[str, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Run two cycles: every good lead alerted once, operations told once naming each bad
    record, nothing repeated; returns what `status --quarantined` shows."""
    first = world.cli("run", "--once")
    assert first.code == 0, first.out + first.err
    assert sorted(customers_in(world.team.bodies)) == sorted(customers)
    (told,) = ops.bodies
    assert "set aside" in told["title"]
    for key in bad:  # (Markdown escapes a backslash in the message)
        assert key.replace("\\", "") in told["message"].replace("\\", "")
    second = world.cli("run", "--once")
    assert second.code == 0, second.out + second.err
    assert len(world.team.bodies) == len(customers)  # nothing twice
    assert len(ops.bodies) == 1  # told once per record
    shown = set_aside(world)
    assert sorted(shown) == sorted(bad)
    listed = {lead["customer"] for lead in world.cli("status", "--json").json()}
    assert listed == {*customers, *stored}  # (a lead set aside after storing stays listed)
    assert "set aside" in world.cli("status").out
    return shown


# --- defect 1: dates that overflow --------------------------------------------------------


def test_a_lead_created_in_year_9999_is_set_aside_and_the_others_alerted(
    ops_world: tuple[World, WebhookReceiver],
) -> None:
    world, ops = ops_world
    doomed = good("Year 9999 Inc")
    doomed.update(createdDateTime="9999-12-31T23:59:59Z", expirationDateTime=None)
    serve(world, [good("First Inc"), doomed, good("Last Inc", hours=3)])
    shown = run_twice_and_check(world, ops, [doomed["id"]], ["First Inc", "Last Inc"])
    assert shown[doomed["id"]]["stage"] == "parse"
    assert "9999" in shown[doomed["id"]]["reason"]


@pytest.mark.parametrize("zone", ["America/Los_Angeles", "Pacific/Pago_Pago", "Europe/Amsterdam"])
def test_dates_in_year_1_and_9999_block_no_message_and_no_status(
    ops_world: tuple[World, WebhookReceiver], zone: str
) -> None:
    world, ops = ops_world
    world.channels["team"] = "{ url = %s, timezone = %s }" % (  # noqa: UP031 (TOML)
        json.dumps(world.team.json_url),
        json.dumps(zone),
    )
    world.extra += f'[messages]\ntimezone = "{zone}"\n'
    year_one = good("Year One Inc")
    year_one["createdDateTime"] = "0001-01-01T00:00:00Z"
    old_deadline = good("Old Deadline Inc")  # an unreal expiration: the window applies
    old_deadline["expirationDateTime"] = "0001-01-01T00:00:00.0000000Z"
    far_deadline = good("Far Deadline Inc")
    far_deadline["expirationDateTime"] = "9999-12-31T23:59:59.9999999Z"
    serve(world, [good("Plain Inc"), year_one, old_deadline, far_deadline])
    run_twice_and_check(
        world, ops, [year_one["id"]], ["Plain Inc", "Old Deadline Inc", "Far Deadline Inc"]
    )
    for lead in world.cli("status", "--json").json():  # deadlines from the response window
        assert lead["deadline"] < "2100"
    assert world.cli("status", "--check").code == 0


# --- defect 2: lone surrogates ------------------------------------------------------------


def test_lone_surrogates_in_id_name_and_substatus_stop_nothing(
    ops_world: tuple[World, WebhookReceiver],
) -> None:
    world, ops = ops_world
    bad_id = good("Bad Id Inc")
    bad_id["id"] = "lead-\ud800-x"
    odd_name = good("Odd \ud800 Name Inc")
    odd_status = good("Odd Status Inc")
    odd_status["substatus"] = "Pend\udfffing"
    serve(world, [bad_id, good("Plain Inc"), odd_name, odd_status])
    shown = run_twice_and_check(
        world,
        ops,
        ["lead-\\ud800-x"],  # shown escaped: no terminal or database chokes on it
        ["Plain Inc", "Odd \ufffd Name Inc", "Odd Status Inc"],
    )
    assert "not usable text" in shown["lead-\\ud800-x"]["reason"]


# --- defect 3: JSON nested 1,000 levels deep ------------------------------------------------


def test_json_nested_a_thousand_deep_sets_aside_only_its_record(
    ops_world: tuple[World, WebhookReceiver],
) -> None:
    world, ops = ops_world
    deep = "[" * 1000 + "]" * 1000
    record = good("Deep Inc")
    text = json.dumps(record)[:-1] + f', "unusedField": {deep}}}'
    first, last = json.dumps(good("First Inc")), json.dumps(good("Last Inc"))
    body = f'{{"value": [{first}, {text}, {last}], "@odata.context": {deep}}}'
    world.sandbox.fail(0, body=body.encode(), times=3)
    shown = run_twice_and_check(world, ops, [record["id"]], ["First Inc", "Last Inc"])
    assert "too deeply" in shown[record["id"]]["reason"]


# --- defect 4: deal values Babel cannot format ----------------------------------------------


@pytest.mark.parametrize("value", ["1e30", 1e30, "1e28", -1e40, "9" * 5000])
def test_a_deal_value_of_1e28_or_more_is_unknown_and_every_message_goes_out(
    ops_world: tuple[World, WebhookReceiver], value: Any
) -> None:
    world, ops = ops_world
    huge = good("Huge Deal Inc")
    huge["details"]["dealValue"] = value
    serve(world, [good("Plain Inc"), huge])
    result = world.cli("run", "--once")
    assert result.code == 0, result.out + result.err
    assert sorted(customers_in(world.team.bodies)) == ["Huge Deal Inc", "Plain Inc"]
    shown = {lead["customer"]: lead for lead in world.cli("status", "--json").json()}
    assert shown["Huge Deal Inc"]["deal_value"] is None
    assert "Huge Deal Inc" in world.cli("status").out
    assert world.cli("status", "--check").code == 0
    assert ops.bodies == []  # nothing went wrong that operations must hear of


# --- the class: a failure in rendering or sending sets one lead aside ---------------------


def test_a_lead_whose_message_cannot_be_made_is_set_aside_and_the_rest_go_out(
    ops_world: tuple[World, WebhookReceiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, ops = ops_world
    real = render.render_alert

    def broken_for_one(lead: Any, *args: Any, **kwargs: Any) -> Any:
        if lead.referral.customer == "Cursed Inc":
            raise ArithmeticError("a bug in wording this one lead")
        return real(lead, *args, **kwargs)

    monkeypatch.setattr(render, "render_alert", broken_for_one)
    cursed = good("Cursed Inc")
    serve(world, [good("First Inc"), cursed, good("Last Inc")])
    shown = run_twice_and_check(
        world, ops, [cursed["id"]], ["First Inc", "Last Inc"], stored=("Cursed Inc",)
    )
    assert shown[cursed["id"]]["stage"] == "render"
    assert "ArithmeticError" in shown[cursed["id"]]["reason"]
    (lead,) = [x for x in world.cli("status", "--json").json() if x["id"] == cursed["id"]]
    assert lead["quarantined"]["stage"] == "render"
    assert world.cli("status", "--check").code == 0  # set aside, not stuck


def test_a_digest_goes_out_without_the_lead_that_breaks_it(
    ops_world: tuple[World, WebhookReceiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, ops = ops_world
    world.policy += "digest_over = 2\n"
    real_digest, real_alert = render.render_digest, render.render_alert

    def cursed(lead: Any) -> None:
        if lead.referral.customer == "Cursed Inc":
            raise ValueError("cannot word this one")

    def digest(leads: list[Any], *args: Any, **kwargs: Any) -> Any:
        for lead in leads:
            cursed(lead)
        return real_digest(leads, *args, **kwargs)

    def alert(lead: Any, *args: Any, **kwargs: Any) -> Any:
        cursed(lead)
        return real_alert(lead, *args, **kwargs)

    monkeypatch.setattr(render, "render_digest", digest)
    monkeypatch.setattr(render, "render_alert", alert)
    bad = good("Cursed Inc")
    serve(world, [good(f"Fine {n} Inc", hours=2 + n) for n in range(4)] + [bad])
    assert world.cli("run", "--once").code == 0
    (message,) = world.team.bodies  # one digest for the four others
    for n in range(4):
        assert f"Fine {n} Inc" in message["message"]
    assert "Cursed Inc" not in message["message"]
    assert bad["id"] in ops.bodies[0]["message"]
    assert list(set_aside(world)) == [bad["id"]]


def test_a_message_that_crashes_the_sender_sets_its_lead_aside(
    ops_world: tuple[World, WebhookReceiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, ops = ops_world
    from referral_watch.notify import Notifier

    real = Notifier.send

    def send(self: Notifier, channel: str, message: Any, **kwargs: Any) -> Any:
        if "Crashing Inc" in message.title:
            raise UnicodeEncodeError("utf-8", "x", 0, 1, "a bug in the sender")
        return real(self, channel, message, **kwargs)

    monkeypatch.setattr(Notifier, "send", send)
    crashing = good("Crashing Inc")
    serve(world, [good("First Inc"), crashing])
    first = world.cli("run", "--once")
    assert first.code == 0, first.out
    assert customers_in(world.team.bodies) == ["First Inc"]
    assert set_aside(world)[crashing["id"]]["stage"] == "send"
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 1  # the crash is not retried every cycle
    assert crashing["id"] in ops.bodies[0]["message"] and len(ops.bodies) == 1


# --- every cycle that throws reaches operations ------------------------------------------


def test_a_cycle_that_throws_counts_as_failed_and_operations_hear(
    ops_world: tuple[World, WebhookReceiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, ops = ops_world
    world.add_lead(age=timedelta(hours=2), customer="Waiting Inc")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug in batching")

    with monkeypatch.context() as patch:
        patch.setattr(policy, "delivery_batches", broken)
        result = world.cli("run", "--once")
    assert result.code == 1
    assert "internal error while delivering" in result.out
    assert world.team.bodies == []
    status = world.cli("status").out
    assert "FAILED: internal error while delivering: KeyError" in status
    (told,) = ops.bodies  # after_failures = 1: this failed cycle is the first
    assert "internal error while delivering" in told["message"]
    again = world.cli("run", "--once")  # the bug is gone: the alert was kept
    assert again.code == 0, again.out
    assert customers_in(world.team.bodies) == ["Waiting Inc"]
    assert "works again" in ops.bodies[-1]["title"]


def test_a_poll_that_throws_changes_nothing_and_counts_as_failed(
    ops_world: tuple[World, WebhookReceiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    world, ops = ops_world
    world.add_lead(age=timedelta(hours=2), customer="Waiting Inc")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in storing")

    with monkeypatch.context() as patch:
        patch.setattr(Intake, "_store_fresh", broken)
        result = world.cli("run", "--once")
    assert result.code == 1
    assert "internal error while polling: RuntimeError" in result.out
    assert world.cli("status", "--json").json() == []  # rolled back
    assert "internal error while polling" in ops.bodies[0]["message"]
    assert world.cli("run", "--once").code == 0
    assert len(world.team.bodies) == 1


# --- stuck deliveries make the health verdict unhealthy -----------------------------------


def test_deliveries_stuck_for_two_intervals_are_unhealthy_until_they_go_out(
    world: World,
) -> None:
    world.extra = '[schedule]\ninterval = "1m"\n'
    world.add_lead(age=timedelta(hours=2), customer="Stuck Inc")
    world.team.fail_next(2)
    from referral_watch.config.loader import load_config
    from referral_watch.notify import Notifier
    from referral_watch.partner_center.auth import EnvTokenProvider
    from referral_watch.partner_center.client import PartnerCenter
    from referral_watch.state.store import Store

    from conftest import TOKEN_ENV

    config = load_config(world.write_config())
    earlier = datetime.now(UTC) - timedelta(minutes=5)
    with (
        Store(config.state.path) as store,
        PartnerCenter(config.partner_center, EnvTokenProvider(TOKEN_ENV)) as api,
    ):
        for moment in (earlier, datetime.now(UTC)):
            Cycle(config, store, api, Notifier(config.channels), lambda m=moment: m).run()
    check = world.cli("status", "--check")
    assert check.code == 1
    assert "deliveries stuck since" in check.err
    assert world.cli("run", "--once").code == 0  # the channel takes it now
    assert world.cli("status", "--check").code == 0


def test_quarantine_reasons_name_no_token(ops_world: tuple[World, WebhookReceiver]) -> None:
    world, ops = ops_world
    record = good("Leaky Inc")
    record["createdDateTime"] = "https://x.example/?access_token=sandbox-token"
    serve(world, [good("Plain Inc"), record])
    assert world.cli("run", "--once").code == 0
    assert "sandbox-token" not in json.dumps(set_aside(world))
    assert "sandbox-token" not in json.dumps(ops.bodies)
