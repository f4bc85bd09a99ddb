"""A state folder that cannot be created is one clear line naming the path and the fix (exit
1), never a traceback; `check-config` warns about it beforehand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from referral_watch.cli import main

from conftest import TOKEN_ENV, Outcome, World


def config_with_state(world: World, state: Path, where: Path) -> Path:
    """The world's config, with state.path moved to ``state``, written to ``where``."""
    world.write_config()
    where.write_text(world.config_path.read_text().replace(str(world.state_path), str(state)))
    return where


def cli(world: World, config: Path, *args: str) -> Outcome:
    world.capsys.readouterr()
    try:
        main(["--config", str(config), "--log-format", "json", *args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = world.capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


@pytest.mark.parametrize("depth", ["parent", "grandparent"])
def test_a_file_where_the_state_folder_should_be(world: World, depth: str) -> None:
    """FileExistsError / NotADirectoryError from mkdir: the path and the fix, exit 1."""
    in_the_way = world.tmp / "in-the-way"
    in_the_way.write_text("not a folder")
    state = in_the_way / "state.db" if depth == "parent" else in_the_way / "sub" / "state.db"
    config = config_with_state(world, state, world.tmp / "custom.toml")

    outcome = cli(world, config, "run", "--once")
    assert outcome.code == 1
    [line] = outcome.err.strip().splitlines()
    assert line.startswith(f"error: cannot create the state folder {state.parent}: ")
    assert f"{in_the_way} is a file, not a folder: set state.path" in line

    checked = cli(world, config, "check-config")
    assert checked.code == 0  # the file itself is valid ...
    assert f"warning: state.path: cannot create the state folder {state.parent}" in checked.err


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned folder others may read but not write (tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="rw-state-folder-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def as_nobody(*command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_a_state_folder_this_user_may_not_create(world: World, shared_dir: Path) -> None:
    """The README's default /var/lib/referral-watch as a non-root user: PermissionError from the
    lock's mkdir. Tests run as root, who may write anywhere, so the CLI runs as `nobody`."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to run the CLI as another user")
    env = {"PATH": os.environ["PATH"], TOKEN_ENV: "sandbox-token", "HOME": str(shared_dir)}
    probe = as_nobody(sys.executable, "-c", "import referral_watch", env=env)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this checkout's Python: {probe.stderr.strip()}")
    state = shared_dir / "var" / "lib" / "referral-watch" / "state.db"
    config = config_with_state(world, state, shared_dir / "referral-watch.toml")
    config.chmod(0o644)

    command = (sys.executable, "-m", "referral_watch", "--config", str(config))
    ran = as_nobody(*command, "run", "--once", env=env)
    assert ran.returncode == 1, ran.stderr
    [line] = ran.stderr.strip().splitlines()
    assert line == (
        f"error: cannot create the state folder {state.parent}: permission denied: create it "
        f"for the user referral-watch runs as (sudo install -d -o $USER {state.parent}), or set "
        "state.path to a folder this user can write"
    )
    assert not (shared_dir / "var").exists()

    checked = as_nobody(*command, "check-config", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "valid" in checked.stdout
    assert f"warning: state.path: cannot create the state folder {state.parent}" in checked.stderr
    # as root (who may create it) the same config draws no warning
    assert "warning" not in cli(world, config, "check-config").err
