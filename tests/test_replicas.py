"""Replicas on one PostgreSQL state (SPEC 16), end to end: real daemons as subprocesses, the
sandbox as Partner Center, slow local receivers as the channels, and a real PostgreSQL server.

One replica is active, the other a standby; the active is killed (kill -9) in the middle of a
delivery burst at random points, or paused (SIGSTOP) and resumed. Every lead must get its tier
exactly once on every channel; only the message in flight at a kill may repeat.

RW_FAILOVER_KILLS sets how many kills the failover test makes (default 3 for `make test`;
the issue's 20 by hand: RW_FAILOVER_KILLS=20 pytest tests/test_replicas.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from referral_watch.state.replica import Leadership

from conftest import World, wait_until
from pgserver import PostgresServer, free_port
from receivers import WebhookReceiver

pytestmark = pytest.mark.slow

INTERVAL = 2  # seconds: schedule.interval of the replicas
TAKEOVER = INTERVAL + 10  # SPEC 16 / the issue: within one interval plus 10 seconds
KILLS = int(os.environ.get("RW_FAILOVER_KILLS", "3"))


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def health(self) -> dict[str, Any]:
        status, body = get(f"http://127.0.0.1:{self.port}/healthz")
        return {"http": status, **(json.loads(body) if status else {})}

    @property
    def role(self) -> str | None:
        return self.health().get("role")

    def metric(self, name: str) -> float | None:
        _, body = get(f"http://127.0.0.1:{self.port}/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None


@dataclass
class Cluster:
    world: World
    replicas: list[Replica] = field(default_factory=list)
    started: int = 0

    def start(self) -> Replica:
        replica = self.launch()
        wait_until(lambda: replica.role is not None, 30, f"replica {self.started} to answer")
        return replica

    def launch(self) -> Replica:
        """Start a replica without waiting for it to answer."""
        port = free_port()
        self.started += 1
        config = self.world.tmp / f"replica-{self.started}.toml"
        text = self.world.write_config().read_text()
        config.write_text(text + f'\n[server]\nlisten = "127.0.0.1:{port}"\n')
        log = self.world.tmp / f"replica-{self.started}.log"
        with log.open("wb") as out:
            command = [sys.executable, "-m", "referral_watch", "--config", str(config)]
            process = subprocess.Popen(
                [*command, "--log-format", "json", "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        replica = Replica(process, port, log)
        self.replicas.append(replica)
        return replica

    def active(self) -> Replica:
        found: list[Replica] = []

        def one_active() -> bool:
            found[:] = [r for r in self.replicas if r.role == "active"]
            return len(found) == 1

        wait_until(one_active, TAKEOVER, "exactly one active replica")
        return found[0]

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.process.poll() is None:
                replica.process.kill()
            replica.process.wait(timeout=10)


@pytest.fixture
def cluster(world: World, pg_url: str) -> Iterator[Cluster]:
    world.state_url = pg_url
    world.policy += "digest_over = 1000\n"  # one message per lead: a burst of deliveries
    world.extra = f'[schedule]\ninterval = "{INTERVAL}s"\njitter = "0s"\n'
    world.team.delay = world.managers.delay = 0.03
    group = Cluster(world)
    try:
        yield group
    finally:
        group.stop()


def add_leads(world: World, count: int, tag: str) -> list[str]:
    """New leads, half of them late enough (urgent) to go to the managers too."""
    ages = [timedelta(hours=1), timedelta(days=12, hours=1)]
    return [world.add_lead(age=ages[i % 2], customer=f"{tag} customer {i}") for i in range(count)]


def deliveries(world: World) -> Counter[tuple[str, str]]:
    """(channel, lead id) -> how many messages about that lead reached that channel."""
    counts: Counter[tuple[str, str]] = Counter()
    for channel, receiver in (("team", world.team), ("managers", world.managers)):
        for body in receiver.bodies:
            lead = next(part for part in str(body["message"]).split() if part.count("-") == 4)
            counts[(channel, lead.strip("`*_()[]<>"))] += 1
    return counts


def expected(leads: list[str]) -> set[tuple[str, str]]:
    due = {("team", lead) for lead in leads}
    return due | {("managers", lead) for i, lead in enumerate(leads) if i % 2}


@contextmanager
def paused(process: subprocess.Popen[bytes]) -> Iterator[None]:
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


def test_one_active_one_standby_on_one_database(cluster: Cluster) -> None:
    world = cluster.world
    first = cluster.start()
    assert cluster.active() is first
    second = cluster.start()
    assert second.health() == {
        "http": 200,
        "status": "ok",
        "role": "standby",
        "interval_seconds": INTERVAL,
    }
    assert first.metric("referral_watch_active") == 1.0
    assert second.metric("referral_watch_active") == 0.0
    leads = add_leads(world, 4, "Steady")
    wait_until(lambda: set(deliveries(world)) == expected(leads), 20, "the alerts")
    time.sleep(INTERVAL * 2)  # more cycles, on both replicas: nothing twice
    assert set(deliveries(world).values()) == {1}
    assert "replica.role" not in second.log.read_text()  # it never became active
    # status --check: the standby host is healthy; with the active one's polls stale and no
    # replica elsewhere, it would not be
    assert world.cli("status", "--check").code == 0


def test_four_replicas_started_at_once_on_an_empty_database_all_come_up(
    cluster: Cluster,
) -> None:
    """A first deploy of the HA overlay: every replica finds an empty database and creates the
    schema at the same moment. None may die of another's CREATE TABLE (issue 26)."""
    replicas = [cluster.launch() for _ in range(4)]

    def all_up() -> bool:
        for replica in replicas:
            assert replica.process.poll() is None, replica.log.read_text()[-1000:]
        return all(r.role is not None for r in replicas)

    wait_until(all_up, 40, "all four to answer")
    cluster.active()  # exactly one active
    assert sorted(r.role or "" for r in replicas) == ["active", "standby", "standby", "standby"]
    assert all("already exists" not in r.log.read_text() for r in replicas)


def test_status_check_counts_a_standby_as_healthy(world: World, pg_url: str) -> None:
    world.state_url = pg_url
    world.sandbox.token = "wrong"  # every poll fails: the last successful poll stays "never"
    assert world.cli("run", "--once").code == 1
    assert world.cli("status", "--check").code == 1
    elsewhere = Leadership(pg_url, "test")
    elsewhere.owner = "another-host:4242:abcdef01"  # the active replica, on another host
    assert elsewhere.check()
    try:
        check = world.cli("status", "--check")
        assert check.code == 0
        assert "standby" in check.out and "another-host" in check.out
    finally:
        elsewhere.stop()
    assert world.cli("status", "--check").code == 1


def test_kill_9_of_the_active_mid_burst_loses_and_repeats_nothing(cluster: Cluster) -> None:
    world = cluster.world
    chance = random.Random(os.environ.get("RW_FAILOVER_SEED", "18"))
    cluster.start()
    cluster.start()
    leads: list[str] = []
    takeovers: list[float] = []
    for kill in range(KILLS):
        active = cluster.active()
        before = len(world.team.requests) + len(world.managers.requests)
        leads += add_leads(world, 8, f"Burst {kill}")
        wait_until(
            lambda b=before: len(world.team.requests) + len(world.managers.requests) > b,
            TAKEOVER,
            "the burst to begin",
        )
        time.sleep(chance.uniform(0, 0.25))  # a random point in the burst
        active.process.kill()
        killed_at = time.monotonic()
        active.process.wait(timeout=10)
        cluster.replicas.remove(active)
        cluster.active()  # the standby takes over ...
        takeovers.append(time.monotonic() - killed_at)
        cluster.start()  # ... and a new standby joins, as Kubernetes would restart the pod
    want = expected(leads)
    wait_until(lambda: set(deliveries(world)) >= want, 60, "every lead's alerts")
    time.sleep(INTERVAL * 2)
    counts = deliveries(world)
    assert set(counts) == want  # nothing lost, nothing about other leads
    repeats = sum(n - 1 for n in counts.values())
    assert max(counts.values()) <= 2
    assert repeats <= 2 * KILLS  # at most the message in flight on each of the 2 channels
    assert max(takeovers) <= TAKEOVER, takeovers
    print(f"kills={KILLS} repeats={repeats} takeover_s={[round(t, 1) for t in takeovers]}")


def test_a_paused_active_is_replaced_and_sends_nothing_twice_when_it_wakes(
    cluster: Cluster,
) -> None:
    world = cluster.world
    first = cluster.start()
    assert cluster.active() is first
    second = cluster.start()
    leads = add_leads(world, 16, "Paused")
    wait_until(lambda: len(world.team.requests) >= 2, TAKEOVER, "the burst to begin")
    with paused(first.process):
        stopped_at = time.monotonic()
        wait_until(lambda: second.role == "active", TAKEOVER, "the standby to take over")
        took = time.monotonic() - stopped_at
    wait_until(lambda: first.role == "standby", TAKEOVER, "the woken replica to stand by")
    wait_until(lambda: set(deliveries(world)) >= expected(leads), 60, "every lead's alerts")
    time.sleep(INTERVAL * 2)
    counts = deliveries(world)
    assert set(counts) == expected(leads)
    assert set(counts.values()) == {1}, [k for k, n in counts.items() if n > 1]
    assert took <= TAKEOVER
    print(f"pause takeover_s={took:.1f}")


def test_a_lost_database_fails_cycles_and_ops_hear_it_directly(
    cluster: Cluster, postgres: PostgresServer, pg_url: str
) -> None:
    world = cluster.world
    with WebhookReceiver() as ops:
        world.channels = {"ops": ops.json_url}
        world.extra += '[operations]\nnotify = ["ops"]\nafter_failures = 2\nrepeat = "1h"\n'
        replica = cluster.start()
        assert cluster.active() is replica
        name = pg_url.rsplit("/", 1)[1]  # made by the fixture, not data
        postgres.sql(postgres.url(), f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        try:
            postgres.sql(
                postgres.url(),
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            ops.wait_for(1, timeout=TAKEOVER * 2)
            assert replica.health()["http"] == 503  # not active, cannot reach the database
        finally:
            postgres.sql(postgres.url(), f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        wait_until(lambda: replica.role == "active", TAKEOVER, "the replica to be active again")
        ops.wait_for(2, timeout=TAKEOVER * 2)
        lead = world.add_lead(age=timedelta(hours=1))
        wait_until(lambda: ("team", lead) in deliveries(world), TAKEOVER, "the next alert")
    assert "unreachable" in str(ops.bodies[0])
    assert "works again" in ops.bodies[1]["title"]
    assert len(ops.bodies) == 2
