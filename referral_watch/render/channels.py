"""PURE: what kind of service a channel URL reaches, and how its messages must look.

One rule for every use: rendering (length caps, the compact layout, the markup that escapes
Partner Center text) and delivery (redaction, who may get recipients) both ask ``channel_kind``.
No Apprise here: the rule reads the URL text only, so ``status`` and rendering stay light.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from referral_watch.config import ChannelConfig, Config

__all__ = [
    "DEFAULT_LINK",
    "SLACK_MAX",
    "TEAMS_MAX",
    "Style",
    "channel_kind",
    "markup_of",
    "style_for",
]

DEFAULT_LINK = "https://partner.microsoft.com/dashboard/referrals/v2/leads"
TEAMS_MAX = 1000  # Apprise's workflows:// body cap; we keep title + body within it
SLACK_MAX = 3000  # well under what Slack accepts for one message

EMAIL_SCHEMES = frozenset({"mailto", "mailtos"})
WEBHOOK_SCHEMES = frozenset({"json", "jsons", "xml", "xmls", "form", "forms"})
TEAMS_SCHEMES = frozenset({"workflow", "workflows", "powerautomate", "msteams"})
_TEAMS_HOST = re.compile(r"(\.logic\.azure\.com|\.powerplatform\.com|\.powerautomate\.com)$", re.I)
OFFICE_CONNECTOR = re.compile(
    r"^https?://([^/]*\.webhook\.office\.com|outlook\.office(365)?\.com/webhook)", re.I
)
SLACK_HOOK_HOST = re.compile(r"^hooks\.slack(-gov)?\.com$", re.I)


def url_scheme(url: str) -> str:
    """The lower-case scheme of ``scheme://...``, or '' when the text is no URL."""
    head, sep, _ = url.partition("://")
    return head.strip().lower() if sep else ""


def _host(url: str) -> str:
    try:
        return (urlsplit(url.strip()).hostname or "").lower()
    except ValueError:
        return ""


def channel_kind(url: str) -> str:
    """What kind of service a channel URL reaches: teams, slack, email, webhook or other."""
    scheme = url_scheme(url)
    web = scheme in ("http", "https")
    host = _host(url) if web else ""
    if scheme in TEAMS_SCHEMES:
        return "teams"
    if web and (_TEAMS_HOST.search(host) or OFFICE_CONNECTOR.match(url.strip())):
        return "teams"
    if scheme == "slack" or (web and SLACK_HOOK_HOST.match(host)):
        return "slack"
    if scheme in EMAIL_SCHEMES:
        return "email"
    if scheme in WEBHOOK_SCHEMES:
        return "webhook"
    return "other"


def markup_of(kind: str) -> str:
    """The markup a kind of channel reads: 'slack' (mrkdwn through Apprise), 'teams' (Markdown,
    the title too) or 'markdown' (bodies only: email subjects and webhook titles are plain)."""
    return kind if kind in ("slack", "teams") else "markdown"


@dataclass(frozen=True)
class Style:
    """How one channel wants its messages."""

    locale: str = "en-US"
    timezone: str = "UTC"
    compact: bool = False  # Teams: essentials first, short lines
    max_length: int | None = None  # len(title) + len(body) never exceeds this
    link_template: str = DEFAULT_LINK
    markup: str = "markdown"  # "markdown", "teams" or "slack": how outside text is escaped
    answer_base: str = ""  # the console's public URL when Accept/Decline links are on (SPEC 14)
    claim_base: str = ""  # the console's public URL when Take-it links are on (SPEC 17)
    owner_channel: bool = False  # claims.owner_channel: its alerts about a claimed lead go to
    # the owner, who needs no Take-it link
    team_domains: tuple[str, ...] = ()  # "Assigned team" shows only these; () shows everyone


def style_for(config: Config, channel: str) -> Style:
    """The channel's locale/timezone (else ``[messages]``), its size limits and markup."""
    settings = config.channels.get(channel)
    locale = (settings.locale if settings else None) or config.messages.locale
    zone = (settings.timezone if settings else None) or config.messages.timezone
    kind = channel_kind(settings.url) if settings else ""
    return Style(
        locale=locale,
        timezone=zone,
        compact=kind == "teams",
        max_length=TEAMS_MAX if kind == "teams" else SLACK_MAX if kind == "slack" else None,
        link_template=config.partner_center.link_template,
        markup=markup_of(kind),
        team_domains=_our_domains(config, settings),
        answer_base=answer_base(config),
        claim_base=claim_base(config),
        owner_channel=config.claims is not None and config.claims.owner_channel == channel,
    )


def _our_domains(config: Config, settings: ChannelConfig | None) -> tuple[str, ...]:
    """The channel's assignee_domains, else every channel's: who counts as our people."""
    if settings is not None and settings.assignee_domains:
        return tuple(settings.assignee_domains)
    return tuple(sorted({d for c in config.channels.values() for d in c.assignee_domains}))


def answer_base(config: Config) -> str:
    """Where Accept/Decline links point (SPEC 14): ``server.public_url`` when the console
    answers (``console.answer``), else '' (no links)."""
    server, console = config.server, config.console
    if server is None or not server.public_url or console is None or not console.answer:
        return ""
    return server.public_url


def claim_base(config: Config) -> str:
    """Where Take-it links point (SPEC 17): ``server.public_url`` when the console is on and
    claims are set up (``[claims]``), else '' (no links)."""
    server = config.server
    if server is None or not server.public_url or config.console is None or config.claims is None:
        return ""
    return server.public_url
