"""The one place that masks secrets: in error texts (``scrub``), in database URLs
(``database_url``) and in channel URLs (``channel_url``: the shown form and the secrets it hid).
A leaf: it imports nothing of ours, so config, the state, logging and delivery all can use it."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote, urlsplit

MASK = "***"

# Query parameters and header-like words whose values are secrets wherever they appear.
_SECRET_PARAMS = re.compile(
    r"(?i)\b((?:access_|id_|refresh_)?token|code|client_secret|secret|password|passwd|sig|"
    r"signature|api[-_]?key|key)=([^&\s#'\"]+)"
)
# "Bearer <token>": a token has digits or punctuation, or is long; "bearer token" (a word in
# a sentence) is left alone.
_BEARER = re.compile(
    r"(?i)\b(bearer)\s+"
    r"(?![A-Za-z]{1,19}\b(?![\-_~+/=]|\.[A-Za-z0-9]))"  # not a plain word ("bearer token")
    r"[A-Za-z0-9\-._~+/]+=*"
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """An error text fit to log, store or send: the given secrets (and their URL-encoded
    forms), bearer tokens and secret-looking query parameters (`?access_token=...`, as a
    server may echo in a redirect's Location) are replaced by ***. The one scrub used for
    log lines, `status`, the state file's poll log and operations alerts."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
                text = text.replace(form, "***")
    text = _BEARER.sub(r"\1 ***", text)
    return _SECRET_PARAMS.sub(r"\1=***", text)


def database_url(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (also password=...)."""
    shown = re.sub(r"(://[^/?#:@]*):[^/?#@]*@", r"\1:***@", url)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", shown)


# --- channel URLs ----------------------------------------------------------------------

_SECRET_KEY = re.compile(r"sig|secret|token|pass|pwd|key|auth|code|hash|cred|session", re.I)


def _looks_secret(part: str) -> bool:
    """A URL piece that reads like a token, id or signature rather than a word."""
    text = unquote(part)
    if not text or "@" in text:
        return False  # e-mail addresses identify, they do not authenticate
    if text.lower().startswith(("xoxb-", "xoxp-", "xoxa-", "xoxe.")):
        return True
    if len(text) >= 16:
        return True
    return len(text) >= 6 and any(c.isdigit() for c in text) and any(c.isalpha() for c in text)


def _looks_like_host(host: str) -> bool:
    return "." in host or host.startswith("[") or host.lower() == "localhost"


@dataclass
class Redaction:
    """A URL split into shown and masked pieces; ``secrets`` are the masked originals."""

    secrets: list[str]

    def mask(self, part: str, secret: bool) -> str:
        if secret and part:
            self.secrets.append(part)
            return MASK
        return part


def channel_url(
    url: str,
    scheme: str,
    *,
    host_schemes: Collection[str],
    token_path_schemes: Collection[str],
    slack_hook: bool = False,
) -> tuple[str, list[str]]:
    """(a channel URL with its passwords, tokens and secret path parts shown as ***, the
    secrets it hid). ``host_schemes``: schemes whose host is a real host even without a dot;
    ``token_path_schemes``: schemes whose every path segment is a credential; ``slack_hook``:
    an https Slack hook (hooks.slack.com/services/T/B/X)."""
    if not scheme:
        return MASK, [url] if url else []
    parts = urlsplit(url.strip())
    red = Redaction([])
    token_path = scheme in token_path_schemes

    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    shown_user = red.mask(user, _looks_secret(user)) + (
        ":" + red.mask(password, True) if colon else ""
    )
    host, _, port = hostport.rpartition(":")
    if not port.isdigit() or (host.count(":") and not host.endswith("]")):
        host, port = hostport, ""  # no port: e.g. tgram://BOTID:TOKEN or a bare IPv6 address
    host_secret = scheme not in host_schemes and not _looks_like_host(host)
    shown_host = red.mask(host, host_secret)

    segments = []
    for index, segment in enumerate(parts.path.split("/")):
        channel_like = segment.startswith(("#", "@", "%23"))
        every = token_path or (slack_hook and index > 1)  # hooks.slack.com/services/T/B/X
        secret = bool(segment) and not channel_like and (every or _looks_secret(segment))
        segments.append(red.mask(segment, secret))

    query = masked_query(parts.query, red)

    shown = f"{scheme}://"
    shown += f"{shown_user}@" if at else ""
    shown += shown_host + (f":{port}" if port else "") + "/".join(segments)
    shown += f"?{'&'.join(query)}" if query else ""
    shown += f"#{red.mask(parts.fragment, _looks_secret(parts.fragment))}" if parts.fragment else ""
    return shown, red.secrets


def masked_query(query: str, red: Redaction, keep: set[str] | None = None) -> list[str]:
    """``key=value`` items, secret-looking values masked; only ``keep`` keys when given."""
    shown = []
    for item in query.split("&") if query else []:
        key, eq, value = item.partition("=")
        if keep is not None and key.lower() not in keep:
            continue
        unquoted = unquote(value)
        secret = bool(_SECRET_KEY.search(key)) or (
            len(unquoted) >= 20 and not re.search(r"[@/,]", unquoted)
        )
        shown.append(key + eq + red.mask(value, secret))
    return shown
