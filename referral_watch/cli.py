"""The command line: the only module that prints for the user or picks an exit code.

Heavy libraries (apprise, msal, apscheduler) are imported inside the commands that need them,
so `--help` and `status --check` stay fast.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

from referral_watch import __version__
from referral_watch.config import Config, parse_duration
from referral_watch.config.loader import (
    config_text,
    environment,
    find_config_path,
    find_env_file,
    load_config,
)
from referral_watch.errors import ConfigError, LockedError, ReferralWatchError, StateError
from referral_watch.text import terminal

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3


class Context:
    def __init__(
        self, config_path: str | None, log_format: str, verbose: int, env_file: str | None = None
    ) -> None:
        self.config_path = config_path
        self.env_file = env_file
        self.log_format = log_format
        self.verbose = verbose
        self._config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            self._config = self.load()
        return self._config

    def load(self) -> Config:
        """Read the config file (and the env file) afresh: at start and at every reload."""
        path = find_config_path(self.config_path)
        return load_config(path, env=environment(find_env_file(self.env_file, path)))


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"error: {terminal(message)}", err=True)  # it may quote Partner Center text
    sys.exit(code)


def now_utc() -> datetime:
    return datetime.now(UTC)


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
        _print_config_problems(exc)
        sys.exit(EXIT_CONFIG)
    except LockedError as exc:
        fail(str(exc), EXIT_LOCKED)
    except ReferralWatchError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def _print_config_problems(exc: ConfigError) -> None:
    if exc.path is None and len(exc.problems) == 1:  # e.g. the file is missing
        click.echo(f"error: {exc.problems[0]}", err=True)
        return
    where = f" in {exc.path}" if exc.path else ""
    click.echo(f"error: the configuration{where} is not valid:", err=True)
    for problem in exc.problems:
        click.echo(f"  - {problem}", err=True)


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


def resolve_id(store: Any, given: str) -> str:
    """A full referral id, or a unique prefix of one (ids are long GUIDs)."""
    if store.known(given):
        return given
    matches: list[str] = store.ids_starting(given)
    if len(matches) == 1 and len(given) >= 4:
        return matches[0]
    if len(matches) > 1:
        fail(f"{given!r} matches {len(matches)} leads: give more of the id")
    fail(
        f"no lead with id {given!r} in the state file "
        "(`referral-watch status --all` shows every lead's id)"
    )


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
        _print_config_problems(ConfigError(found.errors, str(path)))
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


# --- state ---------------------------------------------------------------------------------


@cli.group()
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


@cli.command()
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
        leads = store.leads(include_resolved=True)
    summary = summarize(leads, now_utc(), period)
    click.echo(render_report(summary, fmt, config.messages.timezone), nl=False)


# --- webhooks -------------------------------------------------------------------------------


@cli.group()
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


# --- demo ---------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--channel",
    "extra_channel",
    metavar="URL",
    help="Also send every alert to this Apprise URL (e.g. your Teams workflow or Slack).",
)
@click.option(
    "--console",
    "with_console",
    is_flag=True,
    help="Afterwards keep the sandbox and the web console running (until Ctrl-C).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=9464,
    show_default=True,
    help="The console's port on 127.0.0.1 (with --console).",
)
@click.option("--fast", is_flag=True, hidden=True, help="No pauses (for tests).")
def demo(extra_channel: str | None, with_console: bool, port: int, fast: bool) -> None:
    """Watch two weeks of leads in a few seconds against a built-in sandbox."""
    from referral_watch import logs
    from referral_watch.sandbox.demo import run_demo

    logs.configure("console", quiet=True)
    if extra_channel:
        from referral_watch.config import ChannelConfig
        from referral_watch.notify import check_channels

        problems = check_channels({"yours": ChannelConfig.model_construct(url=extra_channel)})
        if problems:
            raise ConfigError(problems)
    console = f"127.0.0.1:{port}" if with_console else None
    if console is not None:
        from referral_watch.config import ServerConfig
        from referral_watch.web.server import bind

        bind(ServerConfig(listen=console)).close()  # a port in use fails now, not after the story
    sys.exit(run_demo(extra_channel=extra_channel, pause=0.0 if fast else None, console=console))


# --- sandbox ------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="Port on 127.0.0.1 (0: any free one).",
)
@click.option(
    "--leads",
    type=click.IntRange(0, 100_000),
    default=25,
    show_default=True,
    help="How many waiting referrals it holds.",
)
@click.option(
    "--held-by",
    metavar="URL",
    help="Start with the company's webhook registration held by another integration at URL "
    "(a CRM co-sell connector's events), to try `webhooks register` against.",
)
def sandbox(port: int, leads: int, held_by: str | None) -> None:
    """Run the built-in fake Partner Center on 127.0.0.1, to try a config by hand."""
    import signal
    import tempfile
    import threading
    from pathlib import Path

    from referral_watch.config import PartnerCenterConfig
    from referral_watch.sandbox.records import sample_leads
    from referral_watch.sandbox.server import CONNECTOR_EVENTS, Sandbox, holdings

    token = "sandbox-token"
    held = None if held_by is None else {"WebhookUrl": held_by, "WebhookEvents": CONNECTOR_EVENTS}
    fake = Sandbox(
        sample_leads(leads, now=now_utc()), token=token, port=port, held_registration=held
    )
    try:
        fake.start()
    except OSError as exc:
        fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc} (try another --port)")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    # Its webhook events are signed as Microsoft signs them: the leaf alone, its issuing CA at
    # an AIA URL on the sandbox's issuer host, the root in this trust file.
    side = fake.webhooks
    trust = Path(tempfile.mkdtemp(prefix="referral-watch-sandbox-")) / "sandbox-roots.pem"
    trust.write_bytes(side.trust_roots_pem)
    click.echo(
        f"Partner Center sandbox at {fake.base_url} with "
        f"{holdings(fake, PartnerCenterConfig().filter)}.\n"
        f"Its bearer token is {token}. To try a config against it, set\n"
        f'  [partner_center] base_url = "{fake.base_url}"\n'
        '  [auth] method = "env" (token_env = "PARTNER_CENTER_TOKEN")\n'
        f"and export PARTNER_CENTER_TOKEN={token}; then `referral-watch run --once`.\n"
        "For its signed webhook events, also set\n"
        f'  [webhooks] certificate_hosts = ["{side.certificate_host}"]\n'
        f'             issuer_hosts = ["{side.issuer_host}"]\n'
        f'             trust_roots = "{trust}"\n'
        f"and export SSL_CERT_FILE={trust} (its certificate server's TLS has the same root).\n"
        + (
            ""
            if held is None
            else f"Its webhook registration API is {fake.registration_url} (token "
            f"{fake.registration_token}), held by {held_by}.\n"
        )
        + "Ctrl-C stops it."
    )
    sys.stdout.flush()
    try:
        while not stop.wait(0.5):  # a timed wait: the signal handler runs between the waits
            pass
    finally:
        fake.stop()
    click.echo("Sandbox stopped.")
