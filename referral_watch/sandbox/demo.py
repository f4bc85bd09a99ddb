"""`referral-watch demo`: the whole product against the built-in sandbox, two weeks in seconds.

The real cycle runs (httpx against the sandbox on loopback, SQLite, policy, Apprise); only the
clock is simulated. Alerts print through Apprise's `console://` target.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TextIO

from referral_watch.claiming import claim_lead
from referral_watch.config import Config
from referral_watch.config.loader import parse_config
from referral_watch.cycle.runner import Cycle
from referral_watch.daemon import new_cycle
from referral_watch.notify import Notifier, register_console_target
from referral_watch.partner_center.answering import Person, answer_lead
from referral_watch.partner_center.auth import EnvTokenProvider
from referral_watch.partner_center.client import PartnerCenter
from referral_watch.render.i18n import time_left_text
from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.server import Sandbox
from referral_watch.state.store import Store
from referral_watch.text import columns, terminal

TOKEN = "demo-token"  # the sandbox's own token; nothing real is ever contacted
ANN = Person("ann.devries@contoso.example", "Ann de Vries", "console")

CONFIG = """
[partner_center]
base_url = "{base_url}"
link_template = "https://partner.microsoft.com/dashboard/referrals/v2/leads?id={{id}}"

[auth]
method = "env"
token_env = "DEMO_TOKEN"

[state]
path = "{state}"

[policy]
digest_over = 5
on_expired = ["managers"{extra}]
on_resolved = ["team"{extra}]

[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"{extra}]

[[policy.tiers]]
name = "reminder"
remaining = "7d"
notify = ["team"{extra}]

[[policy.tiers]]
name = "urgent"
remaining = "2d"
notify = ["team", "managers"{extra}]

[[policy.tiers]]
name = "final"
remaining = "12h"
notify = ["team", "managers"{extra}]
repeat = "4h"

[channels]
team = "console://team"
managers = "console://managers"
owner = "console://owner"
{extra_channel}

[claims]
owner_channel = "owner"   # (a real one is an email channel: the owner's address gets it)
lapse_after = "9d"
"""


@dataclass
class SteppedClock:
    """Simulated time that moves only when the demo says so (deterministic runs)."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def advance(self, step: timedelta) -> None:
        self.now += step


@dataclass
class Event:
    """Something that happens in the sandbox at a simulated moment."""

    at: timedelta
    describe: str
    act: Callable[[Sandbox], None]
    done: bool = False
    accept: str | None = None  # a lead accepted through referral-watch's answer path instead
    claim: str | None = None  # a lead Ann takes through referral-watch's claim path instead


@dataclass
class Story:
    leads: list[dict[str, Any]]
    events: list[Event] = field(default_factory=list)


def story(start: datetime) -> Story:
    """A dozen varied leads, a few things that happen to them, and a burst that forms a digest."""

    def lead(customer: str, age: timedelta, **fields: Any) -> dict[str, Any]:
        return make_referral(customer=customer, created=start - age, **fields)

    fabrikam = lead("Fabrikam Customer Inc", timedelta(hours=1), deal_value=25000)
    # Ann takes it on day 1; its reminder goes to her alone; she accepts it on day 8.
    litware = lead("Litware Inc", timedelta(hours=2), deal_value=30000, country="NL")
    northwind = lead(
        "Northwind Traders",
        timedelta(days=8),
        type="Shared",
        qualification="SalesQualified",
        invited_by="msft",
        deal_value="250000",
        currency="EUR",
        country="NL",
        # Six days from the start exactly, not cut back to a midnight: at a late start hour that
        # would put the deadline before the acceptance below, and the story would contradict itself.
        expiration=start + timedelta(days=6),
        notes="Customer wants to move 40 SQL servers to Azure before fiscal year end.",
    )
    # Seven hours left at the start: the final tier at 7h and, 4h later, at 3h; then expired.
    tailspin = lead("Tailspin Toys", timedelta(days=13, hours=17), deal_value=8000)
    adatum = lead(
        "Adatum Corporation",
        timedelta(days=12, hours=12),
        deal_value=60000,
        currency="GBP",
        country="GB",
    )
    woodgrove = lead(
        "Woodgrove Bank",
        timedelta(days=10, hours=1),
        deal_value=4500000,
        currency="JPY",
        country="JP",
    )
    malformed = lead("Broken Record Ltd", timedelta(days=1))
    malformed["createdDateTime"] = "not-a-date"  # on purpose: the API sent something unreadable
    burst = [
        lead(name, -timedelta(days=3, hours=2, minutes=50 - 5 * n), deal_value=5000 * (n + 1))
        for n, name in enumerate(
            [
                "Alpine Ski House",
                "Bellows College",
                "Coho Winery",
                "Datum Systems",
                "Fourth Coffee",
                "Graphic Design Institute",
                "Lucerne Publishing",
            ]
        )
    ]
    return Story(
        leads=[fabrikam, northwind, tailspin, adatum, woodgrove, malformed, litware],
        events=[
            Event(
                timedelta(0),
                "the record of Broken Record Ltd is malformed on purpose (createdDateTime "
                "'not-a-date'): the poll sets it aside, logs the error below, tells operations "
                "and goes on with the others",
                lambda sb: None,
            ),
            Event(
                timedelta(hours=22),
                "a new lead, Wingtip Toys (its last 12 hours fall at the story's end)",
                lambda sb: sb.add(
                    lead("Wingtip Toys", -timedelta(hours=22), deal_value=12000, country="BE")
                ),
            ),
            Event(
                timedelta(days=1, hours=3),
                "Ann de Vries clicks Accept in the alert for Adatum Corporation "
                "(referral-watch PATCHes the referral with If-Match)",
                lambda sb: None,
                accept=adatum["id"],
            ),
            Event(
                timedelta(days=1, hours=5),
                "Ann de Vries clicks Take it in the alert for Litware Inc: its reminders go "
                "to her alone now",
                lambda sb: None,
                claim=litware["id"],
            ),
            Event(
                timedelta(days=8),
                "Ann de Vries clicks Accept in her reminder for Litware Inc",
                lambda sb: None,
                accept=litware["id"],
            ),
            Event(
                timedelta(days=2, hours=1),
                "a new lead, Contoso Webhooks Ltd: Partner Center posts a signed webhook event",
                lambda sb: sb.add(
                    lead("Contoso Webhooks Ltd", -timedelta(days=2), deal_value=40000)
                ),
            ),
            Event(
                timedelta(days=3, hours=3),
                "7 leads arrive at once after a trade show",
                lambda sb: sb.add(*burst),
            ),
            Event(
                timedelta(days=5, hours=18),
                "Northwind Traders is accepted just in time",
                lambda sb: sb.update(northwind["id"], status="Active", substatus="Accepted"),
            ),
            Event(
                timedelta(days=13),
                "a new lead, Proseware Inc",
                lambda sb: sb.add(
                    lead("Proseware Inc", -timedelta(days=13), deal_value=18000, country="DE")
                ),
            ),
        ],
    )


# Two simulated hours a cycle: fine enough that a tier's `repeat = "4h"` goes out 4 hours apart
# (with 3-hour cycles it went out every 6); a simulated day takes a second.
STEP = timedelta(hours=2)
DAY_SECONDS = 1.0


def run_demo(
    *,
    out: TextIO | None = None,
    days: float = 14.5,
    step: timedelta = STEP,
    pause: float | None = None,
    extra_channel: str | None = None,
    start: datetime | None = None,
    console: str | None = None,
    stop: threading.Event | None = None,
    poll_every: timedelta | None = None,
) -> int:
    """Run the story from ``start`` (default: this hour); returns the exit status (0).

    ``pause``: real seconds between cycles (default: a simulated day per second).
    ``console``: a loopback ``host:port``; after the story the web console keeps serving the
    state it left (with the sandbox still running) until Ctrl-C, or until ``stop`` is set,
    and polls the sandbox every ``poll_every`` (default: the schedule's interval), so it stays
    healthy."""
    stream = out or sys.stdout
    printer = ConsolePrinter(stream)
    register_console_target(stream, printer=printer)
    start = start or datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    if pause is None:
        pause = DAY_SECONDS * (step / timedelta(days=1))
    clock = SteppedClock(start)
    plot = story(start)
    with (
        tempfile.TemporaryDirectory(prefix="referral-watch-demo-") as tmp,
        Sandbox(plot.leads, token=TOKEN) as sandbox,
    ):
        config = demo_config(sandbox.base_url, Path(tmp) / "state.db", extra_channel, console)
        _intro(stream, sandbox, plot, days, step)
        tokens = EnvTokenProvider("DEMO_TOKEN", environ={"DEMO_TOKEN": TOKEN})
        with Store(config.state.path) as store, PartnerCenter(config.partner_center, tokens) as api:
            cycle = new_cycle(config, store, api, clock=clock)
            hooks = DemoWebhooks(sandbox)

            def accept(lead_id: str) -> None:
                answer_lead(store, api, lead_id, "accept", "", ANN, clock.now)

            def take(lead_id: str) -> None:
                claim_lead(store, config, lead_id, replace(ANN, via="alert"), clock.now)

            while True:
                printer.header = _cycle_header(stream, clock.now, start)
                _happen(plot, clock.now - start, sandbox, printer, accept, take)
                hooks.handle(cycle, printer, clock)  # at once, before the poll
                cycle.run()
                if clock.now + step > start + timedelta(days=days):
                    break  # the clock stays at the last poll: the console goes on from there
                clock.advance(step)
                time.sleep(pause)
            _summary(stream, store, start)
        if console is not None:
            polls = DemoPolls(config, tokens, printer, start)
            _serve_console(config, clock, polls, stop or threading.Event(), poll_every)
    return 0


class DemoPolls:
    """The console's daemon after the story: it polls the sandbox as `run` would, with the
    story's clock going on at the real pace; its alerts print as the story's did."""

    def __init__(
        self, config: Config, tokens: EnvTokenProvider, printer: ConsolePrinter, start: datetime
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.printer = printer
        self.start = start

    def api(self, config: Config) -> PartnerCenter:
        return PartnerCenter(config.partner_center, self.tokens)

    def sender(self, config: Config) -> Notifier:
        return Notifier(config.channels)

    def header(self, now: datetime) -> None:
        self.printer.header = _cycle_header(self.printer.stream, now, self.start)


def _serve_console(
    config: Config,
    clock: SteppedClock,
    polls: DemoPolls,
    stop: threading.Event,
    poll_every: timedelta | None,
) -> None:
    """The console over the demo's state, at the story's time, until Ctrl-C. A poll of the
    sandbox every interval keeps it healthy: the last poll is as fresh as in a real daemon."""
    from referral_watch.daemon import Daemon
    from referral_watch.web.app import build_app
    from referral_watch.web.server import WebServer

    assert config.server is not None
    # The story's simulated time goes on at the real pace, so the countdowns match the state.
    story_end, real_end = clock.now, time.monotonic()

    def story_clock() -> datetime:
        return story_end + timedelta(seconds=time.monotonic() - real_end)

    host = Daemon(config, clock=story_clock, api_factory=polls.api, sender_factory=polls.sender)
    with Store(config.state.path) as store:
        host.last_success = store.last_success()
    server = WebServer(build_app(host), config.server)
    server.start()
    stream = polls.printer.stream
    every = poll_every or config.schedule.interval
    stream.write(
        f"\nThe console: {config.server.base_url}/ (the sandbox stays on "
        f"{config.partner_center.base_url}, polled every {time_left_text(every, 'en')}; the "
        "story's clock goes on at the real pace); press Ctrl-C to stop.\n"
    )
    stream.flush()
    try:
        while not stop.wait(every.total_seconds()):
            polls.header(story_clock())
            host.cycle()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        host.close()


def demo_config(
    base_url: str, state: Path, extra_channel: str | None, console: str | None = None
) -> Config:
    extra = ', "yours"' if extra_channel else ""
    channel_line = f'yours = "{extra_channel}"' if extra_channel else ""
    text = CONFIG.format(base_url=base_url, state=state, extra=extra, extra_channel=channel_line)
    if console is not None:
        text += f'\n[server]\nlisten = "{console}"\n\n[console]\nsign_in = "none"\n'
    return parse_config(text, env={})


def _intro(stream: TextIO, sandbox: Sandbox, plot: Story, days: float, step: timedelta) -> None:
    bold = _style(stream, "1")
    hours = step / timedelta(hours=1)
    stream.write(
        f"{bold('referral-watch demo')}: a sandbox Partner Center on {sandbox.base_url} with "
        f"{len(plot.leads)} waiting referrals (one of them malformed on purpose).\n"
        f"The real poll → store → decide → deliver cycle runs every {hours:g} simulated hours; "
        f"{days:g} days pass in about {days * DAY_SECONDS:.0f} seconds.\n"
        "Alerts for the `team` and `managers` channels, and for Ann once she takes a lead "
        "(`owner`), print below.\n\n"
    )


def _cycle_header(stream: TextIO, now: datetime, start: datetime) -> str:
    day = (now - start) / timedelta(days=1)
    text = f"── day {day:4.1f} · {now:%a %d %b %H:%M} UTC (simulated) "
    return _style(stream, "2")(text + "─" * max(0, 72 - len(text)))


def _happen(
    plot: Story,
    elapsed: timedelta,
    sandbox: Sandbox,
    printer: ConsolePrinter,
    accept: Callable[[str], None],
    take: Callable[[str], None],
) -> None:
    for event in plot.events:
        if not event.done and elapsed >= event.at:
            if event.accept:
                accept(event.accept)
                where = "through referral-watch"
            elif event.claim:
                take(event.claim)
                where = "through referral-watch"
            else:
                event.act(sandbox)
                where = "in Partner Center"
            event.done = True
            printer.line(_style(printer.stream, "1;35")(f"» {where}: {event.describe}"))


def _summary(stream: TextIO, store: Store, start: datetime) -> None:
    rows = store.db.execute(
        """SELECT l.customer,
                  COALESCE(l.resolution, CASE WHEN l.expired_at IS NOT NULL THEN 'expired' END),
                  o.kind, o.tier, o.channel, o.delivered_at
           FROM leads l JOIN outbox o ON o.lead_id = l.id
           WHERE o.state = 'delivered' ORDER BY l.deadline, o.id"""
    ).fetchall()
    received: dict[str, list[str]] = {}
    outcome: dict[str, str] = {}
    for customer, resolution, kind, tier, _channel, delivered_at in rows:
        day = (datetime.fromisoformat(delivered_at) - start) / timedelta(days=1)
        what = tier if kind == "tier" else kind
        entry = f"{what}@{day:.1f}d"
        items = received.setdefault(customer, [])
        if entry not in items:
            items.append(entry)
        outcome[customer] = resolution or "waiting"
    bold = _style(stream, "1")
    stream.write(
        "\n" + bold("Summary: what each lead received (tier or notice @ simulated day)") + "\n"
    )
    table = [(c, f"{outcome[c]:<9} {' '.join(items)}") for c, items in received.items()]
    for line in columns(table, indent="  "):
        stream.write(terminal(line) + "\n")
    command = command_name()
    stream.write(
        "\nThe malformed record was set aside and logged; everything else was answered or "
        "announced.\nNext, the README's first run: copy config/referral-watch.example.toml to "
        f"config/referral-watch.toml, then\n  {command} --config config/referral-watch.toml "
        "check-config\n"
    )


def command_name(argv0: str | None = None) -> str:
    """How to call referral-watch again the way this run was called: `referral-watch` when that
    is on the PATH, else the script's path as given (`.venv/bin/referral-watch` after `make
    demo`), else `python -m referral_watch`."""
    import os
    import shutil

    given = argv0 if argv0 is not None else sys.argv[0]
    if Path(given).name == "referral-watch":
        found = shutil.which("referral-watch")
        if found and Path(found).resolve() == Path(given).resolve():
            return "referral-watch"
        return given if os.sep in given else f"./{given}"
    return f"{sys.executable} -m referral_watch"


class DemoWebhooks:
    """Webhooks in the demo: the sandbox signs each new lead's event and hands it to this
    in-process receiver, which verifies it for real (its certificate fetched over https from
    the sandbox, chained to the sandbox's "Microsoft Corporation" CA); the demo then handles
    the lead at once, as the daemon's worker would, ahead of the next poll."""

    def __init__(self, sandbox: Sandbox) -> None:
        import ssl

        from referral_watch.config import WebhooksConfig
        from referral_watch.partner_center.webhooks.verify import Verifier, download_certificate

        side = sandbox.webhooks
        self.side = side
        self.roots = Path(tempfile.mkdtemp(prefix="referral-watch-demo-roots-")) / "roots.pem"
        self.roots.write_bytes(side.trust_roots_pem)
        tls = ssl.create_default_context(cadata=side.tls_roots_pem.decode())
        self.verifier = Verifier(
            WebhooksConfig(
                certificate_hosts=[side.certificate_host],
                issuer_hosts=[side.issuer_host],
                trust_roots=self.roots,
            ),
            download=lambda url: download_certificate(url, tls),
        )
        self.waiting: list[str] = []
        side.local_target = self._receive
        side.register("local:demo")

    def _receive(self, headers: dict[str, str], body: bytes) -> int:
        from referral_watch.partner_center.webhooks.verify import Rejected, parse_event

        try:
            self.verifier.verify(headers, body)
        except Rejected:
            return 401
        event = parse_event(body)
        if event.lead_id:
            self.waiting.append(event.lead_id)
        return 200

    def handle(self, cycle: Cycle, printer: ConsolePrinter, clock: SteppedClock) -> None:
        self.side.wait_idle()
        if not self.waiting:
            return
        ids, self.waiting = self.waiting, []
        events = f"{len(ids)} event{'s' if len(ids) > 1 else ''}"
        printer.line(
            _style(printer.stream, "1;35")(
                f"» webhook ({events}) verified: handled at once, no wait for the next poll"
            )
        )
        cycle.handle_leads(ids)
        clock.advance(timedelta(minutes=1))  # the poll comes later, as in real life


class ConsolePrinter:
    """How alerts look in the demo: one line each; the first message and digests in full."""

    COLOURS: ClassVar[dict[str, str]] = {"team": "36", "managers": "33"}

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.shown_full = False
        self.header = ""  # printed before the first line of a cycle that has something to say
        # Channels are delivered side by side (threads): one message at a time on the screen,
        # or two channels both print the day header and interleave their lines.
        self._lock = threading.RLock()

    def line(self, text: str) -> None:
        with self._lock:
            if self.header:
                self.stream.write(self.header + "\n")
                self.header = ""
            self.stream.write(text + "\n")
            self.stream.flush()  # before a log line on stderr that it explains

    def __call__(self, channel: str, title: str, body: str, notify_type: str) -> None:
        colour = _style(self.stream, self.COLOURS.get(channel, "35"))
        with self._lock:
            self.line(f"  {colour(f'▸ {channel:<9}')} {_style(self.stream, '1')(title)}")
            digest = title[:1].isdigit()  # "7 leads need an answer within 14d"
            if not self.shown_full or digest:
                self.shown_full = True
                for line in body.strip().splitlines():
                    self.stream.write(_style(self.stream, "2")(f"      {line}") + "\n")
            else:  # who answered through referral-watch is worth a line of its own
                for line in body.splitlines():
                    if "via referral-watch" in line:
                        self.stream.write(_style(self.stream, "2")(f"      {line.strip()}") + "\n")
            self.stream.flush()


def _style(stream: TextIO, code: str) -> Callable[[str], str]:
    if getattr(stream, "isatty", lambda: False)():
        return lambda text: f"\033[{code}m{text}\033[0m"
    return lambda text: text
