"""The state file: schema, migrations, transactions, the instance lock."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from referral_watch.errors import LockedError, StateError
from referral_watch.model import TIER, Alert, AuditEntry, parse_referral
from referral_watch.store import SCHEMA_VERSION, InstanceLock, Store

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


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(StateError, match="newer referral-watch"):
        Store(path)
    assert path.read_bytes() == before


def test_corrupt_file_gets_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    before = path.read_bytes()
    with pytest.raises(StateError, match="corrupt"):
        Store(path)
    assert path.read_bytes() == before


def test_missing_file_for_a_reader_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="run --once"):
        Store(tmp_path / "none.db", create=False)


def test_a_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        with pytest.raises(RuntimeError), store.transaction():
            store.upsert([parse_referral(referral("a"))], deadline, NOW)
            raise RuntimeError("the poll failed on page 2")
        assert store.leads() == []


def test_upsert_counts_new_leads_once_and_keeps_first_seen(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
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


def test_more_severe_tier_supersedes_a_held_one(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        with store.transaction():
            store.upsert([parse_referral(referral("a"))], deadline, NOW)
            store.record([Alert("a", TIER, "team", "reminder", 1)], NOW)
        with store.transaction():
            store.record([Alert("a", TIER, "team", "urgent", 2)], NOW + timedelta(hours=1))
        pending = store.pending()
        assert [(row.tier, row.channel) for row in pending] == [("urgent", "team")]
        states = {s.tier: s.state for s in store.history()["a"]}
        assert states == {"reminder": "superseded", "urgent": "pending"}


def test_failed_rows_are_dropped_after_the_give_up_time(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
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
        "from referral_watch.store import InstanceLock\n"
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


def test_a_file_from_before_the_quarantine_gains_it_and_keeps_its_leads(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store, store.transaction():
        store.upsert([parse_referral(referral("old-lead"))], deadline, NOW)
    db = sqlite3.connect(path)
    db.execute("DROP TABLE quarantine")
    db.execute("DROP TABLE audit")
    db.execute("PRAGMA user_version = 2")  # webhook events, no quarantine yet
    db.commit()
    db.close()
    with Store(path) as store:
        assert [lead.id for lead in store.leads()] == ["old-lead"]
        assert store.quarantine("bad-1", "parse", "no createdDateTime", NOW, lead_id="bad-1")
        version = store.db.execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION


def test_a_file_from_before_the_audit_gains_it_and_keeps_its_leads(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store, store.transaction():
        store.upsert([parse_referral(referral("old-lead"))], deadline, NOW)
    db = sqlite3.connect(path)
    db.execute("DROP TABLE audit")
    db.execute("PRAGMA user_version = 3")  # quarantine, no audit yet
    db.commit()
    db.close()
    with Store(path) as store:
        assert [lead.id for lead in store.leads()] == ["old-lead"]
        entry = AuditEntry(
            "old-lead", NOW, "ann@contoso.com", "Ann", "console", "accept", "accepted"
        )
        store.record_answer(entry)
        assert store.audit("old-lead") == [entry]
        assert store.lead("old-lead").answered == entry  # type: ignore[union-attr]
        assert store.lead("old-lead").resolution == "accepted"  # type: ignore[union-attr]
        assert store.leads() == []  # resolved at once: no longer watched
        version = store.db.execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION == 4


def test_a_quarantined_record_is_new_once_and_released_when_it_goes_through(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "state.db") as store:
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
        "from referral_watch.store import InstanceLock, Store\n"
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
