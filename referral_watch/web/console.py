"""The console's pages (SPEC 13): the waiting leads, one lead, silence and unsilence, and
/api/leads. Every page is read from the state file per request (a Store per request: one per
thread); the signed-in person is ``request.state.viewer`` (see ``signin``)."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from referral_watch import __version__
from referral_watch.config import Config, parse_duration
from referral_watch.errors import StateError
from referral_watch.model import Lead
from referral_watch.render import status_view
from referral_watch.render.i18n import babel_locale, translations
from referral_watch.state.store import Store
from referral_watch.web import views

PAGE_SIZE = 200
API_PAGE = 500  # leads per answer of /api/leads
RECENT = timedelta(days=7)  # "recently answered and expired"
RECENT_LIMIT = 50
LONGEST_SILENCE = timedelta(days=365)
STATIC = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "favicon.ico": "image/x-icon",
}


@lru_cache(maxsize=1)
def environment() -> Environment:
    # Autoescape on for every template: referral text is data, never markup (no |safe on it).
    return Environment(
        loader=PackageLoader("referral_watch.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def routes() -> list[BaseRoute]:
    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/leads/{lead_id}", lead_page, methods=["GET", "HEAD"]),
        Route("/leads/{lead_id}/silence", silence, methods=["POST"]),
        Route("/leads/{lead_id}/unsilence", unsilence, methods=["POST"]),
        Route("/api/leads", api_leads, methods=["GET", "HEAD"]),
        Route("/static/{name}", static, methods=["GET", "HEAD"]),
        Route("/favicon.ico", favicon, methods=["GET", "HEAD"]),
    ]


# --- shared pieces ---------------------------------------------------------------------


def host_of(request: Request) -> Any:
    return request.app.state.host


def config_of(request: Request) -> Config:
    config: Config = host_of(request).config  # a reload (SIGHUP) may replace it
    return config


def now_of(request: Request) -> datetime:
    moment: datetime = host_of(request).clock()
    return moment


def open_store(config: Config) -> Store:
    try:
        return Store(config.state.location, create=False)
    except StateError as exc:
        raise HTTPException(503, str(exc)) from None


def csrf_token(request: Request) -> str:
    """The session's anti-forgery token, made on first use; every form posts it back."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


async def checked_form(request: Request) -> dict[str, str]:
    form = await request.form()
    sent = form.get("csrf")
    expected = request.session.get("csrf")
    if not isinstance(sent, str) or not isinstance(expected, str):
        raise HTTPException(403, "This form has expired: reload the page and try again.")
    if not secrets.compare_digest(sent, expected):
        raise HTTPException(403, "This form has expired: reload the page and try again.")
    return {key: value for key, value in form.items() if isinstance(value, str)}


def gettext_for(config: Config) -> Callable[[str], str]:
    return translations(config.messages.locale).gettext


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    config = config_of(request)
    _ = gettext_for(config)
    health = host_of(request).health()
    with open_store(config) as store:
        last = store.last_poll()
        last_success = store.last_success()
    viewer = getattr(request.state, "viewer", None)
    html = (
        environment()
        .get_template(template)
        .render(
            _=_,
            lang=babel_locale(config.messages.locale).language,
            version=__version__,
            banner=views.banner(health, last_success, last, config, _),
            timezone=config.messages.timezone,
            viewer=viewer,
            csrf=csrf_token(request),
            now=views.iso(now_of(request)),  # the countdowns count from the server's clock
            **context,
        )
    )
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


# --- pages -------------------------------------------------------------------------------


def index(request: Request) -> Response:
    config = config_of(request)
    now = now_of(request)
    _ = gettext_for(config)
    query = request.query_params.get("q", "").strip()[:200]
    number = _page_number(request)
    with open_store(config) as store:
        leads, total = store.waiting_page(
            now, query, offset=(number - 1) * PAGE_SIZE, limit=PAGE_SIZE
        )
        closed = [] if number > 1 else store.recently_closed(now, now - RECENT, RECENT_LIMIT)
        quarantined = [] if number > 1 else store.quarantined()[:RECENT_LIMIT]
    pages = max(1, -(-total // PAGE_SIZE))
    return page(
        request,
        "index.html",
        rows=[views.row(lead, config, now, _) for lead in leads],
        closed=[views.row(lead, config, now, _) for lead in closed],
        set_aside=views.set_aside(quarantined, config),
        total=total,
        claims=config.claims is not None,
        query=query,
        number=number,
        pages=pages,
    )


def _page_number(request: Request) -> int:
    text = request.query_params.get("page", "1")
    return int(text) if text.isdigit() and 0 < int(text) < 1_000_000 else 1


def lead_page(request: Request) -> Response:
    config = config_of(request)
    now = now_of(request)
    _ = gettext_for(config)
    lead_id = request.path_params["lead_id"]
    with open_store(config) as store:
        lead = store.lead(lead_id)
        if lead is None:
            raise HTTPException(404)
        messages = store.messages_for(lead_id)
        audit = store.audit(lead_id)
        last_poll = store.last_success()
    answering = config.console is not None and config.console.answer and config.server is not None
    waiting = lead.resolution is None and lead.remaining(now) > timedelta(0)
    return page(
        request,
        "lead.html",
        lead=views.detail(lead, config, now, _, last_poll),
        messages=views.message_lines(messages, config, _),
        error=request.query_params.get("error", "") == "duration",
        answers=views.audit_lines(audit, config, _),
        can_answer=answering and waiting,
        holder=views.holder_view(lead.claimed(now), config, now),
        can_claim=waiting and config.claims is not None,
        team_refused=request.query_params.get("team", "") == "refused",
    )


def refuse_on_standby(request: Request) -> None:
    """A standby replica (state.url, SPEC 16) serves the console read-only."""
    if not getattr(request.app.state.host, "active", True):
        raise HTTPException(
            409, "this replica is a standby: the console is read-only here (use the active one)"
        )


async def silence(request: Request) -> Response:
    refuse_on_standby(request)
    form = await checked_form(request)
    lead_id = request.path_params["lead_id"]
    try:
        length = parse_duration(form.get("duration", ""))
    except ValueError:
        length = timedelta(0)
    if not timedelta(0) < length <= LONGEST_SILENCE:
        return RedirectResponse(f"/leads/{_quoted(lead_id)}?error=duration", status_code=303)
    reason = form.get("reason", "").strip()[:500]
    viewer = getattr(request.state, "viewer", None)
    by = viewer.email if viewer is not None else ""

    def write() -> None:
        config, now = config_of(request), now_of(request)
        with open_store(config) as store:
            if not store.known(lead_id):
                raise HTTPException(404)
            store.silence(lead_id, now + length, now, reason=reason, by=by or "console")

    await run_in_threadpool(write)
    return RedirectResponse(f"/leads/{_quoted(lead_id)}", status_code=303)


async def unsilence(request: Request) -> Response:
    refuse_on_standby(request)
    await checked_form(request)
    lead_id = request.path_params["lead_id"]

    def write() -> None:
        with open_store(config_of(request)) as store:
            if not store.known(lead_id):
                raise HTTPException(404)
            store.unsilence(lead_id)

    await run_in_threadpool(write)
    return RedirectResponse(f"/leads/{_quoted(lead_id)}", status_code=303)


def _quoted(lead_id: str) -> str:
    from urllib.parse import quote

    return quote(lead_id, safe="")


def api_leads(request: Request) -> Response:
    """What `status --json` prints, API_PAGE leads at a time (most urgent first): when more
    follow, a ``Link: <...?after=KEY>; rel="next"`` header names the next page. ``?all=1``:
    every lead, resolved ones too (as `status --json --all`), in one streamed answer."""
    config = config_of(request)
    now = now_of(request)
    if request.query_params.get("all", "") in ("1", "true", "yes"):
        return StreamingResponse(_every_lead(config, now), media_type="application/json")
    after = _cursor(request.query_params.get("after"))
    with open_store(config) as store:
        leads, last = store.waiting_after(after, API_PAGE)
    headers = {}
    if last is not None:
        headers["Link"] = f'</api/leads?after={_cursor_text(last)}>; rel="next"'
    return Response(_json_list(leads, now), media_type="application/json", headers=headers)


def _cursor(text: str | None) -> tuple[str, str] | None:
    """The key a ``Link: rel="next"`` named, or a 400 for one this server did not give."""
    if text is None:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(text.encode("ascii") + b"=="))
    except ValueError:
        key = None
    if not (isinstance(key, list) and len(key) == 2 and all(isinstance(k, str) for k in key)):
        raise HTTPException(
            400, "after= is not a cursor this server gave: start again from /api/leads"
        )
    return key[0], key[1]


def _cursor_text(key: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def _json_list(leads: list[Lead], now: datetime) -> bytes:
    """A JSON array, written as JSONResponse writes one."""
    items = (status_view.as_json(lead, now) for lead in leads)
    return ("[" + ",".join(map(_json_text, items)) + "]").encode()


def _json_text(item: Any) -> str:
    return json.dumps(item, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def _every_lead(config: Config, now: datetime) -> AsyncIterator[bytes]:
    """Every lead as one JSON array, API_PAGE leads at a time, each read on the thread pool
    with its own Store (a connection serves one thread): memory stays flat and the first
    bytes go out at once. The ids are read first, so a lead appears once even if a poll
    changes deadlines meanwhile."""

    def ids() -> list[str]:
        with open_store(config) as store:
            return store.lead_ids(include_resolved=True)

    def chunk(some: list[str]) -> list[Lead]:
        with open_store(config) as store:
            return store.leads(include_resolved=True, ids=some)

    every = await run_in_threadpool(ids)
    yield b"["
    separator = b""
    for start in range(0, len(every), API_PAGE):
        leads = await run_in_threadpool(chunk, every[start : start + API_PAGE])
        if leads:
            yield separator + _json_list(leads, now)[1:-1]
            separator = b","
    yield b"]"


def favicon(request: Request) -> Response:
    """Where browsers and bookmarks look for the icon without reading the page first."""
    return _packaged("favicon.ico")


def static(request: Request) -> Response:
    """Only the files named in STATIC, from inside the package: nothing else is reachable."""
    return _packaged(request.path_params["name"])


def _packaged(name: str) -> Response:
    from importlib import resources

    if name not in STATIC:
        raise HTTPException(404)
    data = (resources.files("referral_watch.web") / "static" / name).read_bytes()
    return Response(
        data,
        media_type=STATIC[name],
        headers={"Cache-Control": "public, max-age=86400"},
    )
