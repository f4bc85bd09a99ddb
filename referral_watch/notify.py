"""Delivery through Apprise: one target per channel, a result instead of an exception.

Apprise is imported lazily (first send or check): loading its plugin set takes a noticeable
fraction of a second, and ``referral-watch --help`` or ``status --check`` must stay quick.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote, unquote, urlsplit

import structlog

from referral_watch import incident, teams_card
from referral_watch.config import ChannelConfig
from referral_watch.model import Message
from referral_watch.redact import MASK, Redaction, channel_url, masked_query
from referral_watch.render.channels import (
    EMAIL_SCHEMES,
    OFFICE_CONNECTOR,
    WEBHOOK_SCHEMES,
    channel_kind,
    url_scheme,
)
from referral_watch.text import terminal

log = structlog.get_logger(__name__)


MSTEAMS_ADVICE = (
    "Microsoft retired Office 365 connectors and Apprise 2 dropped msteams://: create a Teams "
    "Workflow (Power Automate 'Post to a channel when a webhook request is received') and use "
    "its URL, pasted as is or as workflows://..."
)

MAX_SEND_GAP_S = 1.0  # seconds between two messages through the same channel
# One send's whole time: Apprise's read timeout restarts with every byte, so a channel that
# answers a byte now and then would hold the cycle (and a stop signal) for minutes.
SEND_TIME_CAP = 60.0

APP_ID = "referral-watch"
APP_DESC = "Partner Center lead alerts"
APP_URL = "https://partner.microsoft.com/dashboard/referrals/v2/leads"


@dataclass(frozen=True)
class Delivery:
    """What happened to one message on one channel."""

    ok: bool
    error: str | None = None  # short and secret-free: safe to log, store and show


# --- URL knowledge -------------------------------------------------------------------------

# Schemes whose host part is a real host name even without a dot (json://myhost:8080/...).
_HOST_SCHEMES = (
    EMAIL_SCHEMES | WEBHOOK_SCHEMES | incident.SCHEMES | {"http", "https", "workflow", "workflows"}
)
# Schemes whose every path segment is a credential (webhook ids, signatures, tokens).
_EMAIL = re.compile(r"[^@\s,;<>]+@[^@\s,;<>]+\.[^@\s,;<>]+")
_TOKEN_PATH_SCHEMES = frozenset({"slack", "msteams", "workflow", "workflows", "discord", "tgram"})


def _apprise_private(url: str) -> str | None:
    """Apprise's own privacy form of a URL it parses (``slack://T...2/...``), else None.

    Apprise adds its defaults (``retry=0&wait=0.5...``) to the query: only the keys the
    operator wrote are kept, and those are masked by our rule too (Apprise shows headers and
    payload keys as they are)."""
    if not url_scheme(url):
        return None
    apprise = _apprise()
    with _captured():
        plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
    if plugin is None:
        return None
    private = str(plugin.url(privacy=True))
    head, _, query = private.partition("?")
    written = {q.partition("=")[0].lower() for q in urlsplit(url.strip()).query.split("&") if q}
    kept = masked_query(query, Redaction([]), keep=written)
    return head.rstrip("/") + (f"?{'&'.join(kept)}" if kept else "")


def _masked(url: str) -> tuple[str, list[str]]:
    """A channel URL as shown, and the secrets it hid (redact.channel_url with our schemes)."""
    scheme = url_scheme(url)
    slack_hook = scheme in ("http", "https") and channel_kind(url) == "slack"
    return channel_url(
        url,
        scheme,
        host_schemes=_HOST_SCHEMES,
        token_path_schemes=_TOKEN_PATH_SCHEMES,
        slack_hook=slack_hook,
    )


def redact_url(url: str) -> str:
    """scheme://host/... with passwords, tokens and secret path parts hidden: Apprise's privacy
    form where Apprise parses the URL, else our own masking (***)."""
    try:
        private = _apprise_private(url)
    except ValueError:
        private = None
    return private if private is not None else _masked(url)[0]


def _scrub(text: str, url: str) -> str:
    """Remove every secret of ``url`` (raw or URL-decoded) from a message, such as Apprise's."""
    for secret in sorted(_masked(url)[1], key=len, reverse=True):
        for form in {secret, unquote(secret), quote(unquote(secret), safe="")}:
            if len(form) >= 3:
                text = text.replace(form, MASK)
    return re.sub(r"\b[a-z][a-z0-9+.-]*://\S+", lambda m: redact_url(m.group(0)), text)


# --- Apprise, loaded on first use ---------------------------------------------------------

_load_lock = threading.Lock()


class _ContextCapture(logging.Handler):
    """Collects Apprise's warnings per send, so channels can be sent to side by side and each
    failure still gets its own reason (Apprise's LogCapture shares one buffer process-wide).
    A context variable, not a thread-local: Apprise runs the service call in its own worker
    thread, inside a copy of the caller's context."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        lines = _capture_lines.get()
        if lines is not None:
            lines.append(self.format(record))


class _Captured:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def getvalue(self) -> str:
        return "\n".join(self.lines)


_capture_lines: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "referral_watch_apprise_lines", default=None
)
_capture_handler = _ContextCapture()


@contextmanager
def _captured() -> Iterator[_Captured]:
    """Apprise's warnings logged by this thread while the block runs."""
    logger = logging.getLogger("apprise")
    with _load_lock:
        if _capture_handler not in logger.handlers:
            logger.addHandler(_capture_handler)
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)  # reasons are warnings; logs.py keeps them local
    lines: list[str] = []
    token = _capture_lines.set(lines)
    try:
        yield _Captured(lines)
    finally:
        _capture_lines.reset(token)


def _plugins() -> Any:
    """Apprise's plugin registry (a process-wide singleton)."""
    from apprise import manager_plugins

    registry: Any = manager_plugins.NotificationManager
    return registry()


def _apprise() -> Any:
    """Import Apprise and load its plugins once, hiding a stdlib deprecation it triggers."""
    with _load_lock:
        import apprise

        with warnings.catch_warnings():
            # Apprise's PGP helper imports the deprecated stdlib `imghdr` (Python 3.11/3.12).
            warnings.filterwarnings(
                "ignore", message=".imghdr. is deprecated", category=DeprecationWarning
            )
            _plugins().load_modules()
        return apprise


def _knownurl_scheme(scheme: str) -> bool:
    return scheme in _plugins()


_GENERIC_REASONS = ("Could not load", "Unparseable")


def _apprise_reason(captured: str, url: str) -> str:
    """Apprise's own words, one line per distinct problem, secrets removed, kept short."""
    lines: list[str] = []
    for line in captured.splitlines():
        text = line.strip().rstrip(".")
        if text and text not in lines:
            lines.append(text)
    # "Could not load X URL: ..." only repeats the URL after the line that says why.
    specific = [line for line in lines if not line.startswith(_GENERIC_REASONS)]
    reason = _scrub("; ".join(specific or lines), url)
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _url_problem(url: str) -> str | None:
    scheme = url_scheme(url)
    if not scheme:
        return "not a URL: an Apprise URL looks like mailtos://..., slack://... or workflows://..."
    if scheme == "msteams" or OFFICE_CONNECTOR.match(url):
        return MSTEAMS_ADVICE
    if incident.is_incident_url(url):  # ours, not Apprise's
        return incident.url_problem(url)
    apprise = _apprise()
    with _captured() as captured:
        plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
    if plugin is not None:
        return None
    if scheme in ("http", "https"):
        host = urlsplit(url).hostname or "?"
        return (
            f"Apprise does not recognise this {scheme}:// URL (host {host}): paste a Teams "
            "Workflow, Slack or Discord webhook URL as is, or use json://HOST/PATH for a plain "
            "JSON webhook"
        )
    if not _knownurl_scheme(scheme):
        return (
            f"Apprise does not know the scheme {scheme}:// "
            "(the supported ones are listed at https://appriseit.com/services/)"
        )
    reason = _apprise_reason(captured.getvalue(), url)
    return f"not a valid {scheme}:// URL" + (f": {reason}" if reason else "")


def check_channels(channels: Mapping[str, ChannelConfig]) -> list[str]:
    """Every channel URL problem, each naming its key; an empty list means all is well."""
    problems: list[str] = []
    for name, channel in channels.items():
        problem = _url_problem(channel.url)
        if problem:
            problems.append(f"channels.{name}.url: {problem}")
        if channel.to_assignees and channel_kind(channel.url) != "email":
            scheme = url_scheme(channel.url) or "this"
            problems.append(
                f"channels.{name}.to_assignees: works only with mailto:// or mailtos:// URLs, "
                f"not with a {scheme}:// URL"
            )
    return problems


# --- sending ----------------------------------------------------------------------------


def valid_recipients(recipients: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for address in recipients:
        text = address.strip()
        if _EMAIL.fullmatch(text) and text.lower() not in (s.lower() for s in seen):
            seen.append(text)
    return seen


def _url_with_recipients(url: str, recipients: Sequence[str]) -> str:
    """The email URL with its recipients (path targets and `to=`) replaced by ``recipients``."""
    parts = urlsplit(url)
    # Edit the raw query: decoding and re-encoding would turn a '+' in from=/cc= into a space.
    kept = [q for q in parts.query.split("&") if q and q.partition("=")[0].lower() != "to"]
    kept.append("to=" + ",".join(quote(r, safe="@+") for r in recipients))
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{parts.netloc}?{'&'.join(kept)}{fragment}"


def _draws_cards(target: Any) -> bool:
    """Whether the channel posts an Adaptive Card from a template (Apprise's Workflows plugin,
    i.e. Teams): a message's actions become the card's buttons there."""
    return "workflows" in getattr(target[0], "secure_protocol", ())


def _notify_type(apprise: Any, name: str) -> Any:
    """Apprise's NotifyType for 'info', 'success', 'warning' or 'failure' (else info)."""
    try:
        return apprise.NotifyType(name)
    except ValueError:
        return apprise.NotifyType.INFO


class Notifier:
    """Sends messages to the configured channels. ``send`` reports failures, never raises them."""

    def __init__(self, channels: Mapping[str, ChannelConfig]) -> None:
        self._channels = dict(channels)
        self._targets: dict[str, Any] = {}  # channel name -> apprise.Apprise holding its URL
        self._lock = threading.Lock()

    def send(self, channel: str, message: Message, *, recipients: Sequence[str] = ()) -> Delivery:
        config = self._channels.get(channel)
        if config is None:
            return Delivery(False, "unknown channel")
        url = config.url
        addresses = valid_recipients(recipients) if config.addressed else []
        try:
            result = self._within_time(channel, config, message, addresses)
        except Exception as exc:  # one channel's surprise must not stop the others
            reason = _scrub(f"unexpected {type(exc).__name__}: {exc}", url)
            log.error("notify.error", channel=channel, reason=reason)
            return Delivery(False, reason)
        if result.ok:
            log.info("notify.sent", channel=channel, recipients=len(addresses) or None)
        else:
            log.warning("notify.failed", channel=channel, reason=result.error)
        return result

    def _within_time(
        self, channel: str, config: ChannelConfig, message: Message, addresses: list[str]
    ) -> Delivery:
        """_deliver, given up (as a failure, retried next cycle) after SEND_TIME_CAP. The
        send itself cannot be interrupted: its thread ends when the channel lets go."""
        outcome: list[Delivery] = []
        failure: list[BaseException] = []

        def send() -> None:
            try:
                outcome.append(self._deliver(channel, config, message, addresses))
            except BaseException as exc:  # re-raised in the caller's thread
                failure.append(exc)

        context = contextvars.copy_context()  # log context and the like, as in the caller
        worker = threading.Thread(
            target=context.run, args=(send,), name=f"send-{channel}", daemon=True
        )
        worker.start()
        worker.join(SEND_TIME_CAP)
        if worker.is_alive():
            return Delivery(
                False,
                f"the channel did not finish answering within {SEND_TIME_CAP:.0f} s "
                "(it answers too slowly); retried at the next cycle",
            )
        if failure:
            raise failure[0]
        return outcome[0]

    def _deliver(
        self, channel: str, config: ChannelConfig, message: Message, addresses: list[str]
    ) -> Delivery:
        if incident.is_incident_url(config.url):
            error = incident.send(config.url, message, datetime.now(UTC))
            return Delivery(error is None, error)
        apprise = _apprise()
        with _captured() as captured:
            body = message.body
            if addresses:
                # Recipients differ per lead: a short-lived target, not the cached one.
                url = _url_with_recipients(config.url, addresses)
                target = self._build(apprise, url)
            else:
                url = config.url
                target = self._target(apprise, channel, url)
            if target is not None and message.actions:
                if _draws_cards(target):  # buttons differ per lead: a short-lived target too
                    target = self._build(apprise, teams_card.with_buttons(url, message.actions))
                else:
                    body = message.body_with_links()
            if target is None:
                reason = _apprise_reason(captured.getvalue(), config.url)
                return Delivery(False, f"Apprise cannot use this channel URL: {reason}")
            ok = target.notify(
                body=body,
                title=message.title,
                body_format=apprise.NotifyFormat.MARKDOWN,
                notify_type=_notify_type(apprise, message.notify_type),
            )
        if ok:
            return Delivery(True)
        reason = _apprise_reason(captured.getvalue(), url) or "Apprise reported a failure"
        return Delivery(False, reason)

    def _target(self, apprise: Any, channel: str, url: str) -> Any:
        with self._lock:
            if channel not in self._targets:
                target = self._build(apprise, url)
                if target is None:
                    return None  # not cached: a later call logs the reason again
                self._targets[channel] = target
            return self._targets[channel]

    @staticmethod
    def _build(apprise: Any, url: str) -> Any:
        asset = apprise.AppriseAsset(app_id=APP_ID, app_desc=APP_DESC, app_url=APP_URL)
        target = apprise.Apprise(asset=asset)
        if not target.add(url):
            return None
        plugin = target[0]
        # Apprise waits 5.5 s between two messages through one target unless the service
        # declares its own rate (Slack: 1.2 s). A cycle sends several alerts to one channel
        # and a stop signal waits for the delivery in flight, so keep the gap short.
        if plugin.request_rate_per_sec > MAX_SEND_GAP_S:
            plugin.request_rate_per_sec = MAX_SEND_GAP_S
        return target


# --- console:// --------------------------------------------------------------------------

_console_stream: TextIO | None = None
_console_registered = False
_COLOURS = {"info": "36", "success": "32", "warning": "33", "failure": "31"}


def _write_console(body: str, title: str, notify_type: str) -> None:
    stream = _console_stream if _console_stream is not None else sys.stdout
    tty = bool(getattr(stream, "isatty", lambda: False)())
    heading = title or "(no title)"
    if tty:
        colour = _COLOURS.get(notify_type, "36")
        heading = f"\033[1;{colour}m{heading}\033[0m"
        rule = f"\033[2m{'─' * min(len(title or '') or 10, 72)}\033[0m"
    else:
        rule = "-" * min(len(title or "") or 10, 72)
    stream.write(f"{heading}\n{rule}\n{body.rstrip()}\n\n")
    stream.flush()


ConsolePrinter = Callable[[str, str, str, str], None]  # (channel, title, body, notify_type)
_console_printer: ConsolePrinter | None = None


def _console_send(body: str, title: str, notify_type: str, *args: Any, **kwargs: Any) -> bool:
    meta = kwargs.get("meta") or {}
    channel = str(meta.get("host") or "console")  # console://team -> "team"
    to = (meta.get("qsd") or {}).get("to")  # a claims owner channel: the owner's address
    if to:
        channel = f"{channel} → {to}"
    title, body = terminal(title), terminal(body)  # a terminal: no control character reaches it
    if _console_printer is not None:
        _console_printer(channel, title, body, notify_type)
    else:
        _write_console(body, title, notify_type)
    return True


def register_console_target(
    stream: TextIO | None = None, printer: ConsolePrinter | None = None
) -> None:
    """Make ``console://`` an Apprise target printing title and body to ``stream``.

    ``None`` means sys.stdout at the time of each message. ``printer`` replaces the default
    layout (the demo prints its own). Calling again only changes the stream and printer.
    """
    global _console_stream, _console_registered, _console_printer
    apprise = _apprise()
    with _load_lock:
        _console_stream = stream
        _console_printer = printer
        if _console_registered or _knownurl_scheme("console"):
            return

        register: Any = apprise.decorators.notify(on="console", name="referral-watch console")
        register(_console_send)
        _console_registered = True
