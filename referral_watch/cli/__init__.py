"""The command line: the only module that prints for the user or picks an exit code.

Heavy libraries (apprise, msal, apscheduler) are imported inside the commands that need them,
so `--help` and `status --check` stay fast.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import datetime
from typing import Any

import click

from referral_watch import __version__
from referral_watch.cli.claims import claim, unclaim
from referral_watch.cli.context import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    Context,
    fail,
    now_utc,
    print_config_problems,
    resolve_id,
)
from referral_watch.cli.sandbox import demo, sandbox
from referral_watch.cli.state import report, state
from referral_watch.cli.webhooks import webhooks
from referral_watch.config import Config, parse_duration
from referral_watch.config.loader import (
    config_text,
    environment,
    find_config_path,
    find_env_file,
)
from referral_watch.errors import ConfigError, LockedError, ReferralWatchError, StateError
from referral_watch.text import terminal


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="referral-watch")
@click.option("--config", "config_path", metavar="PATH", help="Config file (TOML).")
@click.option(
    "--env-file",
    metavar="PATH",
    help="KEY=VALUE lines filling ${NAME} in the config (default: a .env beside it).",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    show_default=True,
    help="Log lines as JSON, or readable on a terminal.",
)
@click.option("-v", "--verbose", count=True, help="More log detail (-vv: libraries too).")
@click.pass_context
def cli(
    ctx: click.Context, config_path: str | None, env_file: str | None, log_format: str, verbose: int
) -> None:
    """Make sure no Partner Center lead or co-sell opportunity expires unanswered."""
    from referral_watch import logs

    # A command's own result goes to stdout; at the default verbosity only the daemon logs
    # at info level, one-shot commands show warnings and errors only (run --once: see run).
    logs.configure(log_format, verbose, one_shot=ctx.invoked_subcommand != "run")
    ctx.obj = Context(config_path, log_format, verbose, env_file)


def main(argv: list[str] | None = None) -> None:
    """Entry point; always ends in sys.exit with the contract's exit code."""
    try:
        code = cli.main(args=argv, prog_name="referral-watch", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_CONFIG if isinstance(exc, click.UsageError) else EXIT_FAILED)
    except ConfigError as exc:
        print_config_problems(exc)
        sys.exit(EXIT_CONFIG)
    except LockedError as exc:
        fail(str(exc), EXIT_LOCKED)
    except ReferralWatchError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


# --- run ----------------------------------------------------------------------------------


@cli.command()
@click.option("--once", is_flag=True, help="One cycle (poll, decide, deliver), then exit.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="One cycle that prints each message with its channel and recipients instead of "
    "sending it, and records nothing (implies --once).",
)
@click.pass_obj
def run(obj: Context, once: bool, dry_run: bool) -> None:
    """Poll Partner Center and send reminders (the daemon)."""
    once = once or dry_run  # nothing is recorded, so a second dry cycle would repeat the first
    if once:
        from referral_watch import logs

        logs.configure(obj.log_format, obj.verbose, one_shot=True)
    config = checked(obj.config())
    if dry_run:
        sys.exit(run_dry(config))
    if once:
        result = run_once(config)
        click.echo(summary_line(result))
        for failure in result.failures[:10]:
            click.echo(f"  - {terminal(failure)}")
        sys.exit(EXIT_OK if result.ok else EXIT_FAILED)
    from referral_watch import daemon

    sys.exit(daemon.serve(config, reload=lambda: checked(obj.load())))


def checked(config: Config) -> Config:
    """Beyond the schema: every channel URL understood by Apprise, every template renders,
    the console's and webhooks' rules (config_check.cross_problems).

    Found at start (exit 2), not at 3 a.m. when the first alert for that channel is due.
    """
    from referral_watch.config_check import cross_problems

    problems = cross_problems(config)
    if problems:
        raise ConfigError(problems, str(config.source) if config.source else None)
    return config


def run_once(config: Config) -> Any:
    from referral_watch.daemon import new_cycle
    from referral_watch.partner_center.auth import token_provider
    from referral_watch.partner_center.client import PartnerCenter
    from referral_watch.state.replica import state_lock
    from referral_watch.state.store import Store

    with (
        state_lock(config),
        Store(config.state.location) as store,
        PartnerCenter(config.partner_center, token_provider(config)) as api,
    ):
        return new_cycle(config, store, api).run()


def run_dry(config: Config) -> int:
    """`run --dry-run`: the messages one cycle would send, printed; nothing sent or kept."""
    from referral_watch.dry_run import dry_run
    from referral_watch.partner_center.auth import token_provider
    from referral_watch.partner_center.client import PartnerCenter

    with PartnerCenter(config.partner_center, token_provider(config)) as api:
        result, previews = dry_run(config, api)
    click.echo("Dry run: these messages are shown, not sent; the state is left as it was.")
    for number, preview in enumerate(previews, 1):
        click.echo("")
        heading = f"[{number}] {preview.channel} -> {preview.to} ({preview.notify_type})"
        click.echo(terminal(heading))
        click.echo(terminal(f"    {preview.title}"))
        for line in preview.body.strip().splitlines():
            click.echo(terminal(f"    {line}".rstrip()))
    click.echo("")
    if not result.poll_ok:
        click.echo(f"Poll failed: {terminal(result.error or '')}")
        return EXIT_FAILED
    channels = Counter(preview.channel for preview in previews)
    per_channel = ", ".join(f"{name} {count}" for name, count in sorted(channels.items()))
    text = (
        f"Polled {result.fetched} leads ({result.new} new, {result.resolved} resolved); "
        f"a real run would send {len(previews)} message(s)"
        + (f" ({per_channel})" if per_channel else "")
    )
    if result.held:
        text += f" and hold {result.held} for quiet hours"
    if result.malformed:
        text += f"; {result.malformed} malformed records skipped (see log)"
    click.echo(text + ". Nothing was sent or recorded.")
    return EXIT_OK if result.ok else EXIT_FAILED


def summary_line(result: Any) -> str:
    if not result.poll_ok:
        return f"Poll failed: {result.error}"
    text = (
        f"Polled {result.fetched} leads ({result.new} new, {result.resolved} resolved); "
        f"{result.delivered} messages delivered, {result.failed} failed"
    )
    if result.held:
        text += f", {result.held} held for quiet hours"
    if result.malformed:
        text += f"; {result.malformed} malformed records skipped (see log)"
    return text + "."


# --- status -------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON array instead of a table.")
@click.option("--all", "show_all", is_flag=True, help="Include resolved leads.")
@click.option("--check", is_flag=True, help="Health probe: exit 0 if the last poll is recent.")
@click.option("--explain", metavar="ID", help="Show which channels a lead routes to and why.")
@click.option("--quarantined", "set_aside", is_flag=True, help="The records set aside, and why.")
@click.pass_obj
def status(
    obj: Context, as_json: bool, show_all: bool, check: bool, explain: str | None, set_aside: bool
) -> None:
    """The watched leads, most urgent first."""
    config = obj.config()
    if check:
        sys.exit(health_check(config))
    from referral_watch.render import status_view
    from referral_watch.state.store import Store

    now = now_utc()
    if config.state.url is None and not config.state.path.exists() and not explain:
        # Nothing polled yet: an empty list, not an error (the table says what to run).
        leads, last, all_ids, quarantined = [], None, [], []
    else:
        with Store(config.state.location, create=False) as store:
            if explain:
                click.echo(explain_routing(config, store, explain, now))
                return
            leads = store.leads(include_resolved=show_all)
            last = store.last_poll()
            all_ids = store.ids_starting("")  # short ids must be unique among all of them
            quarantined = store.quarantined()

    if set_aside:
        if as_json:
            click.echo(json.dumps([status_view.quarantined_json(q) for q in quarantined], indent=2))
        else:
            click.echo("\n".join(status_view.quarantine_lines(quarantined, limit=10**9)) or
                       "No record is set aside.")  # fmt: skip
        return
    if as_json:
        held = {q.lead_id: q for q in quarantined if q.lead_id}
        shown = [status_view.as_json(lead, now, held.get(lead.id)) for lead in leads]
        click.echo(json.dumps(shown, indent=2))
        return
    click.echo(status_view.table(leads, config, now, last, all_ids, quarantined))


def health_check(config: Config) -> int:
    from referral_watch.ops import health
    from referral_watch.state.store import Store

    try:
        with Store(config.state.location, create=False) as store:
            last = store.last_success()
            stuck = store.deliveries_stuck_since()
            event = store.last_webhook_event() if config.webhooks is not None else None
    except StateError as exc:
        click.echo(terminal(f"unhealthy: {exc}"), err=True)
        return EXIT_FAILED
    webhooks = ""
    if config.webhooks is not None:
        webhooks = f"; last webhook event {f'{event:%Y-%m-%d %H:%M:%S} UTC' if event else 'never'}"
    ok, reason = health(last, config.schedule.interval, now_utc(), stuck)
    if ok:
        click.echo(f"healthy: {reason}{webhooks}")
        return EXIT_OK
    if config.state.url is not None:
        from referral_watch.state.replica import active_elsewhere

        other = active_elsewhere(config.state.url, config.state.shown)
        if other is not None:  # a standby: healthy while another host's replica is active
            click.echo(f"healthy: standby (the active replica is {other})")
            return EXIT_OK
    click.echo(f"unhealthy: {reason}{webhooks}", err=True)
    return EXIT_FAILED


def explain_routing(config: Config, store: Any, lead_id: str, now: datetime) -> str:
    from referral_watch.render import status_view

    full_id = resolve_id(store, lead_id)
    return str(status_view.explain(store.lead(full_id), config, now, store.audit(full_id)))


# --- check-config / test-notify --------------------------------------------------------


@cli.command("check-config")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit 2): placeholders, unset "
              "variables.")  # fmt: skip
@click.pass_obj
def check_config(obj: Context, strict: bool) -> None:
    """Validate the config file and print every problem and warning."""
    from referral_watch.config_check import inspect_config
    from referral_watch.state.folder import state_folder_problem

    path = find_config_path(obj.config_path)
    env = environment(find_env_file(obj.env_file, path))
    found = inspect_config(config_text(path), env, path)
    config = found.config
    # (With state.url there is no state folder: the state lives in PostgreSQL.)
    if config is not None and config.state.url is None:
        problem = state_folder_problem(config.state.path.parent)
        if problem:  # the file is fine; this user just cannot run it here yet
            found.warnings.append(f"state.path: {problem}")
    if found.errors:
        print_config_problems(ConfigError(found.errors, str(path)))
    for warning in found.warnings:
        click.echo(f"warning: {warning}", err=True)
    if config is not None and not found.errors:
        noted = f"; {len(found.warnings)} warning(s)" if found.warnings else ""
        click.echo(
            f"{path}: valid ({len(config.policy.tiers)} tiers, {len(config.channels)} channels, "
            f"auth method {config.auth.method}{noted})"
        )
    if found.errors or (strict and found.warnings):
        sys.exit(EXIT_CONFIG)


@cli.command("test-notify")
@click.option("--channel", "channels", multiple=True, metavar="NAME", help="Only this channel.")
@click.pass_obj
def test_notify(obj: Context, channels: tuple[str, ...]) -> None:
    """Send a clearly marked test message to each (or the named) channel."""
    from referral_watch.notify import Notifier
    from referral_watch.render.channels import style_for
    from referral_watch.render.notices import render_test

    config = checked(obj.config())  # the URL checks of check-config and run (exit 2)
    names = list(channels) or list(config.channels)
    unknown = [n for n in names if n not in config.channels]
    if unknown:
        fail(f"unknown channel(s) {', '.join(unknown)} (known: {', '.join(config.channels)})")
    if not names:
        fail("no channels configured in [channels]")
    notifier = Notifier(config.channels)
    failed = 0
    for name in names:
        outcome = notifier.send(name, render_test(name, now_utc(), style_for(config, name)))
        if outcome.ok:
            click.echo(f"{name}: delivered")
        else:
            failed += 1
            click.echo(terminal(f"{name}: FAILED: {outcome.error}"))
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


# --- sign-in ------------------------------------------------------------------------------


@cli.command()
@click.option("--tenant", "tenant_id", help="Tenant id or domain (overrides auth.tenant_id).")
@click.option("--client-id", help="App registration id (overrides auth.client_id).")
@click.pass_obj
def login(obj: Context, tenant_id: str | None, client_id: str | None) -> None:
    """Sign in to Microsoft by device code and store the token cache."""
    from referral_watch.partner_center import auth

    config = obj.config()
    signed_in = auth.login(
        config, lambda text: click.echo(text), tenant_id=tenant_id, client_id=client_id
    )
    click.echo(
        f"Signed in as {signed_in.username} (tenant {signed_in.tenant_id}). "
        f"Token cache: {config.cache_path}"
    )


@cli.command()
@click.pass_obj
def logout(obj: Context) -> None:
    """Remove the signed-in account from the token cache."""
    from referral_watch.partner_center import auth

    config = obj.config()
    removed = auth.logout(config)
    if removed:
        click.echo(f"Signed out {', '.join(removed)}.")
    else:
        click.echo("No account was signed in.")


# --- silences -----------------------------------------------------------------------------


@cli.command()
@click.argument("lead_id", metavar="ID")
@click.option("--for", "duration", required=True, metavar="DURATION", help='e.g. "2d" or "36h".')
@click.option("--reason", default="", help="Why (shown in status).")
@click.option(
    "--through-deadline",
    is_flag=True,
    help="Also hold the final reminder when the silence outlasts the deadline.",
)
@click.pass_obj
def silence(obj: Context, lead_id: str, duration: str, reason: str, through_deadline: bool) -> None:
    """Stop tier reminders for one lead for a while."""
    import getpass

    from referral_watch.state.store import Store

    try:
        length = parse_duration(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--for") from None
    config = obj.config()
    now = now_utc()
    with Store(config.state.location, create=False) as store:
        full_id = resolve_id(store, lead_id)
        store.silence(
            full_id,
            now + length,
            now,
            reason=reason,
            by=getpass.getuser(),
            through_deadline=through_deadline,
        )
        lead = store.lead(full_id)
    until = now + length
    customer = lead.referral.customer if lead else "?"
    click.echo(terminal(f"Silenced {full_id} ({customer}) until {until:%Y-%m-%d %H:%M} UTC."))
    if lead and until >= lead.deadline and not through_deadline:
        click.echo(
            "Note: the silence outlasts the deadline; the final reminder will still be sent "
            "(use --through-deadline to hold it too)."
        )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON array instead of a table.")
@click.pass_obj
def silences(obj: Context, as_json: bool) -> None:
    """The running silences: lead, customer, until, reason, who set it."""
    from referral_watch.render import status_view
    from referral_watch.state.store import Store

    config = obj.config()
    found, ids = [], []
    if config.state.url is not None or config.state.path.exists():
        with Store(config.state.location, create=False) as store:
            found, ids = store.silences(now_utc()), store.ids_starting("")
    if as_json:
        click.echo(json.dumps([status_view.silence_json(item) for item in found], indent=2))
        return
    click.echo(status_view.silences_table(found, ids, config.messages.timezone))


@cli.command()
@click.argument("lead_id", metavar="ID")
@click.pass_obj
def unsilence(obj: Context, lead_id: str) -> None:
    """End a lead's silence."""
    from referral_watch.state.store import Store

    config = obj.config()
    with Store(config.state.location, create=False) as store:
        full_id = resolve_id(store, lead_id)
        if store.unsilence(full_id):
            click.echo(terminal(f"Reminders for {full_id} are back on."))
        else:
            click.echo(terminal(f"{full_id} was not silenced."))


# --- answer -------------------------------------------------------------------------------


@cli.command()
@click.argument("lead_id", metavar="ID")
@click.argument("action", type=click.Choice(["accept", "decline"]))
@click.option("--reason", default="", help="Why (required to decline; Partner Center shows it).")
@click.pass_obj
def answer(obj: Context, lead_id: str, action: str, reason: str) -> None:
    """Accept or decline a lead in Partner Center with the configured sign-in."""
    import getpass

    from referral_watch.partner_center.answering import Person, answer_lead, checked_request
    from referral_watch.partner_center.auth import token_provider
    from referral_watch.partner_center.client import PartnerCenter
    from referral_watch.state.store import Store

    config = obj.config()
    checked_request(action, reason)  # a decline without a reason is refused before any call
    operator = getpass.getuser()
    person = Person(operator, operator, "command")
    with Store(config.state.location, create=False) as store:
        full_id = resolve_id(store, lead_id)
        with PartnerCenter(config.partner_center, token_provider(config)) as api:
            outcome = answer_lead(store, api, full_id, action, reason, person, now_utc())
        if outcome.ok:
            click.echo(terminal(f"{outcome.message}."))
            click.echo(terminal(notify_resolved(config, store)))
            return
    click.echo(terminal(outcome.message))
    sys.exit(EXIT_OK if outcome.settled else EXIT_FAILED)


def notify_resolved(config: Config, store: Any) -> str:
    """Tell `on_resolved` now, unless a running daemon owns delivery (it tells at its next
    cycle: two processes delivering from one outbox could send a message twice)."""
    from referral_watch.daemon import new_cycle
    from referral_watch.state.replica import state_lock

    if not config.policy.on_resolved:
        return "No on_resolved channels to tell."
    try:
        with state_lock(config):
            result = new_cycle(config, store).notify_now()
    except LockedError:
        return "The running daemon tells on_resolved at its next cycle."
    if result.failed:
        return f"Telling on_resolved failed ({result.failures[0]}); retried at the next cycle."
    return f"Told on_resolved ({result.delivered} message(s))."


for command in (webhooks, state, report, demo, sandbox, claim, unclaim):  # modules of their own
    cli.add_command(command)
