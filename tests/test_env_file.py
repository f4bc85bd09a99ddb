"""Secrets from an environment file: --env-file, $REFERRAL_WATCH_ENV_FILE, or a .env beside
the config; the environment wins over the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import World

OPS = "json://127.0.0.1:9/from-file"


def with_ops_from_env(world: World) -> None:
    world.channels = {"ops": "${OPS_URL}"}
    world.extra = '[operations]\nnotify = ["ops"]\n'


def test_a_dot_env_beside_the_config_fills_references(world: World) -> None:
    with_ops_from_env(world)
    assert world.cli("check-config").code == 2  # nothing sets OPS_URL yet
    (world.tmp / ".env").write_text(f"# the ops channel\nOPS_URL={OPS}\n")
    checked = world.cli("check-config")
    assert checked.code == 0, checked.err
    assert "valid" in checked.out


def test_the_environment_wins_over_the_file(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    with_ops_from_env(world)
    (world.tmp / ".env").write_text("OPS_URL=not a url at all\n")
    monkeypatch.setenv("OPS_URL", OPS)
    assert world.cli("check-config").code == 0


def test_env_file_option_and_variable_name_another_file(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with_ops_from_env(world)
    secrets = tmp_path / "secrets" / "referral-watch.env"
    secrets.parent.mkdir()
    # dotenv syntax: quotes and `export` are understood, as python-dotenv reads them
    secrets.write_text(f'export OPS_URL="{OPS}"\n')
    assert world.cli("--env-file", str(secrets), "check-config").code == 0
    monkeypatch.setenv("REFERRAL_WATCH_ENV_FILE", str(secrets))
    assert world.cli("check-config").code == 0


def test_a_named_env_file_that_is_missing_is_a_clear_error(world: World, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.env"
    outcome = world.cli("--env-file", str(missing), "check-config")
    assert outcome.code == 2
    assert f"environment file {missing} does not exist" in outcome.err
    assert "Traceback" not in outcome.err
