"""`referral-watch webhooks ...`: the Partner Center webhook registration."""

from __future__ import annotations

import sys
from typing import Any

import click

from referral_watch.cli.context import (
    EXIT_FAILED,
    Context,
    now_utc,
)
from referral_watch.config import Config
from referral_watch.errors import ReferralWatchError

# --- webhooks -------------------------------------------------------------------------------


@click.group()
def webhooks() -> None:
    """Manage the Partner Center webhook registration (instant alerts, see docs/webhooks.md)."""


def _registration(obj: Context) -> tuple[Config, Any]:
    from referral_watch.partner_center.webhooks.registration import (
        Registration,
        registration_tokens,
    )

    config = obj.config()
    return config, Registration(config, registration_tokens(config))


@webhooks.command("register")
@click.option(
    "--replace",
    is_flag=True,
    help="Take the registration over from another integration, keeping its events "
    "(`unregister` puts it back).",
)
@click.pass_obj
def webhooks_register(obj: Context, replace: bool) -> None:
    """Register {server.public_url}{webhooks.path} for referral-created, referral-updated and
    test-created; refuses while another integration holds the company's registration."""
    from referral_watch.partner_center.webhooks.registration import (
        ReplacedMemory,
        describe,
        webhook_url,
    )

    config, api = _registration(obj)
    target = webhook_url(config)
    with api:
        done = api.register(target, ReplacedMemory(config.state.location), replace=replace)
    registered = done.registration
    url = registered.get("WebhookUrl", target)
    events = ", ".join(registered.get("WebhookEvents", []))
    subscriber = registered.get("SubscriberId", "?")
    if done.action == "unchanged":
        click.echo(f"Already registered: {url} for {events} (subscriber {subscriber}).")
        return
    verb = {"created": "Registered", "updated": "Updated the registration of"}.get(
        done.action, "Took over the registration for"
    )
    click.echo(f"{verb} {url} for {events} (subscriber {subscriber}).")
    if done.replaced is not None:
        click.echo(
            f"Replaced {describe(done.replaced)}; it is kept in the state, and "
            "`referral-watch webhooks unregister` puts it back."
        )


@webhooks.command("show")
@click.pass_obj
def webhooks_show(obj: Context) -> None:
    """Show Partner Center's webhook registration and whether it is ours."""
    from referral_watch.partner_center.webhooks.registration import (
        ReplacedMemory,
        describe,
        same_url,
        webhook_url,
    )

    config, api = _registration(obj)
    with api:
        registered = api.show()
    try:
        ours: str | None = webhook_url(config)
    except ReferralWatchError:
        ours = None
    replaced = ReplacedMemory(config.state.location).get()
    if registered is None:
        click.echo("No webhook registration: run `referral-watch webhooks register`.")
    else:
        url = str(registered.get("WebhookUrl", "?"))
        mine = ours is not None and same_url(registered, ours)
        click.echo(f"URL:        {url}")
        click.echo(f"Events:     {', '.join(registered.get('WebhookEvents', []))}")
        click.echo(f"Subscriber: {registered.get('SubscriberId', '?')}")
        click.echo(f"Ours:       {'yes' if mine else 'no'}")
        if not mine and ours is not None:
            click.echo(
                f"Note: another integration holds it; this config would register {ours} "
                "(`webhooks register` refuses; see its --replace)."
            )
    if replaced is not None:
        click.echo(f"Replaced:   {describe(replaced)} (`webhooks unregister` puts it back)")


@webhooks.command("unregister")
@click.pass_obj
def webhooks_unregister(obj: Context) -> None:
    """Put back the registration `register --replace` took over, or delete ours (polling
    carries on alone)."""
    from referral_watch.partner_center.webhooks.registration import (
        ReplacedMemory,
        describe,
        webhook_url,
    )

    config, api = _registration(obj)
    target = webhook_url(config)
    with api:
        done = api.unregister(target, ReplacedMemory(config.state.location))
    if done.restored is not None:
        click.echo(f"Put back the registration it replaced: {describe(done.restored)}.")
    elif done.action == "deleted":
        click.echo("Unregistered.")
    else:
        click.echo("There was no webhook registration.")


@webhooks.command("test")
@click.pass_obj
def webhooks_test(obj: Context) -> None:
    """Ask Partner Center for a test event and wait (up to a minute) until it arrives here
    and verifies; needs the daemon running on this state."""
    from referral_watch.partner_center.webhooks.registration import (
        TEST_WAIT,
        wait_for_test_event,
        webhook_url,
    )

    config, api = _registration(obj)
    with api:
        registered = api.ensure_test_event(webhook_url(config))
        click.echo(
            f"1. Registered: {registered.get('WebhookUrl', '?')} "
            f"({', '.join(registered.get('WebhookEvents', []))})"
        )
        since = now_utc()
        correlation = api.request_test()
        click.echo(f"2. Asked Partner Center for a test event (correlation id {correlation}).")
        click.echo(f"3. Waiting up to {TEST_WAIT:.0f}s for it to arrive and verify ...")
        outcome = wait_for_test_event(
            api,
            correlation,
            config.state.location,
            since,
            report=lambda line: click.echo(f"   {line}"),
        )
    if outcome.ok and outcome.arrived is not None:
        click.echo(f"4. Arrived and verified at {outcome.arrived:%H:%M:%S} UTC: webhooks work.")
        return
    click.echo(
        "4. FAILED: the test event did not arrive verified. Is `referral-watch run` up with "
        "this state, is server.public_url reachable from the internet, and do the "
        "daemon's logs show webhook.rejected?"
    )
    sys.exit(EXIT_FAILED)
