"""What a poll makes of each record it meets (records.Seen): unchanged, a duplicate of one met
earlier in the poll, or read (and whether its lead came earlier), and which watched leads it
did not return. Seen finds a steady page unchanged at once and reads which lead each stored
digest is only when it must; whatever it meets, it decides as the plain record-by-record
rule below does (the rule of 0.2, kept here as the reference)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from referral_watch.cycle.records import Seen

LEADS = [f"lead-{n}" for n in range(6)]


def _digest(lead: str, version: int) -> str:
    return f"{lead}@{version}"  # the same bytes are always the same lead's


class _Reference:
    """Record by record, with every watched lead's id and digest read when the poll begins."""

    def __init__(self, watched: dict[str, str | None], reread: bool) -> None:
        self.stored = {} if reread else {d: lead for lead, d in watched.items() if d}
        self.digests: dict[str, str] = {}
        self.ids: set[str] = set()
        self.watched = list(watched)

    def meet(self, digest: str, lead: str) -> tuple[Any, ...]:
        owner = self.stored.get(digest)
        if owner is not None and digest not in self.digests and owner not in self.ids:
            self.digests[digest] = owner
            self.ids.add(owner)
            return ("unchanged",)
        if digest in self.digests:
            return ("duplicate", self.digests[digest])
        repeated = lead in self.ids
        self.digests[digest] = lead
        self.ids.add(lead)
        return ("read", lead, repeated)

    def unmet(self) -> list[str]:
        return sorted(lead for lead in self.watched if lead not in self.ids)


records = st.tuples(st.sampled_from(LEADS), st.integers(0, 2))


@settings(max_examples=400, deadline=None)
@given(
    watched=st.dictionaries(st.sampled_from(LEADS), st.one_of(st.none(), st.integers(0, 2))),
    pages=st.lists(st.lists(records, min_size=1, max_size=5), max_size=5),
    reread=st.booleans(),
)
def test_seen_decides_each_record_as_the_record_by_record_rule_does(
    watched: dict[str, int | None], pages: list[list[tuple[str, int]]], reread: bool
) -> None:
    at_start = {
        lead: None if version is None else _digest(lead, version)
        for lead, version in watched.items()
    }
    state = dict(at_start)  # the state as the poll writes it: read late, it would mislead
    reads: list[int] = []

    def read_watched() -> list[tuple[str, str | None]]:
        reads.append(1)
        return list(state.items())

    stored = set() if reread else {d for d in at_start.values() if d}
    seen = Seen(stored, len(at_start), read_watched)
    reference = _Reference(at_start, reread)
    for page in pages:
        digests = [_digest(lead, version) for lead, version in page]
        expected = [reference.meet(d, lead) for d, (lead, _) in zip(digests, page, strict=True)]
        if seen.all_unchanged(digests):
            got: list[tuple[Any, ...]] = [("unchanged",)] * len(page)
        else:
            got = []
            for digest, (lead, _) in zip(digests, page, strict=True):
                if seen.unchanged(digest):
                    got.append(("unchanged",))
                elif (earlier := seen.met(digest)) is not None:
                    got.append(("duplicate", earlier))
                else:
                    got.append(("read", lead, seen.repeated(lead)))
                    seen.note(digest, lead)
        assert got == expected, (page, at_start)
        met = zip(page, digests, got, strict=True)
        written = [(lead, digest) for (lead, _), digest, how in met if how[0] == "read"]
        if written:
            seen.before_writing()
            state.update(written)  # the page's leads stored with their new digests
    assert sorted(seen.unmet()) == reference.unmet()
    assert len(reads) <= 1  # which lead each digest is: read once at most


def test_a_steady_poll_reads_no_lead_ids() -> None:
    stored = {_digest(lead, 0) for lead in LEADS}
    reads: list[int] = []
    seen = Seen(stored, len(LEADS), lambda: reads.append(1) or [])  # type: ignore[func-returns-value]
    assert seen.all_unchanged([_digest(lead, 0) for lead in LEADS[:3]])
    assert seen.all_unchanged([_digest(lead, 0) for lead in LEADS[3:]])
    assert seen.unmet() == []
    assert reads == []
