"""The state: schema, migrations, transactions, the instance lock.

Every test that takes `state_location` runs twice: on a SQLite file and on a real PostgreSQL
database (started by the test suite, see pgserver.py)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from referral_watch.errors import LockedError, StateError
from referral_watch.model import TIER, Alert, AuditEntry, parse_referral, record_digest
from referral_watch.state.journal import PollRecord
from referral_watch.state.lock import InstanceLock
from referral_watch.state.schema import SCHEMA_VERSION
from referral_watch.state.store import Store

from pgserver import PostgresServer

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
WINDOW = timedelta(days=14)


def referral(ref_id: str, created: datetime = NOW - timedelta(days=1)) -> dict[str, object]:
    return {
        "id": ref_id,
        "createdDateTime": created.strftime("%Y-%m-%dT%H:%M:%S.0000000Z"),
        "substatus": "Pending",
        "status": "New",
        "customerProfile": {"name": f"Customer {ref_id}"},
    }


def deadline(ref: object) -> datetime:
    return ref.created + WINDOW  # type: ignore[attr-defined, no-any-return]


def test_new_file_is_created_at_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.db"
    with Store(path):
        pass
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"leads", "outbox", "silences", "polls", "meta"} <= tables
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_new_database_is_created_at_the_current_schema(
    postgres: PostgresServer, pg_url: str
) -> None:
    with Store(pg_url):
        pass
    with Store(pg_url):  # opening again migrates nothing
        pass
    assert postgres.sql(pg_url, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    tables = {
        row[0]
        for row in postgres.sql(
            pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    }
    assert {"leads", "outbox", "silences", "polls", "meta"} <= tables


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(StateError, match="newer referral-watch"):
        Store(path)
    assert path.read_bytes() == before


def test_newer_database_schema_is_refused_and_left_untouched(
    postgres: PostgresServer, pg_url: str
) -> None:
    postgres.sql(pg_url, "CREATE TABLE schema_version (version BIGINT NOT NULL)")
    postgres.sql(pg_url, "INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StateError, match="newer referral-watch"):
        Store(pg_url)
    tables = postgres.sql(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert tables == [("schema_version",)]


def test_unreachable_database_is_a_clear_error_without_the_password(
    postgres: PostgresServer,
) -> None:
    from conftest import free_port

    url = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(StateError) as caught:
        Store(url)
    assert "unreachable" in str(caught.value) and "127.0.0.1" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_corrupt_file_gets_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    before = path.read_bytes()
    with pytest.raises(StateError, match="corrupt"):
        Store(path)
    assert path.read_bytes() == before


def test_missing_state_for_a_reader_says_what_to_run(state_location: Path | str) -> None:
    with pytest.raises(StateError, match="run --once"):
        Store(state_location, create=False)


def test_a_failed_transaction_changes_nothing(state_location: Path | str) -> None:
    with Store(state_location) as store:
        with pytest.raises(RuntimeError), store.transaction():
            store.upsert([parse_referral(referral("a"))], deadline, NOW)
            raise RuntimeError("the poll failed on page 2")
        assert store.leads() == []


def test_upsert_counts_new_leads_once_and_keeps_first_seen(state_location: Path | str) -> None:
    with Store(state_location) as store:
        with store.transaction():
            assert store.upsert([parse_referral(referral("a"))], deadline, NOW) == 1
        later = NOW + timedelta(hours=1)
        with store.transaction():
            assert (
                store.upsert(
                    [parse_referral(referral("a")), parse_referral(referral("b"))], deadline, later
                )
                == 1
            )
        leads = {lead.id: lead for lead in store.leads()}
        assert leads["a"].first_seen == NOW and leads["a"].last_seen == later
        assert store.absent_since(later) == []
        with store.transaction():
            store.upsert([parse_referral(referral("b"))], deadline, later + timedelta(hours=1))
        assert store.absent_since(later + timedelta(hours=1)) == ["a"]


def test_more_severe_tier_supersedes_a_held_one(state_location: Path | str) -> None:
    with Store(state_location) as store:
        with store.transaction():
            store.upsert([parse_referral(referral("a"))], deadline, NOW)
            store.record([Alert("a", TIER, "team", "reminder", 1)], NOW)
        with store.transaction():
            store.record([Alert("a", TIER, "team", "urgent", 2)], NOW + timedelta(hours=1))
        pending = store.pending()
        assert [(row.tier, row.channel) for row in pending] == [("urgent", "team")]
        states = {s.tier: s.state for s in store.history()["a"]}
        assert states == {"reminder": "superseded", "urgent": "pending"}


def test_failed_rows_are_dropped_after_the_give_up_time(state_location: Path | str) -> None:
    with Store(state_location) as store:
        with store.transaction():
            store.upsert([parse_referral(referral("a"))], deadline, NOW)
            store.record([Alert("a", TIER, "team", "new", 0)], NOW)
        row = store.pending()[0].id
        day = timedelta(days=1)
        assert store.failed([row], "HTTP 500", NOW, day) == []
        assert store.failed([row], "HTTP 500", NOW + timedelta(hours=23), day) == []
        assert store.pending()[0].attempts == 2
        assert store.failed([row], "HTTP 500", NOW + day, day) == [row]
        assert store.pending() == []


def test_second_process_is_refused_by_the_lock(tmp_path: Path) -> None:
    lock_path = tmp_path / "state.db.lock"
    code = (
        "import sys; from pathlib import Path\n"
        "from referral_watch.state.lock import InstanceLock\n"
        "from referral_watch.errors import LockedError\n"
        f"lock = InstanceLock(Path({str(lock_path)!r}))\n"
        "try:\n    lock.acquire()\nexcept LockedError as e:\n    print(e); sys.exit(3)\n"
    )
    with InstanceLock(lock_path):
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode == 3
        assert "another referral-watch process" in other.stdout
        with pytest.raises(LockedError):
            InstanceLock(lock_path).acquire()
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert after.returncode == 0


def _back_to(where: Path | str, version: int, *statements: str) -> None:
    """Turn a current state back into one written at schema `version` (what a state left by
    an older referral-watch holds), so opening it runs the later migrations for real."""
    undo = [*statements, "DROP TABLE lead_quiet"]  # schema 9: when the next tier falls due
    if version < 8:  # schema 8 added the claims of leads
        undo.append("DROP TABLE claims")
    if version < 7:  # schema 7 the digests
        undo += ["DROP INDEX leads_watched", "ALTER TABLE leads DROP COLUMN digest"]
    if version < 6:  # schema 6 added the relay queue
        undo.append("DROP TABLE relay_queue")
    if version < 5:  # schema 5 the outbox claim columns
        undo.append("ALTER TABLE outbox DROP COLUMN claim_owner")
        undo.append("ALTER TABLE outbox DROP COLUMN claim_until")
    if isinstance(where, Path):
        db = sqlite3.connect(where)
        for statement in undo:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {version}")
        db.commit()
        db.close()
        return
    import psycopg

    with psycopg.connect(where, autocommit=True) as conn:
        for statement in undo:
            conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("UPDATE schema_version SET version = %s", (version,))


def _version(store: Store) -> int:
    return store.dialect.version(store.db)


def test_a_state_from_before_the_quarantine_gains_it_and_keeps_its_leads(
    state_location: Path | str,
) -> None:
    with Store(state_location) as store, store.transaction():
        store.upsert([parse_referral(referral("old-lead"))], deadline, NOW)
    _back_to(state_location, 2, "DROP TABLE quarantine", "DROP TABLE audit")
    with Store(state_location) as store:
        assert [lead.id for lead in store.leads()] == ["old-lead"]
        assert store.quarantine("bad-1", "parse", "no createdDateTime", NOW, lead_id="bad-1")
        assert _version(store) == SCHEMA_VERSION


def test_a_state_from_before_the_audit_gains_it_and_keeps_its_leads(
    state_location: Path | str,
) -> None:
    with Store(state_location) as store, store.transaction():
        store.upsert([parse_referral(referral("old-lead"))], deadline, NOW)
    _back_to(state_location, 3, "DROP TABLE audit")
    with Store(state_location) as store:
        assert [lead.id for lead in store.leads()] == ["old-lead"]
        entry = AuditEntry(
            "old-lead", NOW, "ann@contoso.com", "Ann", "console", "accept", "accepted"
        )
        store.record_answer(entry)
        assert store.audit("old-lead") == [entry]
        assert store.lead("old-lead").answered == entry  # type: ignore[union-attr]
        assert store.lead("old-lead").resolution == "accepted"  # type: ignore[union-attr]
        assert store.leads() == []  # resolved at once: no longer watched
        assert _version(store) == SCHEMA_VERSION == 9


def test_a_state_from_before_the_digests_gains_them_and_keeps_its_leads(
    state_location: Path | str,
) -> None:
    with Store(state_location) as store, store.transaction():
        store.upsert([parse_referral(referral("old-lead"))], deadline, NOW)
    _back_to(state_location, 6)
    with Store(state_location) as store:
        assert [lead.id for lead in store.leads()] == ["old-lead"]
        assert store.digests() == [("old-lead", None)]  # read once more by the next poll
        assert _version(store) == SCHEMA_VERSION
        with store.transaction():
            store.upsert([parse_referral(referral("old-lead"))], deadline, NOW)
        [(_, digest)] = store.digests()
        assert digest == record_digest(parse_referral(referral("old-lead")).raw)


def test_a_state_from_before_the_claims_gains_them_and_keeps_its_outbox(
    state_location: Path | str,
) -> None:
    with Store(state_location) as store:
        row = store.enqueue_message("ops", "ops", "title", "body", NOW)
    _back_to(state_location, 4)
    with Store(state_location) as store:
        assert [r.id for r in store.pending()] == [row]
        assert store.claim([row], NOW)
        assert _version(store) == SCHEMA_VERSION


def test_a_quarantined_record_is_new_once_and_released_when_it_goes_through(
    state_location: Path | str,
) -> None:
    with Store(state_location) as store:
        assert store.quarantine("bad-1", "parse", "first reason", NOW, raw="x" * 10_000)
        assert not store.quarantine("bad-1", "store", "second reason", NOW + WINDOW)
        (item,) = store.quarantined()
        assert (item.key, item.stage, item.reason) == ("bad-1", "store", "second reason")
        assert (item.first_seen, item.last_seen) == (NOW, NOW + WINDOW)
        assert item.raw is not None and len(item.raw) == 4096
        assert [q.key for q in store.quarantined(unnotified=True)] == ["bad-1"]
        store.mark_quarantine_notified(["bad-1"])
        assert store.quarantined(unnotified=True) == []
        assert store.release(["bad-1"], stages=("render",)) == 0  # failed elsewhere: kept
        assert store.release(["bad-1"]) == 1
        assert store.quarantined() == []


def test_state_file_wal_lock_and_folder_are_private_under_umask_022(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "state"
    code = (
        "import os, sys; from pathlib import Path; os.umask(0o022)\n"
        "from referral_watch.state.lock import InstanceLock\n"
        "from referral_watch.state.store import Store\n"
        "folder = Path(sys.argv[1])\n"
        "with InstanceLock(folder / 'state.db.lock'), Store(folder / 'state.db') as store:\n"
        "    store.set_meta('k', 'v')\n"
        "    files = [folder, *sorted(folder.iterdir())]\n"
        "    print(' '.join(oct(p.stat().st_mode & 0o777) for p in files))\n"
        "    print(' '.join(p.name for p in files[1:]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[1] == "state.db state.db-shm state.db-wal state.db.lock"
    assert out[0] == "0o700 0o600 0o600 0o600 0o600"


def _stored(store: Store, *ids: str, now: datetime = NOW) -> None:
    with store.transaction():
        store.upsert([parse_referral(referral(i)) for i in ids], deadline, now)


def test_silences_are_kept_replaced_and_lifted(state_location: Path | str) -> None:
    with Store(state_location) as store:
        _stored(store, "a", "b")
        until = NOW + timedelta(days=2)
        store.silence("a", NOW + timedelta(hours=1), NOW, reason="on it", by="ann")
        store.silence("a", until, NOW, reason="call on Monday", by="bob", through_deadline=True)
        lead = store.lead("a")
        assert lead is not None and lead.silenced_until == until
        assert lead.silence_reason == "call on Monday" and lead.silence_through_deadline
        assert store.unsilence("a") is True
        assert store.unsilence("a") is False
        lead = store.lead("a")
        assert lead is not None and lead.silenced_until is None


def test_resolving_a_lead_supersedes_its_held_reminders(state_location: Path | str) -> None:
    with Store(state_location) as store:
        _stored(store, "a", "b")
        with store.transaction():
            store.record(
                [Alert("a", TIER, "team", "new", 0), Alert("b", TIER, "team", "new", 0)], NOW
            )
            store.resolve("a", "accepted", NOW, raw=None)
        assert [row.lead_id for row in store.pending()] == ["b"]
        assert [lead.id for lead in store.leads()] == ["b"]
        resolved = store.lead("a")
        assert resolved is not None and resolved.resolution == "accepted"
        assert [lead.id for lead in store.leads(include_resolved=True)] == ["a", "b"]


def test_delivered_tiers_show_on_the_lead_and_end_its_candidacy(
    state_location: Path | str,
) -> None:
    points = [("team", "new", NOW + WINDOW, None)]
    with Store(state_location) as store:
        _stored(store, "a", "b")
        assert store.policy_candidates(points, NOW) == ["a", "b"]
        with store.transaction():
            store.record([Alert("a", TIER, "team", "new", 0)], NOW)
        (row,) = store.pending()
        store.delivered([row.id], NOW)
        lead = store.lead("a")
        assert lead is not None and lead.tiers_sent == ("new",)
        assert store.policy_candidates(points, NOW) == ["b"]
        assert [s.state for s in store.history(["a"])["a"]] == ["delivered"]
        assert store.backlog() == 0


def test_messages_about_no_lead_keep_their_text(state_location: Path | str) -> None:
    with Store(state_location) as store:
        first = store.enqueue_message("ops", "ops", "Polling fails", "5 in a row", NOW)
        second = store.enqueue_message("report", "managers", "Weekly", "3 open", NOW)
        assert second > first
        assert store.message_text(first) == ("Polling fails", "5 in a row")
        assert [(r.kind, r.channel) for r in store.pending()] == [
            ("ops", "ops"),
            ("report", "managers"),
        ]
        assert [r.id for r in store.pending(kinds=["report"])] == [second]
        assert store.backlog() == 2


def test_polls_and_metadata(state_location: Path | str) -> None:
    with Store(state_location) as store:
        assert store.last_success() is None and store.last_poll() is None
        store.record_poll(PollRecord(NOW, NOW + timedelta(seconds=3), ok=True, fetched=4))
        for minutes in (15, 30):
            at = NOW + timedelta(minutes=minutes)
            store.record_poll(PollRecord(at, at, ok=False, error="HTTP 503", needs_login=True))
        assert store.last_success() == NOW + timedelta(seconds=3)
        assert store.failures_in_a_row() == 2
        last = store.last_poll()
        assert last is not None and last.error == "HTTP 503" and last.needs_login
        assert store.get_meta("k") is None
        store.set_meta("k", "100%")  # a percent sign is data, not a placeholder
        store.set_meta("k", "v2")
        assert store.get_meta("k") == "v2"
        store.set_meta("k", None)
        assert store.get_meta("k") is None


def test_lookups_by_id_prefix_and_summaries(state_location: Path | str) -> None:
    with Store(state_location) as store:
        _stored(store, "abc-1", "abc-2", "abd-3")
        assert store.ids_starting("abc") == ["abc-1", "abc-2"]
        assert store.ids_starting("ABC") == []
        assert store.known("abd-3") and not store.known("zzz")
        count, soonest = store.watched_summary()
        assert count == 3 and soonest == NOW - timedelta(days=1) + WINDOW
        outlines = store.lead_outlines(["abc-1", "abd-3", "zzz"])
        assert outlines.deadlines == {"abc-1": NOW - timedelta(days=1) + WINDOW} | {
            "abd-3": outlines.deadlines["abd-3"]
        }
        assert outlines.leads == {}  # none of them is claimed
        digests = dict(store.digests())
        assert sorted(digests) == ["abc-1", "abc-2", "abd-3"]
        stored = store.lead("abc-1")
        assert stored is not None and digests["abc-1"] == record_digest(stored.referral.raw)
        assert [lead.id for lead in store.leads(ids=["abd-3", "abc-1"])] == ["abc-1", "abd-3"]


def test_expired_and_pruned_leads(state_location: Path | str) -> None:
    with Store(state_location) as store:
        _stored(store, "old", "new")
        with store.transaction():
            store.record([Alert("old", TIER, "team", "new", 0)], NOW)
        later = NOW + WINDOW
        with store.transaction():
            store.mark_expired(later)
            store.resolve("old", "expired", later)
        assert store.pending() == []  # the held reminder is moot
        assert store.prune(later + timedelta(days=1), timedelta(days=90)) == 0
        assert store.prune(later + timedelta(days=91), timedelta(days=90)) == 1
        assert [lead.id for lead in store.leads(include_resolved=True)] == ["new"]
        assert store.history() == {}


def test_a_claimed_row_waits_for_its_lease_before_another_process_takes_it(
    state_location: Path | str,
) -> None:
    with Store(state_location) as mine, Store(state_location) as theirs:
        theirs.dialect.owner = "another replica"
        _stored(mine, "a")
        with mine.transaction():
            mine.record([Alert("a", TIER, "team", "new", 0)], NOW)
        row = mine.pending()[0].id
        lease = timedelta(seconds=30)
        assert mine.claim([row], NOW, lease)
        assert mine.claim([row], NOW + timedelta(seconds=1), lease)  # its own: again
        assert not theirs.claim([row], NOW + timedelta(seconds=29), lease)
        assert not theirs.claim([row, row], NOW + timedelta(seconds=29), lease)
        # the owner died mid-send: after the lease the other one takes the row over
        assert not theirs.claim([row], NOW + timedelta(seconds=31), lease)  # renewed at 1s
        assert theirs.claim([row], NOW + timedelta(seconds=32), lease)
        assert not mine.claim([row], NOW + timedelta(seconds=33), lease)
        theirs.delivered([row], NOW + timedelta(seconds=34))
        assert not theirs.claim([row], NOW + timedelta(seconds=35), lease)  # sent: nobody's
        assert mine.pending() == []


def test_a_failed_attempt_frees_the_claim_for_the_next_try(state_location: Path | str) -> None:
    with Store(state_location) as mine, Store(state_location) as theirs:
        theirs.dialect.owner = "another replica"
        first = mine.enqueue_message("ops", "ops", "t", "b", NOW)
        assert mine.claim([first], NOW)
        mine.failed([first], "HTTP 502", NOW, timedelta(days=1))
        assert theirs.claim([first], NOW + timedelta(seconds=1))


def test_a_writer_waiting_for_another_gives_up_as_busy(state_location: Path | str) -> None:
    with Store(state_location) as holder, Store(state_location) as waiter:
        if isinstance(state_location, Path):
            waiter.db.execute("PRAGMA busy_timeout = 250")
        else:
            waiter.dialect.write_wait = "250ms"  # type: ignore[union-attr]
        with holder.transaction():
            holder.set_meta("k", "held")
            with pytest.raises(StateError, match="busy"), waiter.transaction():
                waiter.set_meta("k", "waited")
        assert holder.get_meta("k") == "held"


def test_a_page_is_stored_at_once_and_a_record_the_state_cannot_hold_alone_is_refused(
    state_location: Path | str,
) -> None:
    """(On PostgreSQL a page goes in by COPY; a text it cannot take must not end the poll.)"""
    page = [parse_referral(referral(f"page-{n}")) for n in range(5)]
    odd = parse_referral(referral("odd-one"), raw='{"id": "odd-one", "note": "\ud800"}')
    refused: list[str] = []
    with Store(state_location) as store:
        with store.transaction():
            new = store.upsert_each(
                [*page[:2], odd, *page[2:]],
                deadline,
                NOW,
                rejected=lambda r, _: refused.append(r.id),
            )
        assert new == [True, True, False, True, True, True]
        assert refused == ["odd-one"]
        with store.transaction():  # the same page again: nothing new
            assert store.upsert_each(page, deadline, NOW + timedelta(hours=1)) == [False] * 5
        assert {lead.id for lead in store.leads()} >= {ref.id for ref in page}
