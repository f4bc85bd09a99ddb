"""`referral-watch sandbox`: the fake Partner Center for trying a config by hand."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import World


def test_the_sandbox_command_serves_leads_a_config_can_poll(world: World, tmp_path: Path) -> None:
    """Its default 25 leads: the count it prints is what a poll gets, their short ids differ,
    and the first poll already shows every tier (one lead expiring within the hour)."""
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "referral_watch", "sandbox", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sandbox.stdout is not None
        first = sandbox.stdout.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+/v1\.0) with 25 waiting referrals", first)
        assert found, first
        assert "and 3 it skips (outgoing or already answered)" in first
        base_url = found.group(1)
        assert "Its bearer token is sandbox-token" in sandbox.stdout.readline()
        told = "".join(iter(sandbox.stdout.readline, "Ctrl-C stops it.\n"))

        # a config tried by hand against it, as the README describes
        config = tmp_path / "try.toml"
        world.write_config()
        config.write_text(
            world.config_path.read_text()
            .replace(world.sandbox.base_url, base_url)
            .replace('token_env = "RW_TEST_TOKEN"', 'token_env = "PARTNER_CENTER_TOKEN"')
        )

        def tried(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "referral_watch", "--config", str(config), *args],
                env={**os.environ, "PARTNER_CENTER_TOKEN": "sandbox-token"},
                capture_output=True,
                text=True,
                timeout=60,
            )

        once = tried("run", "--once")
        assert once.returncode == 0, once.stderr
        assert once.stdout.startswith("Polled 25 leads (25 new")
        leads = json.loads(tried("status", "--json").stdout)
        assert len({lead["id"][:8] for lead in leads}) == 25
        assert {tier for lead in leads for tier in lead["tiers_sent"]} == {
            "new",
            "reminder",
            "urgent",
            "final",
        }
        assert 0 < min(lead["remaining_seconds"] for lead in leads) < 3600

        sandbox.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = sandbox.communicate(timeout=30)
    finally:
        if sandbox.poll() is None:
            sandbox.kill()
            sandbox.communicate()
    assert sandbox.returncode == 0, err
    assert "Sandbox stopped." in out
    assert "Traceback" not in err
    # its signed webhook events: the trust file to point trust_roots at holds only roots (the
    # issuing CA comes from the AIA URL on the issuer host it names)
    trust = re.search(r'trust_roots = "([^"]+)"', told)
    assert trust, told
    assert Path(trust.group(1)).read_bytes().count(b"BEGIN CERTIFICATE") == 2
    assert re.search(r'issuer_hosts = \["127\.0\.0\.1:\d+"\]', told), told


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


def test_the_sandbox_command_can_hold_another_integrations_registration(
    world: World, tmp_path: Path
) -> None:
    """`--held-by URL`: the company's one webhook registration starts out held by another
    integration, so `webhooks register` can be tried by hand (and refuses)."""
    held_by = "https://crm.fabrikam.example/partnercenter/events"
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "referral_watch", "sandbox", "--port", "0", "--held-by", held_by],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sandbox.stdout is not None
        lines = [sandbox.stdout.readline()]
        while lines[-1] and "Ctrl-C" not in lines[-1]:  # "" once it ended
            lines.append(sandbox.stdout.readline())
        found = re.search(
            r"registration API is (http://\S+) \(token (\S+)\), held by (\S+)\.", "".join(lines)
        )
        assert found, lines
        url, token, holder = found.groups()
        assert holder == held_by
        world.extra = f"""
[server]
listen = "127.0.0.1:9"
public_url = "https://leads.contoso.example"

[webhooks]
registration_url = "{url}"
registration_token_env = "RW_REGISTRATION_TOKEN"
"""
        os.environ["RW_REGISTRATION_TOKEN"] = token
        try:
            refused = world.cli("webhooks", "register")
        finally:
            del os.environ["RW_REGISTRATION_TOKEN"]
        assert refused.code == 1
        assert held_by in refused.err
        assert "invoice-ready" in refused.err
        sandbox.send_signal(signal.SIGINT)
        sandbox.communicate(timeout=30)
    finally:
        if sandbox.poll() is None:
            sandbox.kill()
            sandbox.communicate()
