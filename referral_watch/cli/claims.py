"""`referral-watch claim` and `unclaim`: take a lead without answering it yet (SPEC 17)."""

from __future__ import annotations

import click

from referral_watch.cli.context import Context, fail, now_utc, resolve_id
from referral_watch.config import Config
from referral_watch.text import terminal


@click.command()
@click.argument("lead_id", metavar="ID")
@click.option(
    "--as",
    "email",
    metavar="EMAIL",
    help="The owner's email address (default: the account `referral-watch login` signed in).",
)
@click.option("--note", default="", help="Why, or what happens next (in the audit and notice).")
@click.option(
    "--take-over", is_flag=True, help="Take the lead over from the person who holds it now."
)
@click.pass_obj
def claim(obj: Context, lead_id: str, email: str | None, note: str, take_over: bool) -> None:
    """Take ownership of a lead without answering it yet: its reminders go to you."""
    from referral_watch.claiming import NO_CLAIMS, claim_lead
    from referral_watch.partner_center.answering import Person
    from referral_watch.state.store import Store

    config = obj.config()
    if config.claims is None:
        fail(NO_CLAIMS)
    person = Person(*_owner(config, email), "command")
    with Store(config.state.location, create=False) as store:
        full_id = resolve_id(store, lead_id)
        if config.claims.add_to_team:
            from referral_watch.partner_center.auth import token_provider
            from referral_watch.partner_center.client import PartnerCenter

            with PartnerCenter(config.partner_center, token_provider(config)) as api:
                outcome = claim_lead(
                    store, config, full_id, person, now_utc(), note=note, take_over=take_over,
                    api=api,
                )  # fmt: skip
        else:
            outcome = claim_lead(
                store, config, full_id, person, now_utc(), note=note, take_over=take_over
            )
    if not outcome.ok:
        fail(outcome.message)
    click.echo(terminal(f"{outcome.message}."))
    if outcome.team is not None:
        line = outcome.team.message if outcome.team.ok else f"warning: {outcome.team.message}"
        click.echo(terminal(f"{line} (the claim holds here either way)."))


def _owner(config: Config, email: str | None) -> tuple[str, str]:
    """(email, name) of who claims: --as, else the account `login` signed in."""
    if email:
        return email, ""
    if config.auth.method == "msal":
        from referral_watch.partner_center.token_cache import cached_account

        account = cached_account(config.cache_path)
        if account is not None and "@" in account[0]:
            return account
    fail(
        "whose claim? give --as EMAIL (nobody is signed in with `referral-watch login` whose "
        "address could be used)"
    )


@click.command()
@click.argument("lead_id", metavar="ID")
@click.pass_obj
def unclaim(obj: Context, lead_id: str) -> None:
    """End a lead's claim: its reminders go to the team again."""
    import getpass

    from referral_watch.claiming import unclaim_lead
    from referral_watch.partner_center.answering import Person
    from referral_watch.state.store import Store

    config = obj.config()
    operator = getpass.getuser()
    with Store(config.state.location, create=False) as store:
        full_id = resolve_id(store, lead_id)
        outcome = unclaim_lead(
            store, config, full_id, Person(operator, operator, "command"), now_utc()
        )
    click.echo(terminal(f"{outcome.message}."))
