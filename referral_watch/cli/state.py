"""`referral-watch state migrate` and `referral-watch report`: the state moved, and summed up."""

from __future__ import annotations

import click

from referral_watch.cli.context import (
    Context,
    fail,
    now_utc,
)
from referral_watch.config import parse_duration
from referral_watch.errors import LockedError

# --- state ---------------------------------------------------------------------------------


@click.group()
def state() -> None:
    """The state's storage: move it from the SQLite file into PostgreSQL."""


@state.command("migrate")
@click.option("--to", "url", required=True, metavar="URL", help="postgresql://... (empty).")
@click.option("--from", "path", metavar="PATH", help="The SQLite file (default: state.path).")
@click.pass_obj
def state_migrate(obj: Context, url: str, path: str | None) -> None:
    """Copy the SQLite state into an empty PostgreSQL database, then compare counts."""
    from pathlib import Path

    from referral_watch.redact import database_url
    from referral_watch.state.dialect import is_url
    from referral_watch.state.lock import InstanceLock
    from referral_watch.state.migrate import migrate
    from referral_watch.state.replica import OnceLock

    if not is_url(url):
        raise click.BadParameter("give a postgresql://user@host/database URL", param_hint="--to")
    source = Path(path) if path else obj.config().state.path
    shown = database_url(url)
    try:
        with InstanceLock(source.with_name(source.name + ".lock")), OnceLock(url, shown):
            copied = migrate(source, url)
    except LockedError as exc:  # a daemon still uses the file, or a replica the database
        fail(str(exc))
    for table in copied:
        mark = "" if table.same else "  (differs)"
        click.echo(f"{table.table:<20} {table.source:>9} -> {table.target:>9}{mark}")
    if not all(table.same for table in copied):
        fail(f"the row counts of {source} and {shown} differ: do not switch to the database")
    rows = sum(table.source for table in copied)
    click.echo(f"Copied {rows} rows from {source} to {shown}.")
    click.echo("Now set [state] url to it (and remove path), then start the replicas.")


# --- report -------------------------------------------------------------------------------


@click.command()
@click.option(
    "--since",
    default="7d",
    show_default=True,
    metavar="DURATION",
    help='The period to look back over, e.g. "7d" or "30d".',
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "markdown", "json", "csv"]),
    default="text",
    show_default=True,
    help="text or markdown for people; json or csv for spreadsheets and BI tools.",
)
@click.pass_obj
def report(obj: Context, since: str, fmt: str) -> None:
    """Print the summary a [[reports]] entry sends: open, answered and expired leads."""
    from referral_watch.render.report import render_report, summarize
    from referral_watch.state.store import Store

    try:
        period = parse_duration(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    if not period:
        raise click.BadParameter("the period must be longer than 0s", param_hint="--since")
    config = obj.config()
    with Store(config.state.location, create=False) as store:
        leads, events = store.leads(include_resolved=True), store.claim_events()
    summary = summarize(leads, now_utc(), period, events)
    click.echo(render_report(summary, fmt, config.messages.timezone), nl=False)
