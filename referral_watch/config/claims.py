"""[claims] across sections (SPEC 17): the owner channel exists and is an email channel, and
tiers that go to the owner have one. Run by check-config and by `run` at start."""

from __future__ import annotations

import re

from referral_watch.config import Config


def claims_problems(config: Config) -> list[str]:
    """[claims] across sections: the owner channel exists and is an email channel, and tiers
    that go to the owner have one."""
    claims = config.claims
    if claims is None:
        return []
    problems = []
    name = claims.owner_channel
    if name is not None:
        channel = config.channels.get(name)
        if channel is None:
            known = ", ".join(sorted(config.channels)) or "none"
            problems.append(f"claims.owner_channel: unknown channel {name!r} (known: {known})")
        elif not re.match(r"mailtos?://", channel.url):
            problems.append(
                f"claims.owner_channel: channel {name!r} is not an email channel (mailto:// or "
                "mailtos://): its alerts go to the owner's address"
            )
    owner_tiers = [tier for tier in config.policy.tiers if tier.claimed == "owner"]
    if name is None and owner_tiers:
        keys = ", ".join(tier.key for tier in sorted(owner_tiers, key=lambda t: t._position))
        problems.append(
            f"claims.owner_channel: required: {keys} go to the owner while claimed (when_claimed "
            '"owner", the default for every tier but the last); name an email channel, or set '
            'when_claimed = "all" or "skip" on those tiers'
        )
    return problems
