"""The answer page (SPEC 14): `/leads/{id}/answer?action=accept|decline` from an alert's link.

GET shows the lead (customer, value, time left, notes, who else was told) and asks to confirm;
a decline needs a reason (a common one, or free text), sent as ``statusReason``. The POST
(CSRF-checked) answers with the signed-in person's own delegated token from the console's
server-side MSAL cache (refreshed silently), so Partner Center records who answered; the
daemon's token is never used here. See ``answering`` for what happens then. Only an
``allowed`` person signed in with Microsoft (``sign_in = "entra"``) may answer: with
``sign_in = "none"`` nobody is known, so the page says to use `referral-watch answer`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from referral_watch.config import Config, ConsoleConfig
from referral_watch.errors import AuthError
from referral_watch.model import Lead
from referral_watch.partner_center.answering import (
    ACTIONS,
    DECLINE,
    AnswerRefused,
    Outcome,
    Person,
    already_text,
    answer_lead,
)
from referral_watch.partner_center.client import PartnerCenter
from referral_watch.render.i18n import N_
from referral_watch.web import signin, views
from referral_watch.web.console import (
    checked_form,
    config_of,
    gettext_for,
    now_of,
    open_store,
    page,
    refuse_on_standby,
)
from referral_watch.web.identity import Identity

log = structlog.get_logger(__name__)

# Common reasons to decline, as Partner Center receives them (statusReason); "other" is typed.
REASONS = (
    N_("We do not cover the customer's region"),
    N_("Outside our solution area"),
    N_("No capacity at the moment"),
    N_("The customer's needs do not fit our offering"),
    N_("Duplicate of an engagement we already have"),
)
OTHER = "other"


def routes() -> list[BaseRoute]:
    return [
        Route("/leads/{lead_id}/answer", answer_page, methods=["GET", "HEAD"]),
        Route("/leads/{lead_id}/answer", confirm, methods=["POST"]),
    ]


def _answering(request: Request) -> ConsoleConfig:
    """The console settings when answering is on, else 404 (a read-only console)."""
    config = config_of(request)
    console = config.console
    if console is None or not console.answer or config.server is None:
        raise HTTPException(404)
    return console


def _person(request: Request, console: ConsoleConfig) -> Person | None:
    return signed_in_person(request, console, doing="answer")


def signed_in_person(
    request: Request, console: ConsoleConfig, *, doing: str, via: str = "console"
) -> Person | None:
    """The signed-in, allowed person who is ``doing`` something to a lead (answer, claim);
    None without a Microsoft sign-in (sign_in = "none"); 403 outside ``console.allowed``."""
    viewer = getattr(request.state, "viewer", None)
    if console.sign_in != "entra" or viewer is None or not viewer.email:
        return None
    if not signin.allowed(viewer.email, console.allowed):  # `allowed` may shrink on a reload
        log.warning(f"{doing}.refused", who=viewer.email, why="not in console.allowed")
        raise HTTPException(403, f"{viewer.email} may not {doing} leads here (console.allowed).")
    return Person(viewer.email, viewer.name or viewer.email, via)


def _action(value: str | None, *, exact: bool = True) -> str:
    """``accept`` or ``decline``, else 400: an answer cannot be undone, so nothing is ever
    assumed. A link's ``?action=DECLINE`` means decline (``exact=False``); a form posts the
    exact word."""
    wanted = value if exact or value is None else value.strip().lower()
    if wanted not in ACTIONS:
        raise HTTPException(400, "Unknown action: open the answer page from an alert's link.")
    return wanted


@dataclass(frozen=True)
class Told:
    channel: str
    what: str


def _told(rows: list[dict[str, Any]]) -> list[Told]:
    """Who else heard about the lead: each channel once, with the last tier sent to it."""
    seen: dict[str, str] = {}
    for row in rows:
        if row["state"] == "delivered" and row["kind"] == "tier":
            seen[row["channel"]] = row["tier"] or ""
    return [Told(channel, tier) for channel, tier in seen.items()]


def _show(
    request: Request,
    lead: Lead,
    action: str,
    *,
    notice: str = "",
    problem: str = "",
    status: int = 200,
    told: list[Told] | None = None,
    consent: str = "",
) -> Response:
    config = config_of(request)
    _ = gettext_for(config)
    console = config.console
    person = _person(request, console) if console is not None else None
    pending = lead.resolution is None and lead.remaining(now_of(request)).total_seconds() > 0
    return page(
        request,
        "answer.html",
        status=status,
        lead=views.detail(lead, config, now_of(request), _),
        action=action,
        reasons=[(_(reason), reason) for reason in REASONS],
        other=OTHER,
        told=told or [],
        notice=notice,
        problem=problem,
        consent=consent,
        can_answer=pending and person is not None and not notice,
        signed_in=person is not None,
        answered=already_text(lead.answered) if lead.answered else "",
    )


def answer_page(request: Request) -> Response:
    _answering(request)
    lead_id = request.path_params["lead_id"]
    action = _action(request.query_params.get("action"), exact=False)
    with open_store(config_of(request)) as store:
        lead = store.lead(lead_id)
        if lead is None:
            raise HTTPException(404)
        told = _told(store.messages_for(lead_id))
    return _show(request, lead, action, told=told)


async def confirm(request: Request) -> Response:
    console = _answering(request)
    refuse_on_standby(request)  # the active replica answers (it holds the state's lock)
    form = await checked_form(request)
    lead_id = request.path_params["lead_id"]
    action = _action(form.get("action"))
    person = _person(request, console)
    config = config_of(request)
    _ = gettext_for(config)
    if person is None:
        raise HTTPException(
            403,
            "Answering from the console needs a Microsoft sign-in; use `referral-watch answer`.",
        )
    reason = _reason(form) if action == DECLINE else ""
    with open_store(config) as store:
        lead = store.lead(lead_id)
    if lead is None:
        raise HTTPException(404)
    if action == DECLINE and not reason:
        problem = _("Choose or write a reason to decline.")
        return _show(request, lead, action, problem=problem, status=400)
    token = await run_in_threadpool(person_token, request, console)
    if token is None:
        here = f"/leads/{quote(lead_id, safe='')}/answer?action={action}"
        login = f"/auth/login?next={quote(here, safe='')}"
        log.warning("answer.refused", lead=lead_id, who=person.who, why="no Partner Center token")
        return _show(request, lead, action, consent=login, status=403)
    now = now_of(request)
    outcome = await run_in_threadpool(_answer, config, lead_id, action, reason, person, token, now)
    if outcome.ok:
        tell_now(request)
    if outcome.settled:
        return RedirectResponse(f"/leads/{quote(lead_id, safe='')}", status_code=303)
    with open_store(config) as store:
        fresh = store.lead(lead_id) or lead
    return _show(
        request, fresh, action, notice=_outcome_text(outcome, _), status=_status_of(outcome)
    )


def _reason(form: dict[str, str]) -> str:
    chosen = form.get("reason", "")
    typed = " ".join(form.get("other", "").split())[:500]
    if chosen == OTHER or not chosen:
        return typed
    return chosen if chosen in REASONS else typed


def person_token(request: Request, console: ConsoleConfig) -> str | None:
    """The person's delegated Partner Center token from the console's MSAL cache, refreshed
    silently when it has expired; None when there is none (they must sign in and consent)."""
    viewer = request.state.viewer
    sessions: signin.Sessions = request.app.state.sessions
    account = sessions.account(viewer.session)
    if account is None:
        return None
    identity: Identity = request.app.state.identity
    try:
        return identity.token(console, account, signin.PARTNER_CENTER_SCOPE)
    except Exception as exc:  # MSAL or the network: the person signs in again
        log.warning("answer.token_failed", who=viewer.email, error=type(exc).__name__)
        return None


class PersonOnly:
    """The token provider of the client the page uses: the person's token is passed to each
    call, so the daemon's own sign-in must never be asked for one here."""

    def get_token(self, *, force_refresh: bool = False) -> str:
        raise AuthError("the console answers only with the signed-in person's own token")


def _answer(
    config: Config,
    lead_id: str,
    action: str,
    reason: str,
    person: Person,
    token: str,
    now: Any,
) -> Outcome:
    with open_store(config) as store, PartnerCenter(config.partner_center, PersonOnly()) as api:
        try:
            return answer_lead(store, api, lead_id, action, reason, person, now, token=token)
        except AnswerRefused as exc:
            raise HTTPException(400, str(exc)) from None


def tell_now(request: Request) -> None:
    """The daemon decides and delivers at once (`on_resolved` hears an answer, the team hears
    who took a lead), one deliverer per outbox, in the background so the page answers without
    waiting for the channels."""
    notify_now = getattr(request.app.state.host, "notify_now", None)
    if notify_now is not None:
        threading.Thread(target=notify_now, name="answer-notify", daemon=True).start()


def _outcome_text(outcome: Outcome, _: Callable[[str], str]) -> str:
    entry = outcome.entry
    if entry.result == "changed":
        state = ""
        if outcome.current:
            state = " / ".join(
                str(outcome.current.get(key) or "") for key in ("status", "substatus")
            )
        return _(
            "The referral was changed in Partner Center meanwhile; nothing was answered. "
            "It is now: {state}. Look again, then answer."
        ).format(state=state or "?")
    if entry.result == "refused":
        return _(
            "Partner Center refused: your account lacks the Referral Admin or Referral User "
            "role. Ask a Partner Center admin to assign one."
        )
    if entry.result == "gone":
        return _("Partner Center no longer knows this referral; nothing was answered.")
    if entry.result == "already":
        return entry.detail
    return _("Partner Center did not take the answer: {error}").format(error=entry.detail)


def _status_of(outcome: Outcome) -> int:
    return {"changed": 409, "refused": 403, "gone": 404, "already": 409}.get(
        outcome.entry.result, 502
    )
