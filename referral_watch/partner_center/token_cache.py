"""The MSAL token cache file: one JSON file shared safely by `login` and the daemon.

It holds a refresh token, so it is written atomically with mode 0600 under a file lock, and
its content never reaches a log or an exception message. Two processes writing at once merge
entry by entry instead of undoing each other's writes.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from filelock import FileLock
from filelock import Timeout as LockTimeout

from referral_watch.errors import AuthError

log = structlog.get_logger(__name__)

LOGIN_HINT = "run `referral-watch login` (see README, Sign in)"
LOCK_TIMEOUT = 30  # seconds to wait for another process writing the token cache


def check_cache_permissions(path: Path) -> str | None:
    """A warning when users other than the owner can read or write the token cache."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # not there yet: it is created 0600
    if mode & 0o077:
        return (
            f"the token cache {path} is accessible to other users (mode "
            f"{stat.S_IMODE(mode):04o}) and holds a refresh token: run chmod 600 {path}"
        )
    return None


class CacheFile:
    """MSAL's SerializableTokenCache persisted to one JSON file, safely shared by processes.

    ``load_into`` remembers what was read (the base). ``save`` re-reads the file under the
    lock and merges per entry: what this process changed since the base wins, everything
    else is taken from the file, so a `login` and the daemon never undo each other's writes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT, mode=0o600)
        self._base: dict[str, Any] = {}

    def load_into(self, cache: Any, *, tolerate_corrupt: bool = False) -> None:
        state = self._read(tolerate_corrupt=tolerate_corrupt)
        cache.deserialize(json.dumps(state))
        self._base = state

    def is_damaged(self) -> bool:
        text = self._read_text()
        return text is not None and _parse_state(text) is None

    def clear(self) -> None:
        """Replace the file with an empty cache (used when it is damaged)."""
        self._base = self._replace(lambda _theirs: {})

    def save(self, cache: Any) -> bool:
        """Write the cache if MSAL changed it; True when written."""
        if not cache.has_state_changed:
            return False
        base, ours = self._base, json.loads(cache.serialize())
        merged = self._replace(lambda theirs: _merge(base, ours, theirs))
        cache.deserialize(json.dumps(merged))
        self._base = merged
        return True

    def _replace(self, new_state: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Under the lock: re-read the file, compute the new state from it, write it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                state = new_state(self._read(tolerate_corrupt=True))
                _write_private(self.path, json.dumps(state, indent=1))
        except LockTimeout:
            raise AuthError(
                f"the token cache {self.path} stayed locked for {LOCK_TIMEOUT}s by another "
                "referral-watch process: try again"
            ) from None
        except OSError as exc:
            raise AuthError(
                f"cannot write the token cache {self.path}: {exc.strerror or exc} "
                "(run referral-watch as the user the service runs as)"
            ) from None
        return state

    def _read_text(self) -> str | None:
        try:
            # Undecodable bytes become U+FFFD, which then fails as JSON: "damaged".
            return self.path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuthError(
                f"cannot read the token cache {self.path}: {exc.strerror or exc} "
                "(run referral-watch as the user the service runs as)"
            ) from None

    def _read(self, *, tolerate_corrupt: bool) -> dict[str, Any]:
        text = self._read_text()
        state = {} if text is None else _parse_state(text)
        if state is not None:
            return state
        if tolerate_corrupt:
            log.warning("auth.cache_unreadable", path=str(self.path))
            return {}
        raise AuthError(
            f"the token cache {self.path} is damaged (not MSAL's JSON): {LOGIN_HINT}",
            needs_login=True,
        )


def _parse_state(text: str) -> dict[str, Any] | None:
    """The cache's JSON object, or None when the text is not one."""
    try:
        state = json.loads(text) if text.strip() else {}
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


_MISSING: Any = object()


def _merge(base: dict[str, Any], ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Three-way merge of MSAL cache states, entry by entry (sections hold key -> entry)."""
    merged: dict[str, Any] = {}
    for section in base.keys() | ours.keys() | theirs.keys():
        b, o, t = base.get(section, {}), ours.get(section, {}), theirs.get(section, {})
        if not all(isinstance(part, dict) for part in (b, o, t)):
            merged[section] = o if section in ours else t
            continue
        entries = {}
        for key in b.keys() | o.keys() | t.keys():
            mine = o.get(key, _MISSING)
            value = t.get(key, _MISSING) if mine == b.get(key, _MISSING) else mine
            if value is not _MISSING:
                entries[key] = value
        merged[section] = entries
    return merged


def _write_private(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``, readable by its owner only."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def cached_account(path: Path) -> tuple[str, str] | None:
    """(username, name) of the account `referral-watch login` signed in, read from the cache
    file alone (offline); None when nobody is signed in there."""
    import msal

    cache_file = CacheFile(path)
    if not cache_file.path.exists() or cache_file.is_damaged():
        return None
    cache = msal.SerializableTokenCache()
    cache_file.load_into(cache, tolerate_corrupt=True)
    kinds = msal.TokenCache.CredentialType
    accounts = list(cache.search(kinds.ACCOUNT))
    if not accounts:
        return None
    home = accounts[0].get("home_account_id")
    name = ""
    for entry in cache.search(kinds.ID_TOKEN, query={"home_account_id": home}):
        name = str(_jwt_claims(str(entry.get("secret") or "")).get("name") or "")
        break
    return str(accounts[0].get("username") or ""), name


def _jwt_claims(token: str) -> dict[str, Any]:
    """The (unverified) claims of an ID token from our own cache: only to show a name."""
    import base64

    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
