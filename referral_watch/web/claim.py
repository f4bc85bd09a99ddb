"""The claim page (SPEC 17): `/leads/{id}/claim` from an alert's Take-it link or the console.

GET shows the lead (customer, value, time left, who holds it) and asks to confirm: "Take it",
or "Take over" naming the owner and since when. The POST (CSRF-checked) makes the signed-in
person the owner through ``claiming.claim_lead`` ("alert" from the link, "console" from the
console's buttons); `/leads/{id}/unclaim` ends the claim. Only an ``allowed`` person signed in
with Microsoft (``sign_in = "entra"``) may claim: the owner is who clicked, so with
``sign_in = "none"`` nobody is known and the page says to use `referral-watch claim`. A standby
replica (state.url) refuses with 409, as for silences and answers.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from referral_watch.claiming import HELD, ClaimOutcome, ClaimRefused, claim_lead, unclaim_lead
from referral_watch.config import Config, ConsoleConfig
from referral_watch.model import Lead
from referral_watch.partner_center.answering import Person
from referral_watch.partner_center.client import PartnerCenter
from referral_watch.web import views
from referral_watch.web.answer import PersonOnly, person_token, signed_in_person, tell_now
from referral_watch.web.console import (
    checked_form,
    config_of,
    gettext_for,
    now_of,
    open_store,
    page,
    refuse_on_standby,
)

log = structlog.get_logger(__name__)

VIAS = ("alert", "console")  # the Take-it link in a message, the console's buttons


def routes() -> list[BaseRoute]:
    return [
        Route("/leads/{lead_id}/claim", claim_page, methods=["GET", "HEAD"]),
        Route("/leads/{lead_id}/claim", confirm, methods=["POST"]),
        Route("/leads/{lead_id}/unclaim", unclaim, methods=["POST"]),
    ]


def claims_on(config: Config) -> bool:
    """Claims from the console: a [console] and a [claims] section."""
    return config.console is not None and config.claims is not None


def _console(request: Request) -> ConsoleConfig:
    """The console settings when claims are on, else 404."""
    config = config_of(request)
    if not claims_on(config) or config.console is None:
        raise HTTPException(404)
    return config.console


def _person(request: Request, console: ConsoleConfig, via: str) -> Person | None:
    return signed_in_person(request, console, doing="claim", via=via)


def _via(value: str | None) -> str:
    return value if value in VIAS else "alert"


def _show(
    request: Request,
    lead: Lead,
    via: str,
    *,
    notice: str = "",
    status: int = 200,
) -> Response:
    config = config_of(request)
    _ = gettext_for(config)
    now = now_of(request)
    console = config.console
    person = _person(request, console, via) if console is not None else None
    holder = lead.claimed(now)
    pending = lead.resolution is None and lead.remaining(now) > timedelta(0)
    mine = holder is not None and person is not None and holder.email == person.who.lower()
    return page(
        request,
        "claim.html",
        status=status,
        lead=views.detail(lead, config, now, _),
        holder=views.holder_view(holder, config, now),
        mine=mine,
        via=via,
        notice=notice,
        signed_in=person is not None,
        can_claim=pending and person is not None and not mine,
        pending=pending,
    )


def claim_page(request: Request) -> Response:
    _console(request)
    lead_id = request.path_params["lead_id"]
    with open_store(config_of(request)) as store:
        lead = store.lead(lead_id)
    if lead is None:
        raise HTTPException(404)
    return _show(request, lead, _via(request.query_params.get("via")))


async def confirm(request: Request) -> Response:
    console = _console(request)
    refuse_on_standby(request)  # the active replica writes the state
    form = await checked_form(request)
    lead_id = request.path_params["lead_id"]
    via = _via(form.get("via"))
    person = _person(request, console, via)
    if person is None:
        raise HTTPException(
            403, "Claiming from the console needs a Microsoft sign-in; use `referral-watch claim`."
        )
    config = config_of(request)
    with open_store(config) as store:
        lead = store.lead(lead_id)
    if lead is None:
        raise HTTPException(404)
    token = None
    if config.claims is not None and config.claims.add_to_team:
        token = await run_in_threadpool(person_token, request, console)
    take_over = form.get("take_over") == "1"
    note = form.get("note", "")[:500]
    now = now_of(request)
    outcome = await run_in_threadpool(_claim, config, lead_id, person, now, note, take_over, token)
    if outcome.code != HELD:
        tell_now(request)  # the team hears "taken by" now, not at the next poll
        target = f"/leads/{quote(lead_id, safe='')}"
        if outcome.team is not None and not outcome.team.ok:
            target += "?team=refused"
        return RedirectResponse(target, status_code=303)
    # Someone else took it meanwhile (or held it and the take-over was not confirmed).
    _ = gettext_for(config)
    with open_store(config) as store:
        fresh = store.lead(lead_id) or lead
    notice = _("{name} holds this lead now; nothing changed. Take it over below if you must.")
    holder = outcome.previous
    name = holder.name or holder.email if holder is not None else "?"
    return _show(request, fresh, via, notice=notice.format(name=name), status=409)


def _claim(
    config: Config,
    lead_id: str,
    person: Person,
    now: Any,
    note: str,
    take_over: bool,
    token: str | None,
) -> ClaimOutcome:
    with open_store(config) as store:
        try:
            if token is None:
                return claim_lead(
                    store, config, lead_id, person, now, note=note, take_over=take_over
                )
            with PartnerCenter(config.partner_center, PersonOnly()) as api:
                return claim_lead(
                    store,
                    config,
                    lead_id,
                    person,
                    now,
                    note=note,
                    take_over=take_over,
                    api=api,
                    token=token,
                )
        except ClaimRefused as exc:
            raise HTTPException(400, str(exc)) from None


async def unclaim(request: Request) -> Response:
    console = _console(request)
    refuse_on_standby(request)
    await checked_form(request)
    lead_id = request.path_params["lead_id"]
    person = _person(request, console, "console")
    if person is None:
        raise HTTPException(
            403,
            "Unclaiming from the console needs a Microsoft sign-in; use `referral-watch unclaim`.",
        )
    config, now = config_of(request), now_of(request)

    def write() -> ClaimOutcome:
        with open_store(config) as store:
            lead = store.lead(lead_id)
            if lead is None:
                raise HTTPException(404)
            holder = lead.claimed(now)
            if holder is not None and holder.email != person.who.lower():
                raise HTTPException(
                    403, f"{holder.email} holds this lead: only they can give it up here."
                )
            try:
                return unclaim_lead(store, config, lead_id, person, now)
            except ClaimRefused as exc:
                raise HTTPException(400, str(exc)) from None

    await run_in_threadpool(write)
    return RedirectResponse(f"/leads/{quote(lead_id, safe='')}", status_code=303)
