"""Shared fixtures: a sandbox Partner Center, local receivers, a config file, and the CLI."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest
import structlog

from referral_watch import cli
from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.server import Sandbox

from policies import tiers

if TYPE_CHECKING:  # these import this module's helpers; the fixtures import them late
    from pgserver import PostgresServer
    from receivers import WebhookReceiver

TOKEN_ENV = "RW_TEST_TOKEN"


# --- the helpers every test uses (one copy each) ----------------------------------------------


# Where in-process tests reach the app (Starlette's TestClient): a Host the server goes by
# (its default "testserver" is refused with 421, as any name the server does not know).
LOCAL = "http://127.0.0.1:9464"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "") -> None:
    """Return as soon as `condition()` is true; fail after `timeout` seconds. Tests wait on
    what they expect, never for a fixed time: a loaded 2-core machine is slow, not broken."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


def faketime_env(start: datetime) -> dict[str, str] | None:
    """The environment that runs a subprocess under libfaketime (Debian's faketime), its
    clock starting at `start` and running on; monotonic time stays real. None without it."""
    libraries = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not libraries:
        return None
    return {
        "LD_PRELOAD": str(libraries[0]),
        "FAKETIME": "@" + start.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "TZ": "UTC",
    }


class NotifySocket:
    """A stand-in for systemd's NOTIFY_SOCKET: collects what the daemon reports (READY=1,
    WATCHDOG=1, STOPPING=1), each with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        # Read all the time, as systemd does: the socket queues only a few datagrams
        # (net.unix.max_dgram_qlen, often 10); on a full queue the daemon's notification times
        # out and is dropped (STOPPING=1 was, while a slow step of a test ran).
        self._reader = threading.Thread(target=self._read_all_the_time, daemon=True)
        self._reader.start()

    @property
    def seen(self) -> list[str]:
        self._drain()
        return [message for _, message in self.received]

    def count(self, message: str) -> int:
        return self.seen.count(message)

    def last(self, message: str) -> float | None:
        """The monotonic time `message` last arrived, or None."""
        self._drain()
        times = [at for at, seen in self.received if seen == message]
        return times[-1] if times else None

    def wait_for(self, message: str, timeout: float = 20) -> None:
        wait_until(lambda: message in self.seen, timeout, f"{message} (got {self.received})")

    def _read_all_the_time(self) -> None:
        while not self._closed.is_set():
            select.select([self.sock], [], [], 0.05)
            self._drain()

    def _drain(self) -> None:
        with self._lock:  # what was sent before a check is seen by that check
            while True:
                try:
                    data = self.sock.recv(4096)
                except BlockingIOError:
                    return
                self.received.extend((time.monotonic(), m) for m in data.decode().splitlines())

    def close(self) -> None:
        self._closed.set()
        self._reader.join()
        self.sock.close()


class DaemonProcess:
    """`referral-watch run` in a subprocess, its stdout and stderr read as they come, so a test
    can wait for a log event (`wait_for_log`) instead of sleeping."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self._out: list[str] = []
        self._err: list[str] = []
        assert self.process.stdout is not None and self.process.stderr is not None
        streams = ((self.process.stdout, self._out), (self.process.stderr, self._err))
        self._readers = [
            threading.Thread(target=_collect, args=(stream, lines), daemon=True)
            for stream, lines in streams
        ]
        for reader in self._readers:
            reader.start()

    # the Popen calls the tests use
    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.kill()

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout=timeout)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the exit; everything it wrote (stdout, stderr)."""
        self.process.wait(timeout=timeout)
        for reader, stream in zip(
            self._readers, (self.process.stdout, self.process.stderr), strict=True
        ):
            reader.join(timeout=5)
            if stream is not None and not reader.is_alive():  # closing under a read blocks
                stream.close()
        return "".join(self._out), "".join(self._err)

    # the log
    @property
    def log(self) -> str:
        """stderr so far (the JSON log)."""
        return "".join(list(self._err))

    def events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines whose event is `event`, so far."""
        found = []
        for line in list(self._err):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == event:
                found.append(entry)
        return found

    def wait_for_log(self, event: str, count: int = 1, timeout: float = 20) -> list[dict[str, Any]]:
        wait_until(
            lambda: len(self.events(event)) >= count or self.poll() is not None,
            timeout,
            f"{count} {event!r} log line(s)",
        )
        found = self.events(event)
        assert len(found) >= count, f"exit {self.poll()} before {event!r}:\n{self.log}"
        return found


DEMO_CONSOLE = [sys.executable, "-m", "referral_watch", "demo", "--fast", "--console", "--port"]


@dataclass
class DemoConsole:
    """`referral-watch demo --fast --console` as a subprocess, past the story: its console."""

    process: subprocess.Popen[str]
    url: str  # the console's base URL, without the trailing slash
    announced: str  # the line that says where the console is

    def stop(self) -> tuple[int, str]:
        """Ctrl-C (SIGINT): its exit status and everything it wrote to stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err


@contextmanager
def demo_console() -> Iterator[DemoConsole]:
    port = free_port()
    process = subprocess.Popen(
        [*DEMO_CONSOLE, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    demo = DemoConsole(process, f"http://127.0.0.1:{port}", "")
    try:
        assert process.stdout is not None
        demo.announced = next(x for x in process.stdout if x.startswith("The console: "))
        yield demo
    finally:
        demo.stop()


def _collect(stream: IO[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


TIERS = tiers(final_repeats=False)  # the end-to-end world's final tier is heard once


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
    partner_center: str = ""  # more [partner_center] keys
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
{self.partner_center}

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
    def daemon(self, *extra: str, env: dict[str, str] | None = None) -> Iterator[DaemonProcess]:
        """`referral-watch run` as a real subprocess; killed if the test leaves it running.
        `env` adds to (or, with "", removes from) the environment."""
        self.write_config()
        environment = {**os.environ, **(env or {})}
        process = DaemonProcess(
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
            {name: value for name, value in environment.items() if value != ""},
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
    from receivers import WebhookReceiver

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
    from pgserver import PostgresServer, find_bindir

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
