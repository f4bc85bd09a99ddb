"""Short ids in `status`: the shortest prefix no other id shares, at least 8 characters."""

from __future__ import annotations

import pytest

from referral_watch.render.status_view import short_ids


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([], {}),
        (["0a9d3c1e-5b7f"], {"0a9d3c1e-5b7f": "0a9d3c1e"}),
        (["abc"], {"abc": "abc"}),  # shorter than the minimum: the whole id
        (
            ["0a9d3c1e-5b7f", "0a9d3c1e-5c00", "0a9d3c1f-0000"],
            {
                "0a9d3c1e-5b7f": "0a9d3c1e-5b",
                "0a9d3c1e-5c00": "0a9d3c1e-5c",
                "0a9d3c1f-0000": "0a9d3c1f",
            },
        ),
        (["lead-0001", "lead-0001-b"], {"lead-0001": "lead-0001", "lead-0001-b": "lead-0001-"}),
    ],
)
def test_short_ids(ids: list[str], expected: dict[str, str]) -> None:
    assert short_ids(ids) == expected
    shown = list(short_ids(ids).values())
    assert len(set(shown)) == len(shown)
