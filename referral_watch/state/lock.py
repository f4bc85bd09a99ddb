"""The instance lock: a lock file beside a SQLite state file keeping a second process off it."""

from __future__ import annotations

from pathlib import Path

from referral_watch.errors import LockedError, StateError
from referral_watch.state.dialect import private_folder


class InstanceLock:
    """A lock file beside the state file keeping a second process off the same state."""

    def __init__(self, path: Path) -> None:
        import filelock

        self.path = path
        private_folder(path.parent)
        self._lock = filelock.FileLock(str(path), timeout=0, mode=0o600)
        self._timeout = filelock.Timeout

    def acquire(self) -> None:
        try:
            self._lock.acquire()
        except self._timeout:
            raise LockedError(
                f"another referral-watch process holds the state lock {self.path}: "
                "stop it first (only one instance may use a state file)"
            ) from None
        except OSError as exc:  # e.g. a read-only file system: the lock file cannot be made
            raise StateError(
                f"cannot create the state lock {self.path} ({exc.strerror or exc}): "
                "give the service user write access to the state folder"
            ) from None

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
