"""What every command shares: the context (the config, read once), the exit codes of the
contract (SPEC), and how a failure or a config's problems are printed."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

from referral_watch.config import Config
from referral_watch.config.loader import (
    environment,
    find_config_path,
    find_env_file,
    load_config,
)
from referral_watch.errors import ConfigError
from referral_watch.text import terminal

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3


class Context:
    def __init__(
        self, config_path: str | None, log_format: str, verbose: int, env_file: str | None = None
    ) -> None:
        self.config_path = config_path
        self.env_file = env_file
        self.log_format = log_format
        self.verbose = verbose
        self._config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            self._config = self.load()
        return self._config

    def load(self) -> Config:
        """Read the config file (and the env file) afresh: at start and at every reload."""
        path = find_config_path(self.config_path)
        return load_config(path, env=environment(find_env_file(self.env_file, path)))


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"error: {terminal(message)}", err=True)  # it may quote Partner Center text
    sys.exit(code)


def now_utc() -> datetime:
    return datetime.now(UTC)


def print_config_problems(exc: ConfigError) -> None:
    if exc.path is None and len(exc.problems) == 1:  # e.g. the file is missing
        click.echo(f"error: {exc.problems[0]}", err=True)
        return
    where = f" in {exc.path}" if exc.path else ""
    click.echo(f"error: the configuration{where} is not valid:", err=True)
    for problem in exc.problems:
        click.echo(f"  - {problem}", err=True)


def resolve_id(store: Any, given: str) -> str:
    """A full referral id, or a unique prefix of one (ids are long GUIDs)."""
    if store.known(given):
        return given
    matches: list[str] = store.ids_starting(given)
    if len(matches) == 1 and len(given) >= 4:
        return matches[0]
    if len(matches) > 1:
        fail(f"{given!r} matches {len(matches)} leads: give more of the id")
    fail(
        f"no lead with id {given!r} in the state file "
        "(`referral-watch status --all` shows every lead's id)"
    )
