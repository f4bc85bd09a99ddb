"""The daemon's web server: /healthz and /metrics through the ASGI app, the port-in-use
message, and a flood of idle connections that must not starve the daemon (issue 20 item 8)."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from referral_watch.config.loader import load_config
from referral_watch.daemon import Daemon
from referral_watch.web.app import build_app

from conftest import LOCAL, World, free_port, wait_until


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def in_process(world: World) -> tuple[Daemon, TestClient]:
    daemon = Daemon(load_config(world.write_config()))
    return daemon, TestClient(build_app(daemon), base_url=LOCAL)


def test_healthz_is_503_until_a_poll_succeeds_then_200_with_the_same_json(world: World) -> None:
    daemon, client = in_process(world)
    stale = client.get("/healthz")
    assert stale.status_code == 503
    assert stale.json() == {
        "status": "stale",
        "role": "active",
        "reason": "last successful poll never",
        "last_success": None,
        "deliveries_stuck_since": None,
        "interval_seconds": 900,
    }
    daemon.last_success = datetime.now(UTC) - timedelta(minutes=1)
    fresh = client.get("/healthz")
    assert fresh.status_code == 200
    assert fresh.json()["status"] == "ok"
    assert fresh.json()["last_success"] == daemon.last_success.isoformat()
    daemon.stuck_since = datetime.now(UTC) - timedelta(minutes=31)  # 2 x 15m: stuck
    stuck = client.get("/healthz")
    assert stuck.status_code == 503
    assert stuck.json()["status"] == "stuck"
    assert stuck.json()["reason"].startswith("deliveries stuck since")


def test_metrics_are_served_by_prometheus_client(world: World) -> None:
    daemon, client = in_process(world)
    daemon.metrics.polls.labels("ok").inc()
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'referral_watch_polls_total{result="ok"} 1.0' in response.text


@pytest.mark.parametrize(
    "path", ["/nothing-here", "/healthz/../../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/%2e%2e/"]
)
def test_unknown_paths_and_traversal_attempts_are_404(world: World, path: str) -> None:
    _, client = in_process(world)
    response = client.get(path)
    assert response.status_code == 404
    assert "root:" not in response.text


def test_livez_means_the_process_is_stuck_not_that_it_cannot_poll(world: World) -> None:
    """The Kubernetes liveness probe: a restart cannot renew an expired sign-in or bring
    Partner Center back, so /livez stays 200 while /healthz is 503 for those; it is 503 only
    when the work in flight has stopped moving (the systemd watchdog's rule)."""
    daemon, client = in_process(world)
    daemon.last_success = datetime.now(UTC) - timedelta(hours=5)  # polls failing for hours
    assert client.get("/healthz").status_code == 503
    alive = client.get("/livez")
    assert (alive.status_code, alive.json()) == (200, {"status": "alive"})
    daemon.progress.stuck_after = 0.3
    with daemon.progress.working():  # a cycle that no longer moves
        wait_until(lambda: daemon.progress.stuck_for() is not None, what="a stuck cycle")
        stuck = client.get("/livez")
        assert stuck.status_code == 503
        assert stuck.json()["status"] == "stuck"
        assert stuck.json()["limit_seconds"] == 0
    assert client.get("/livez").status_code == 200  # the work ended: alive again


def test_every_response_carries_the_security_headers(world: World) -> None:
    _, client = in_process(world)
    for path in ("/healthz", "/livez", "/metrics", "/nothing-here"):
        headers = client.get(path).headers
        assert "default-src 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"


def test_other_parts_add_routes_that_win_and_get_the_headers(world: World) -> None:
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    daemon = Daemon(load_config(world.write_config()))
    hook = Route("/webhooks/x", lambda _: PlainTextResponse("hooked"), methods=["POST"])
    gated = TestClient(build_app(daemon, routes=[hook]), base_url=LOCAL)
    assert gated.post("/webhooks/x").status_code == 404  # no [console]: people's pages are off
    client = TestClient(
        build_app(daemon, routes=[hook], open_paths=["/webhooks/x"]), base_url=LOCAL
    )
    response = client.post("/webhooks/x")
    assert response.text == "hooked"
    assert response.headers["x-content-type-options"] == "nosniff"


def daemon_process(world: World, *, max_files: int | None = None) -> subprocess.Popen[str]:
    world.write_config()

    def limit_files() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    return subprocess.Popen(
        [sys.executable, "-m", "referral_watch", "--config", str(world.config_path), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
        preexec_fn=limit_files,
    )


def test_a_port_in_use_is_one_clear_line_naming_the_address(world: World) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        world.extra = f'[server]\nlisten = "{address}"\n'
        process = daemon_process(world)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert f"cannot listen on {address} ([server] listen)" in err
    assert "another process uses that port" in err
    assert "Traceback" not in err


def _raise_own_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"this test needs {wanted} open files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.slow
def test_a_thousand_idle_connections_do_not_starve_the_daemon(world: World) -> None:
    """More idle sockets than the daemon may open files: /healthz answers and cycles run."""
    flood = 1100
    _raise_own_file_limit(flood + 200)
    port = free_port()
    world.extra = (
        f'[schedule]\ninterval = "1s"\njitter = "0s"\n[server]\nlisten = "127.0.0.1:{port}"\n'
    )
    world.add_lead(age=timedelta(hours=1), customer="Before Flood")
    process = daemon_process(world, max_files=1024)
    idle: list[socket.socket] = []
    try:
        world.team.wait_for(1, timeout=30)
        for _ in range(flood):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        status, body = get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert status == 200, body
        assert json.loads(body)["status"] == "ok"
        world.add_lead(age=timedelta(hours=1), customer="During Flood")
        world.team.wait_for(2, timeout=30)
        assert "During Flood" in world.team.bodies[1]["title"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        for sock in idle:
            sock.close()
        if process.poll() is None:
            process.kill()
        _, err = process.communicate(timeout=10)
    assert "cannot open state file" not in err


def _serving(world: World) -> Any:
    from referral_watch.web.server import WebServer

    daemon = Daemon(load_config(world.write_config()))
    assert daemon.config.server is not None
    server = WebServer(build_app(daemon), daemon.config.server)
    server.start()
    return server


def test_the_server_in_process_caps_connections_and_closes_silent_ones(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from referral_watch.web import server as web_server

    monkeypatch.setattr(web_server, "MAX_CONNECTIONS", 5)
    monkeypatch.setattr(web_server, "REQUEST_TIMEOUT", 0.5)
    port = free_port()
    world.extra = f'[server]\nlisten = "127.0.0.1:{port}"\n'
    served = _serving(world)
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        status, _ = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 503  # answered (no poll yet), despite 20 idle sockets
        wait_until(lambda: len(served.server.server_state.connections) <= 5, what="the cap to hold")
        # a socket that never sends a request is closed after REQUEST_TIMEOUT
        quiet = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert quiet.recv(1) == b""
        for sock in (*idle, quiet):
            sock.close()
    finally:
        served.stop()
    assert not served._thread.is_alive()
