"""The webhook row of `make bench`: event-to-delivered latency with 20,000 leads in state.

A sandbox with 20,000 leads; one `run --once` fills the state file (its digests are not
counted); then the daemon (`referral-watch run`, a subprocess, polling hourly) takes webhooks.
100 new leads are created in the sandbox one at a time; each one's latency runs from the
sandbox creating it (the signed event goes out at once) to its alert reaching the team channel:
the event's POST, verification, storing, the worker's batch (fetch by id, store, decide,
deliver) and Apprise's POST. `policy.digest_over` is raised for the daemon so the burst rule
never holds these events back: this measures the path, not the coalescing. CPU per event is
the daemon's CPU time (utime + stime, /proc) over the 100 events, divided by 100.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from receiver import Sink

from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.server import Sandbox

EVENTS = 100
P95_TARGET = 1.0  # seconds


@dataclass(frozen=True)
class WebhookFigures:
    leads: int
    events: int
    p50: float
    p95: float
    worst: float
    cpu_ms_per_event: float

    def row(self) -> str:
        return (
            f"| {self.leads:>6} | {self.events:>6} | {self.p50 * 1000:>8.0f} "
            f"| {self.p95 * 1000:>8.0f} | {self.worst * 1000:>8.0f} "
            f"| {self.cpu_ms_per_event:>13.1f} |"
        )

    @staticmethod
    def head() -> str:
        return (
            "| leads  | events | p50 ms   | p95 ms   | max ms   | cpu ms/event  |\n"
            "|--------|--------|----------|----------|----------|---------------|"
        )

    def verdict(self) -> tuple[bool, str]:
        return (
            self.p95 < P95_TARGET,
            f"webhook event-to-delivered p95 {self.p95 * 1000:.0f} ms < {P95_TARGET * 1000:.0f} "
            f"ms ({self.events} events, {self.leads:,} leads in state)",
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            sys.exit(f"webhook bench: timed out waiting for {what}")
        time.sleep(0.001)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def measure_webhooks(
    config_text: str, token_env: str, token: str, leads: list[dict]
) -> WebhookFigures:  # type: ignore[type-arg]
    """``config_text``: bench.py's CONFIG with {base_url}, {state}, {team}, {managers} open."""
    with (
        tempfile.TemporaryDirectory(prefix="rw-bench-hooks-") as tmp,
        Sandbox(leads, token=token) as api,
        Sink() as team,
        Sink() as managers,
    ):
        work = Path(tmp)
        side = api.webhooks
        (work / "tls.pem").write_bytes(side.tls_roots_pem)
        (work / "roots.pem").write_bytes(side.trust_roots_pem)
        port = _free_port()
        config = work / "referral-watch.toml"
        base = config_text.format(
            base_url=api.base_url,
            token_env=token_env,
            state=work / "state.db",
            team=team.url,
            managers=managers.url,
        )
        config.write_text(base)
        env = {**os.environ, token_env: token, "SSL_CERT_FILE": str(work / "tls.pem")}
        command = [sys.executable, "-m", "referral_watch", "--config", str(config)]
        subprocess.run([*command, "run", "--once"], env=env, check=True, capture_output=True)
        config.write_text(
            base.replace("[policy]\n", "[policy]\ndigest_over = 1000\n")
            + f"""
[schedule]
interval = "1h"
jitter = "0s"

[server]
listen = "127.0.0.1:{port}"

[webhooks]
certificate_hosts = ["{side.certificate_host}"]
issuer_hosts = ["{side.issuer_host}"]
trust_roots = "{work / "roots.pem"}"
"""
        )
        side.register(f"http://127.0.0.1:{port}/webhooks/partner-center")
        daemon = subprocess.Popen(
            [*command, "--log-format", "json", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(lambda: _healthy(port), 60, "the daemon's first poll")
            latencies, cpu = _events(api, team, daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    ordered = sorted(latencies)
    return WebhookFigures(
        leads=len(leads),
        events=len(ordered),
        p50=statistics.median(ordered),
        p95=ordered[int(len(ordered) * 0.95) - 1],
        worst=ordered[-1],
        cpu_ms_per_event=cpu / len(ordered) * 1000,
    )


def _events(api: Sandbox, team: Sink, pid: int) -> tuple[list[float], float]:
    now = datetime.now(UTC)
    # One event first, unmeasured: the certificate download and first imports happen once.
    warm = team.count()
    api.add(make_referral(customer="Warm-up", created=now - timedelta(minutes=1)))
    _wait(lambda: team.count() > warm, 30, "the warm-up alert")
    time.sleep(0.5)  # past the worker's batching window
    cpu_before = _cpu_seconds(pid)
    latencies = []
    for n in range(EVENTS):
        before = team.count()
        record = make_referral(customer=f"Webhook bench #{n}", created=now - timedelta(minutes=1))
        began = time.monotonic()
        api.add(record)
        _wait(lambda before=before: team.count() > before, 30, f"alert {n}")  # type: ignore[misc]
        latencies.append(time.monotonic() - began)
    return latencies, _cpu_seconds(pid) - cpu_before
