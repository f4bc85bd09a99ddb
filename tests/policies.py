"""The usual policy, written once: the policy tests, the property tests and the benchmark all
decide with the same four tiers (new 14d, reminder 7d, urgent 2d, final 12h repeating every 4h
through quiet hours), expired notices to the managers and resolved ones to the team."""

from __future__ import annotations

import json

FINAL_REPEATS = """repeat = "4h"
bypass_quiet = true
"""


def tiers(*, final_repeats: bool = True) -> str:
    """The four tiers; the final one repeats every 4h through quiet hours unless told not to
    (the end-to-end world's final tier is heard once)."""
    return f"""
[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]

[[policy.tiers]]
name = "reminder"
remaining = "7d"
notify = ["team"]

[[policy.tiers]]
name = "urgent"
remaining = "2d"
notify = ["team", "managers"]

[[policy.tiers]]
name = "final"
remaining = "12h"
notify = ["team", "managers"]
{FINAL_REPEATS if final_repeats else ""}"""


def policy(**settings: object) -> str:
    """The ``[policy]`` section with these settings (``digest_over=3``, ...) and the tiers."""
    lines = ["[policy]", *(f"{key} = {json.dumps(value)}" for key, value in settings.items())]
    lines += ['on_expired = ["managers"]', 'on_resolved = ["team"]']
    return "\n".join(lines) + "\n" + tiers()
