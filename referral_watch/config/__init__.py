"""The configuration's schema: one frozen, validated Config (pydantic), its sections, and the
rules each value must follow (durations, zones, locales, channel names). Reading it from TOML,
the environment and secret files is the loader's job (config/loader.py).
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from referral_watch.redact import database_url

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_DURATION_WHOLE = re.compile(r"(?:\d+[smhdw])+")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# The longest duration anywhere (silences, report periods, intervals, windows): ten years.
# Longer ones are typos, and overflow date arithmetic near year 9999.
DURATION_LIMIT = timedelta(days=3650)


def parse_duration(text: str) -> timedelta:
    """``"1d12h"`` -> timedelta(days=1, hours=12). Raises ValueError with a hint."""
    compact = text.strip()
    if len(compact) > 64 or not _DURATION_WHOLE.fullmatch(compact):
        raise ValueError(
            f"{text[:40]!r} is not a duration: use <number><unit> parts with units s m h d w, "
            'for example "90s", "15m" or "1d12h"'
        )
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(compact))
    if seconds > DURATION_LIMIT.total_seconds():
        raise ValueError(f"{compact!r} is longer than ten years (3650d), the most allowed")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """timedelta -> the config's own notation, largest units first (``1d12h``)."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    parts = []
    for unit in "wdhms":
        count, seconds = divmod(seconds, _UNIT_SECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(f'a duration must be a string such as "15m" or "1d12h", not {value!r}')
    return parse_duration(value)


Duration = Annotated[timedelta, BeforeValidator(_duration)]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | int | float) else value


StrList = Annotated[list[str], BeforeValidator(_as_list)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PartnerCenterConfig(Section):
    base_url: str = "https://api.partner.microsoft.com/v1.0"
    filter: str = "direction eq 'Incoming' and substatus eq 'Pending'"
    page_size: int = Field(100, ge=1, le=100)  # $top: the API documents 100 as its maximum
    timeout: Duration = timedelta(seconds=30)  # connect, and each read of an answer
    poll_timeout: Duration = timedelta(minutes=10)  # a whole poll: every page, every retry
    link_template: str = "https://partner.microsoft.com/dashboard/referrals/v2/leads"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")


class AuthConfig(Section):
    method: Literal["msal", "env", "command"] = "msal"
    tenant_id: str | None = None
    client_id: str | None = None
    cache_path: Path | None = None
    authority: str = "https://login.microsoftonline.com"
    scope: str = "https://api.partner.microsoft.com/.default"
    login_timeout: Duration = timedelta(minutes=15)
    client_secret: str | None = None
    client_certificate: Path | None = None
    client_certificate_thumbprint: str | None = None
    token_env: str = "PARTNER_CENTER_TOKEN"
    command: list[str] | None = None
    command_timeout: Duration = timedelta(seconds=60)

    @model_validator(mode="after")
    def _method_needs(self) -> AuthConfig:
        if self.method == "msal" and not (self.tenant_id and self.client_id):
            raise ValueError('method "msal" needs tenant_id and client_id')
        if self.method == "command" and not self.command:
            raise ValueError('method "command" needs command = ["program", "arg", ...]')
        if self.client_certificate and not self.client_certificate_thumbprint:
            raise ValueError("client_certificate needs client_certificate_thumbprint")
        return self


class StateConfig(Section):
    path: Path = Path("/var/lib/referral-watch/state.db")
    url: str | None = None  # PostgreSQL instead of the SQLite file: replicas, one active
    keep_resolved: Duration = timedelta(days=90)

    @model_validator(mode="after")
    def _one_place(self) -> StateConfig:
        if self.url is None:
            return self
        if "path" in self.model_fields_set:
            raise ValueError("set either path (SQLite) or url (PostgreSQL), not both")
        if not self.url.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "url must be a PostgreSQL URL (postgresql://user@host/database); "
                "for a SQLite file use path"
            )
        return self

    @property
    def location(self) -> Path | str:
        """What the store opens: the PostgreSQL URL, else the SQLite file."""
        return self.url if self.url is not None else self.path

    @property
    def shown(self) -> str:
        """The location fit for logs and messages (a URL's password is never shown)."""
        return database_url(self.url) if self.url is not None else str(self.path)


class ScheduleConfig(Section):
    interval: Duration = timedelta(minutes=15)
    jitter: Duration = timedelta(minutes=1)

    @field_validator("interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("interval must be longer than 0s")
        return value


class TierConfig(Section):
    name: str = Field(min_length=1)
    remaining: Duration
    notify: StrList
    repeat: Duration | None = None
    bypass_quiet: bool = False
    title: str | None = None  # Jinja2 template overriding the title
    body: str | None = None  # Jinja2 template overriding the Markdown body
    severity: Literal["info", "success", "warning", "failure"] | None = None  # Apprise's type
    # While claimed (SPEC 17): "owner" (to the owner only), "all" (channels too), "skip"
    when_claimed: Literal["owner", "all", "skip"] | None = None
    _position: int = PrivateAttr(default=-1)  # index in the file, for problems' key paths
    _default_severity: str = PrivateAttr(default="info")  # by rank, set by PolicyConfig
    _last: bool = PrivateAttr(default=False)  # the most severe tier, set by PolicyConfig

    @property
    def notify_type(self) -> str:
        """Apprise's notification type for this tier: ``severity``, else by its rank (the
        first tier info, the last failure, those between warning)."""
        return self.severity or self._default_severity

    @property
    def claimed(self) -> str:
        """``when_claimed``, else "all" for the last (most severe) tier, "owner" for others."""
        return self.when_claimed or ("all" if self._last else "owner")

    @property
    def key(self) -> str:
        """This tier's key path as the operator wrote the file (`policy.tiers[2]`)."""
        return f"policy.tiers[{self._position}]"


class PolicyConfig(Section):
    response_window: Duration = timedelta(days=14)
    digest_over: int = Field(5, ge=1)
    digest_limit: int = Field(50, ge=1)
    on_expired: StrList = []
    on_resolved: StrList = []
    tiers: list[TierConfig] = Field(min_length=1)

    @field_validator("tiers")
    @classmethod
    def _by_severity(cls, tiers: list[TierConfig]) -> list[TierConfig]:
        """Least severe (most time left) first; the index is the tier's severity."""
        names = [t.name for t in tiers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tier names must be unique: {', '.join(duplicates)}")
        for position, tier in enumerate(tiers):
            tier._position = position
        ranked = sorted(tiers, key=lambda t: t.remaining, reverse=True)
        for rank, tier in enumerate(ranked):
            last = rank == len(ranked) - 1
            tier._default_severity = "info" if rank == 0 else "failure" if last else "warning"
            tier._last = last
        return ranked

    def severity(self, tier_name: str) -> int:
        for index, tier in enumerate(self.tiers):
            if tier.name == tier_name:
                return index
        return -1

    def tier(self, tier_name: str) -> TierConfig | None:
        return next((t for t in self.tiers if t.name == tier_name), None)


class MatchConfig(Section):
    country: StrList | None = None
    direction: StrList | None = None
    type: StrList | None = None
    qualification: StrList | None = None
    solution: StrList | None = None
    product: StrList | None = None
    team_email: StrList | None = None
    min_deal_value: float | None = None
    max_deal_value: float | None = None


_QUIET = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


def _check_zone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, TypeError):  # TypeError: not a string at all
        raise ValueError(
            f"{value!r} is not an IANA time zone (e.g. Europe/Amsterdam, UTC)"
        ) from None
    return value


def _check_locale(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(
        r"[a-zA-Z]{2,3}([-_][a-zA-Z0-9]{2,8})*", value
    ):
        raise ValueError(f"{value!r} is not a locale such as en-US or nl-NL")
    return value


Zone = Annotated[str, BeforeValidator(_check_zone)]
LocaleName = Annotated[str, BeforeValidator(_check_locale)]


NOT_A_CHANNEL = (
    'a channel is an Apprise URL (name = "slack://...") or a table (name = { url = "..." }); '
    "is this a key of another section?"
)


class ChannelConfig(Section):
    url: str = Field(min_length=1)
    quiet_hours: str | None = None
    quiet_days: list[Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]] = []
    timezone: Zone | None = None
    locale: LocaleName | None = None
    match: MatchConfig | None = None
    to_assignees: bool = False
    assignee_domains: StrList = []  # our people: team members with these email domains
    _owner: bool = PrivateAttr(default=False)  # the claims' owner channel, set by Config

    @property
    def addressed(self) -> bool:
        """Messages name their recipients (to_assignees; the claims' owner channel)."""
        return self.to_assignees or self._owner

    @field_validator("assignee_domains")
    @classmethod
    def _domains(cls, values: list[str]) -> list[str]:
        domains = [value.strip().lower().removeprefix("@") for value in values]
        bad = [d for d in domains if not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", d)]
        if bad:
            raise ValueError(
                f'{", ".join(map(repr, bad))}: give email domains such as "contoso.com"'
            )
        return domains

    @field_validator("url")
    @classmethod
    def _a_url(cls, value: str) -> str:
        if "://" not in value and "${" not in value:  # ${...}: already reported as unset
            raise ValueError(f"{value[:40]!r} is not a URL: {NOT_A_CHANNEL}")
        return value

    @field_validator("quiet_hours")
    @classmethod
    def _quiet_hours(cls, value: str | None) -> str | None:
        if value is not None and not _QUIET.fullmatch(value.strip()):
            raise ValueError(
                f'{value!r} is not a time range: use "HH:MM-HH:MM", e.g. "20:00-08:00"'
            )
        return value.strip() if value else value

    @model_validator(mode="after")
    def _assignees_need_email(self) -> ChannelConfig:
        if self.to_assignees and not re.match(r"mailtos?://", self.url):
            raise ValueError("to_assignees works only with mailto:// or mailtos:// URLs")
        if self.to_assignees and not self.assignee_domains:
            raise ValueError(
                'to_assignees needs assignee_domains = ["your-company.com", ...]: a lead\'s '
                "team also holds Microsoft's and other partners' people, who must not get your "
                "reminders"
            )
        return self


def _channel_shorthand(value: Any) -> Any:
    """A channel is `name = "scheme://..."` or a table: anything else under [channels] (say
    `intervall = "5m"`, a key meant for another section) is refused, never made a channel."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return {"url": value}  # its url is checked as any channel's
    raise ValueError(f"{str(value)[:40]!r} is not a channel: {NOT_A_CHANNEL}")


class MessagesConfig(Section):
    locale: LocaleName = "en-US"
    timezone: Zone = "UTC"


class ReportConfig(Section):
    name: str = Field(min_length=1)
    schedule: str
    timezone: Zone = "UTC"
    notify: StrList
    since: Duration = timedelta(days=7)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from referral_watch.cron import cron_expression  # the rule the daemon runs by

        cron_expression(value)
        return value


class OperationsConfig(Section):
    notify: StrList = []
    after_failures: int = Field(3, ge=1)
    repeat: Duration = timedelta(hours=6)


class ServerConfig(Section):
    listen: str = "127.0.0.1:9464"
    public_url: str | None = None  # how browsers and Partner Center reach the server (a TLS proxy)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f'{value!r} is not "host:port", e.g. "127.0.0.1:9464" or "[::]:9464"')
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", value):
            raise ValueError(f'{value!r} is not an http(s) URL such as "https://leads.contoso.com"')
        return value.rstrip("/") if value else value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def loopback(self) -> bool:
        """Only this machine can reach ``listen``."""
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def base_url(self) -> str:
        """Where people open the console: ``public_url``, else ``http://listen``."""
        return self.public_url or f"http://{self.listen}"


class ConsoleConfig(Section):
    sign_in: Literal["entra", "none"] = "entra"
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    authority: str = "https://login.microsoftonline.com"
    allowed: StrList = []
    answer: bool = True
    session_secret: str | None = None

    @model_validator(mode="after")
    def _entra_needs(self) -> ConsoleConfig:
        if self.sign_in != "entra":
            return self
        missing = [
            key
            for key in ("tenant_id", "client_id", "client_secret", "session_secret")
            if not getattr(self, key)
        ]
        if missing:
            raise ValueError(f'sign_in "entra" needs {", ".join(missing)}')
        if not self.allowed:
            raise ValueError(
                'sign_in "entra" needs allowed = ["contoso.com", ...]: the email domains '
                "or addresses that may sign in"
            )
        if self.session_secret and len(self.session_secret) < 32:
            raise ValueError("session_secret must be at least 32 characters of random text")
        return self


def _host_names(value: list[str]) -> list[str]:
    """Host names, or host:port, in lower case: what webhooks' host lists hold."""
    for host in value:
        if not re.fullmatch(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?", host):
            raise ValueError(f"{host!r} is not a host name (no scheme, no path)")
    return [host.lower() for host in value]


class WebhooksConfig(Section):
    """Partner Center webhook events (SPEC 15): where they arrive and how they are verified."""

    path: str = "/webhooks/partner-center"
    certificate_hosts: StrList = ["3psostorageacct.blob.core.windows.net"]
    trust_roots: Path | None = None  # "" in the file: the system's trust store
    registration_url: str = "https://api.partnercenter.microsoft.com/webhooks/v1/registration"
    # Where the signing certificate's issuing CAs may be fetched from (its Authority Information
    # Access, as Microsoft's .NET sample does), and a PEM file of them to use first.
    issuer_hosts: StrList = ["www.microsoft.com", "caissuers.microsoft.com", "cacerts.digicert.com"]
    intermediates: Path | None = None  # "" in the file: none
    # URLs every verified event is relayed to, byte for byte with its signature headers.
    forward_to: StrList = []
    # The registration API wants a token for another audience than the Referrals API: with
    # auth.method "env" or "command" it comes from this variable or program instead.
    registration_token_env: str = "PARTNER_CENTER_REGISTRATION_TOKEN"
    registration_command: list[str] | None = None

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not re.fullmatch(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*", value) or "//" in value:
            raise ValueError(f'{value!r} is not a URL path such as "/webhooks/partner-center"')
        return value

    @field_validator("certificate_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one host that serves Microsoft's signing certificate")
        return _host_names(value)

    @field_validator("issuer_hosts")
    @classmethod
    def _issuer_hosts(cls, value: list[str]) -> list[str]:
        return _host_names(value)  # empty: issuing CAs only from intermediates

    @field_validator("forward_to")
    @classmethod
    def _forward_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", url):
                raise ValueError(f"{url!r} is not an http(s) URL")
        if len(set(value)) != len(value):
            raise ValueError("a URL is listed twice")
        return value

    @field_validator("trust_roots", "intermediates", mode="before")
    @classmethod
    def _empty_is_system(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("registration_url")
    @classmethod
    def _registration_http_url(cls, value: str) -> str:
        if not re.match(r"https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")


class HeartbeatConfig(Section):
    url: str = Field(min_length=1)
    fail_url: str | None = Field(None, min_length=1)  # pinged when a poll fails
    timeout: Duration = timedelta(seconds=10)


class ClaimsConfig(Section):
    """Taking a lead (SPEC 17); without it `claim` is refused and tiers go out as ever."""

    owner_channel: str | None = None  # an email channel: its alerts go to the owner's address
    lapse_after: Duration = Field(timedelta(days=2), gt=timedelta(0))
    add_to_team: bool = False  # also add the owner to the referral's team in Partner Center


class Config(Section):
    partner_center: PartnerCenterConfig = PartnerCenterConfig()
    auth: AuthConfig
    state: StateConfig = StateConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    policy: PolicyConfig
    channels: dict[str, Annotated[ChannelConfig, BeforeValidator(_channel_shorthand)]] = {}
    messages: MessagesConfig = MessagesConfig()
    reports: list[ReportConfig] = []
    operations: OperationsConfig = OperationsConfig()
    server: ServerConfig | None = None
    heartbeat: HeartbeatConfig | None = None
    console: ConsoleConfig | None = None
    webhooks: WebhooksConfig | None = None
    claims: ClaimsConfig | None = None
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _mark_owner_channel(self) -> Config:
        owner = self.claims.owner_channel if self.claims is not None else None
        if owner is not None and owner in self.channels:
            self.channels[owner]._owner = True
        return self

    @property
    def cache_path(self) -> Path:
        return self.auth.cache_path or self.state.path.parent / "msal-cache.json"

    @property
    def lock_path(self) -> Path:
        return self.state.path.with_name(self.state.path.name + ".lock")


# Authorities that sign in people of any organization (or personal accounts): never the
# console's tenant, whose ID tokens must all carry that one tenant's id.
SHARED_TENANTS = frozenset({"common", "organizations", "consumers"})


def console_problems(config: Config) -> list[str]:
    """The console's rules across sections: it is served by [server], without a sign-in only
    to this machine, and with one only to one organization's people."""
    console = config.console
    if console is None:
        return []
    server = config.server
    if server is None:
        return ["console: the console is served by the web server: add [server] listen"]
    problems = []
    if console.sign_in == "none" and not server.loopback:
        problems.append(
            f'console.sign_in: "none" lets anyone who reaches {server.listen} in; use '
            '"entra", or listen on a loopback address such as "127.0.0.1:9464"'
        )
    if console.sign_in == "none" and (server.public_url or "").startswith("https://"):
        problems.append(
            f'console.sign_in: "none" with server.public_url = "{server.public_url}" would '
            'publish the console unauthenticated through that proxy; use "entra", or remove '
            "server.public_url"
        )
    if console.sign_in == "entra" and (console.tenant_id or "").lower() in SHARED_TENANTS:
        problems.append(
            f'console.tenant_id: "{console.tenant_id}" lets people of any organization sign '
            'in; use your own tenant (its id, or a domain such as "contoso.onmicrosoft.com")'
        )
    return problems
