"""The demo, end to end, as `make demo` runs it (without the pauses)."""

from __future__ import annotations

import subprocess
import sys


def test_demo_shows_the_whole_story_and_exits_0() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "referral_watch", "demo", "--fast"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Traceback" not in out + done.stderr
    # every kind of message the product sends, as the summary records them
    for what in ("new@", "reminder@", "urgent@", "final@", "resolved@", "expired@"):
        assert what in out, what
    assert "Lead expires in" in out
    assert "Lead expired unanswered: Tailspin Toys" in out
    assert "Lead accepted: Adatum Corporation" in out
    # answered through referral-watch's own answer path (a PATCH to the sandbox)
    assert "Accepted by Ann de Vries via referral-watch" in out
    assert "7 leads need an answer within 14d" in out  # the digest
    assert "Summary: what each lead received" in out
    # the malformed record is reported, not fatal
    assert "has no valid createdDateTime" in done.stderr
    # a final reminder repeats while the lead stays in that tier
    fabrikam = next(line for line in out.splitlines() if line.strip().startswith("Fabrikam"))
    assert fabrikam.count("final@") == 2
    assert "expired " in fabrikam
