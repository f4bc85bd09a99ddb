"""Shared fixtures: a sandbox Partner Center, local receivers, a config file, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from referral_watch import cli
from referral_watch.sandbox import Sandbox, make_referral

from pgserver import PostgresServer, find_bindir
from receivers import WebhookReceiver

TOKEN_ENV = "RW_TEST_TOKEN"

TIERS = """
[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]

[[policy.tiers]]
name = "reminder"
remaining = "7d"
notify = ["team"]

[[policy.tiers]]
name = "urgent"
remaining = "2d"
notify = ["team", "managers"]

[[policy.tiers]]
name = "final"
remaining = "12h"
notify = ["team", "managers"]
"""


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class World:
    """Everything an end-to-end test needs, on loopback, in tmp_path."""

    tmp: Path
    sandbox: Sandbox
    team: WebhookReceiver
    managers: WebhookReceiver
    capsys: pytest.CaptureFixture[str]
    extra: str = ""
    policy: str = 'on_expired = ["managers"]\non_resolved = ["team"]\n'
    tiers: str = TIERS
    channels: dict[str, str] = field(default_factory=dict)
    state: str = ""  # more [state] keys
    state_url: str | None = None  # PostgreSQL instead of the SQLite file
    auth: str = f'method = "env"\ntoken_env = "{TOKEN_ENV}"'

    @property
    def config_path(self) -> Path:
        return self.tmp / "referral-watch.toml"

    @property
    def state_path(self) -> Path:
        return self.tmp / "state" / "state.db"

    def _state_place(self) -> str:
        if self.state_url is not None:
            return f"url = {json.dumps(self.state_url)}"
        return f"path = {json.dumps(str(self.state_path))}"

    def write_config(self) -> Path:
        channels = {
            "team": self.team.json_url,
            "managers": self.managers.json_url,
            **self.channels,
        }
        channel_lines = "\n".join(
            f"{name} = {value if value.startswith('{') else json.dumps(value)}"
            for name, value in channels.items()
        )
        self.config_path.write_text(
            f"""
[partner_center]
base_url = "{self.sandbox.base_url}"
timeout = "5s"

[auth]
{self.auth}

[state]
{self._state_place()}
{self.state}

[policy]
{self.policy}
{self.tiers}

[channels]
{channel_lines}

{self.extra}
"""
        )
        return self.config_path

    def cli(self, *args: str) -> Outcome:
        """Run the CLI in-process, as a user would type it."""
        self.write_config()
        self.capsys.readouterr()
        try:
            cli.main(["--config", str(self.config_path), "--log-format", "json", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        else:  # pragma: no cover - main always exits
            code = 0
        captured = self.capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    @contextmanager
    def daemon(self, *extra: str) -> Iterator[subprocess.Popen[str]]:
        """`referral-watch run` as a real subprocess; killed if the test leaves it running."""
        self.write_config()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "referral_watch",
                "--config",
                str(self.config_path),
                "--log-format",
                "json",
                "run",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ},
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=10)

    def add_lead(self, *, age: timedelta, now: datetime | None = None, **fields: Any) -> str:
        created = (now or datetime.now(UTC)) - age
        record = make_referral(created=created, **fields)
        self.sandbox.add(record)
        return str(record["id"])


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Each test starts with structlog's defaults, whatever the previous test configured."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[World]:
    monkeypatch.setenv(TOKEN_ENV, "sandbox-token")
    with (
        Sandbox(token="sandbox-token") as sandbox,
        WebhookReceiver() as team,
        WebhookReceiver() as managers,
    ):
        yield World(tmp_path, sandbox, team, managers, capsys)


# --- PostgreSQL (state.url) -------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole run (skipped only where none is installed)."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh, empty database on the test server."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's state lives: each test using this runs on both backends."""
    if request.param == "sqlite":
        return tmp_path / "state.db"
    return str(request.getfixturevalue("pg_url"))
