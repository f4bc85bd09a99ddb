"""The folder holding the state file, its lock and the token cache: made on first use, and
checked beforehand by `check-config`, each failure one line naming the path and the fix."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from referral_watch.errors import StateError


def make_state_folder(folder: Path, mode: int = 0o700) -> None:
    """Create ``folder`` (exactly ``mode``, whatever the umask) and its parents unless it
    exists; StateError naming the path and the fix when that cannot be done."""
    if folder.is_dir():
        return
    try:
        folder.mkdir(parents=True, mode=mode, exist_ok=True)
        folder.chmod(mode)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise StateError(_cannot_create(folder, exc)) from None


def state_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` could not be created or written by this user, without creating it;
    None when it is (or could be made) usable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        blocker = OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        return _cannot_create(folder, blocker)
    if not os.access(existing, os.W_OK | os.X_OK):
        denied = OSError(errno.EACCES, os.strerror(errno.EACCES), str(existing))
        if existing == folder:
            return (
                f"the state folder {folder} is not writable by this user: {_permission_fix(folder)}"
            )
        return _cannot_create(folder, denied)
    return None


def _cannot_create(folder: Path, exc: OSError) -> str:
    where = f"cannot create the state folder {folder}"
    if isinstance(exc, PermissionError) or exc.errno == errno.EACCES:
        return f"{where}: permission denied: {_permission_fix(folder)}"
    if isinstance(exc, FileExistsError | NotADirectoryError) or exc.errno in (
        errno.EEXIST,
        errno.ENOTDIR,
    ):
        blocker = _file_in_the_way(folder)
        return (
            f"{where}: {blocker} is a file, not a folder: set state.path to a file in a folder "
            f"(e.g. {blocker}.d/state.db), or move {blocker} away"
        )
    if exc.errno == errno.EROFS:
        return f"{where}: read-only file system: set state.path to a writable location"
    return f"{where}: {exc.strerror or exc}: set state.path to a folder this user can write"


def _permission_fix(folder: Path) -> str:
    return (
        f"create it for the user referral-watch runs as (sudo install -d -o $USER {folder}), "
        "or set state.path to a folder this user can write"
    )


def _file_in_the_way(folder: Path) -> Path:
    """The nearest existing ancestor (or ``folder`` itself) that is not a directory."""
    for candidate in (folder, *folder.parents):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return folder
