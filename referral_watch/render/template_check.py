"""PURE: checking the per-tier Jinja2 overrides before they are needed (check-config and
the daemon's start): each is rendered with sample leads in every locale its channels use."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from referral_watch.config import Config, TierConfig
from referral_watch.model import Lead, Referral, TeamMember
from referral_watch.render.channels import Style, style_for
from referral_watch.render.messages import template_context
from referral_watch.render.templates import template_problem
from referral_watch.render.words import Words

_SAMPLE_NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def _sample_leads() -> list[Lead]:
    """A lead with every field and one with none of the optional ones."""
    created = _SAMPLE_NOW - timedelta(days=12)
    full = Referral(
        id="00000000-0000-0000-0000-000000000001",
        name="Sample lead",
        customer="Fabrikam Customer Inc",
        created=created,
        status="New",
        substatus="Pending",
        type="Independent",
        direction="Incoming",
        country="NL",
        deal_value=Decimal("25000"),
        currency="USD",
        notes="Interested in a migration to Azure.",
        products=("Azure",),
        solutions=("Sample solution",),
        team=(TeamMember(email="alice@example.com", name="Alice Example"),),
    )
    sparse = Referral(id="sample-2", name="", customer="Contoso", created=created)
    return [
        Lead(ref, deadline=created + timedelta(days=14), first_seen=created, last_seen=_SAMPLE_NOW)
        for ref in (full, sparse)
    ]


def _template_problem(source: str, tier: TierConfig, styles: Sequence[Style]) -> str | None:
    contexts = (
        template_context(Words(style, _SAMPLE_NOW), lead, tier)
        for style in styles
        for lead in _sample_leads()
    )
    return template_problem(source, contexts)


def check_templates(config: Config) -> list[str]:
    """Problems in the per-tier Jinja2 overrides, each with its key path.

    Each template is compiled and rendered with sample leads (one with every field, one with
    none of the optional ones) in every locale its channels use, so a typo or a template that
    breaks on a lead without a deal value shows up in check-config, not at 3 a.m.
    Key paths count tiers in the file's order, as the operator wrote them.
    """
    problems: list[str] = []
    for tier in config.policy.tiers:
        styles = list(dict.fromkeys(style_for(config, name) for name in ["", *tier.notify]))
        for field in ("title", "body"):
            source = getattr(tier, field)
            if not source:
                continue
            problem = _template_problem(source, tier, styles)
            if problem:
                problems.append(f"{tier.key}.{field}: {problem} (tier {tier.name!r})")
    return problems
