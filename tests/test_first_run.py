"""The README's "Install and first run" steps, run as written on a fresh copy of the project.

Only paths are substituted (the venv goes to tmp_path instead of /opt). pip works offline: the
dependencies are this test environment's own (PYTHONPATH), so only referral-watch itself is
built and installed, from the copy, exactly as the README's `pip install .` does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECRETS = ("TEAMS_WORKFLOW_URL", "SMTP_USER", "SMTP_PASS", "SLACK_TOKEN")


def first_run_steps() -> list[str]:
    """The README's first-run command lines, up to and including `check-config`."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Install and first run", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the section has no ```sh block"
    steps = []
    for line in block.group(1).splitlines():
        steps.append(line)
        if line.startswith("referral-watch check-config"):
            return steps
    raise AssertionError("the first-run steps never run check-config")


def fresh_copy(target: Path) -> Path:
    """What a newcomer has after cloning: the sources, the README and the example config."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, target / name)
    shutil.copytree(ROOT / "referral_watch", target / "referral_watch", ignore=ignore)
    (target / "config").mkdir()
    for name in ("referral-watch.example.toml", ".env.example"):
        shutil.copy(ROOT / "config" / name, target / "config" / name)
    shutil.copytree(ROOT / "requirements", target / "requirements")
    return target


def shell_env(home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("REFERRAL_WATCH_", "PIP_", "VIRTUAL_ENV")) and key not in SECRETS
    }
    env.update(
        HOME=str(home),
        # `python3` is this test's interpreter; pip installs no dependency from an index.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=sysconfig.get_paths()["purelib"],
        PIP_NO_INDEX="1",
        PIP_NO_DEPS="1",
        PIP_NO_BUILD_ISOLATION="0",  # sic: pip reads this one as "build isolation: no"
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_QUIET="1",
    )
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_readme_first_run_steps_end_in_a_valid_config(tmp_path: Path) -> None:
    steps = first_run_steps()
    assert any(".env" in step for step in steps), "the steps never set up the secrets"
    repo = fresh_copy(tmp_path / "referral-watch")
    venv = tmp_path / "opt-referral-watch"
    script = "\n".join(
        ["set -e", *(step.replace("/opt/referral-watch", str(venv)) for step in steps)]
    )
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=repo,
        env=shell_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "referral-watch.toml: valid" in done.stdout
    assert (venv / "bin" / "referral-watch").exists()

    # without the .env, the same config is missing its secrets: the file really is read
    (repo / "config" / ".env").unlink()
    again = subprocess.run(
        [
            str(venv / "bin" / "referral-watch"),
            "--config",
            "config/referral-watch.toml",
            "check-config",
        ],
        cwd=repo,
        env=shell_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 2
    assert "TEAMS_WORKFLOW_URL is not set" in again.stderr
