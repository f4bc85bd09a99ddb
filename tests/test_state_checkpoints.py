"""SQLite's write-ahead log is copied into the state file by the state's own thread after each
commit (state.checkpoint), not inside the commit of the cycle that wrote it."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from pathlib import Path

from referral_watch.state.store import Store


def _rows_in_main_file(state: Path, copy: Path) -> int:
    """The rows the state file itself holds, without its log (as after losing the -wal file)."""
    shutil.copyfile(state, copy)
    db = sqlite3.connect(copy)
    try:
        return int(db.execute("SELECT count(*) FROM meta WHERE key LIKE 'probe.%'").fetchone()[0])
    except sqlite3.OperationalError:  # not even the schema yet
        return 0
    finally:
        db.close()


def test_commits_reach_the_state_file_while_the_state_stays_open(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    with Store(state) as store:
        for n in range(3):  # small transactions: SQLite alone would leave them in the log
            with store.transaction():
                store.set_meta(f"probe.{n}", "x" * 1000)
        deadline = time.monotonic() + 10
        while _rows_in_main_file(state, tmp_path / "copy.db") < 3:
            assert time.monotonic() < deadline, "the log was never checkpointed"
            time.sleep(0.05)
        assert any(t.name == "state-checkpoints" for t in threading.enumerate())
    assert not any(t.name == "state-checkpoints" for t in threading.enumerate())
    with Store(state) as again:  # and nothing was lost on closing
        assert again.get_meta("probe.2") == "x" * 1000
