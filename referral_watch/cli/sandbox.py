"""`referral-watch demo` and `referral-watch sandbox`: the product against the fake Partner
Center."""

from __future__ import annotations

import sys

import click

from referral_watch.cli.context import (
    fail,
    now_utc,
)
from referral_watch.errors import ConfigError

# --- demo ---------------------------------------------------------------------------------


@click.command()
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


@click.command()
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
