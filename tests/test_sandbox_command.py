"""`referral-watch sandbox`: the fake Partner Center for trying a config by hand."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import World


def test_the_sandbox_command_serves_leads_a_config_can_poll(world: World, tmp_path: Path) -> None:
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "referral_watch", "sandbox", "--port", "0", "--leads", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sandbox.stdout is not None
        first = sandbox.stdout.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+/v1\.0) with 3 waiting referrals", first)
        assert found, first
        base_url = found.group(1)
        assert "Its bearer token is sandbox-token" in sandbox.stdout.readline()

        # a config tried by hand against it, as the README describes
        config = tmp_path / "try.toml"
        world.write_config()
        config.write_text(
            world.config_path.read_text()
            .replace(world.sandbox.base_url, base_url)
            .replace('token_env = "RW_TEST_TOKEN"', 'token_env = "PARTNER_CENTER_TOKEN"')
        )
        tried = subprocess.run(
            [sys.executable, "-m", "referral_watch", "--config", str(config), "run", "--once"],
            env={**os.environ, "PARTNER_CENTER_TOKEN": "sandbox-token"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert tried.returncode == 0, tried.stderr
        assert tried.stdout.startswith("Polled 3 leads (3 new")

        sandbox.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = sandbox.communicate(timeout=30)
    finally:
        if sandbox.poll() is None:
            sandbox.kill()
            sandbox.communicate()
    assert sandbox.returncode == 0, err
    assert "Sandbox stopped." in out
    assert "Traceback" not in err


def test_the_sandbox_command_names_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "referral_watch", "sandbox", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use (try another --port)"
    ]
