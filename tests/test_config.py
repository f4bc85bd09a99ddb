"""The config loader: durations, interpolation, and every kind of problem reported with its key."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from referral_watch.config import format_duration, parse_duration
from referral_watch.config.loader import find_config_path, load_config, parse_config
from referral_watch.errors import ConfigError

MINIMAL = """
[auth]
method = "env"

[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]

[channels]
team = "json://127.0.0.1:9/hook"
"""


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=env or {})
    return caught.value.problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("2w", timedelta(weeks=2)),
        ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
        ("0s", timedelta(0)),
        (" 4h ", timedelta(hours=4)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "15", "m", "1.5h", "-1h", "1y", "1h 30m", "15 m", "1H"])
def test_bad_durations_are_explained(text: str) -> None:
    with pytest.raises(ValueError, match="units s m h d w"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**8))
def test_duration_round_trip(seconds: int) -> None:
    value = timedelta(seconds=seconds)
    assert parse_duration(format_duration(value)) == value


def test_minimal_config_gets_the_documented_defaults() -> None:
    config = parse_config(MINIMAL, env={})
    assert config.partner_center.base_url == "https://api.partner.microsoft.com/v1.0"
    assert config.partner_center.filter == "direction eq 'Incoming' and substatus eq 'Pending'"
    assert config.partner_center.page_size == 100
    assert config.schedule.interval == timedelta(minutes=15)
    assert config.policy.response_window == timedelta(days=14)
    assert config.policy.digest_over == 5
    assert config.operations.after_failures == 3
    assert config.channels["team"].url == "json://127.0.0.1:9/hook"
    assert config.cache_path.name == "msal-cache.json"
    assert config.server is None and config.heartbeat is None


def test_tiers_are_sorted_by_severity_whatever_the_file_order() -> None:
    text = MINIMAL.replace(
        "[channels]",
        """[[policy.tiers]]
name = "final"
remaining = "12h"
notify = "team"

[[policy.tiers]]
name = "reminder"
remaining = "7d"
notify = ["team"]

[channels]""",
    )
    config = parse_config(text, env={})
    assert [t.name for t in config.policy.tiers] == ["new", "reminder", "final"]
    assert config.policy.severity("final") == 2
    assert config.policy.tiers[2].notify == ["team"]  # a single name is taken as a list


def tiers_config(*tiers: str) -> str:
    """MINIMAL with the given [[policy.tiers]] tables instead of its own."""
    head = MINIMAL.split("[[policy.tiers]]")[0]
    return head + "".join(f"[[policy.tiers]]\n{t}\n" for t in tiers) + MINIMAL.split('["team"]')[1]


@pytest.mark.parametrize(
    ("tiers", "types"),
    [
        (['name = "only"\nremaining = "14d"\nnotify = ["team"]'], ["info"]),
        (
            [
                'name = "final"\nremaining = "12h"\nnotify = ["team"]',
                'name = "new"\nremaining = "14d"\nnotify = ["team"]',
            ],
            ["info", "failure"],
        ),
        (
            [
                'name = "new"\nremaining = "14d"\nnotify = ["team"]',
                'name = "reminder"\nremaining = "7d"\nnotify = ["team"]',
                'name = "urgent"\nremaining = "2d"\nnotify = ["team"]',
                'name = "final"\nremaining = "12h"\nnotify = ["team"]',
            ],
            ["info", "warning", "warning", "failure"],
        ),
        (
            [
                'name = "new"\nremaining = "14d"\nnotify = ["team"]\nseverity = "success"',
                'name = "final"\nremaining = "12h"\nnotify = ["team"]\nseverity = "warning"',
            ],
            ["success", "warning"],
        ),
    ],
)
def test_tier_severity_defaults_by_rank_or_as_set(tiers: list[str], types: list[str]) -> None:
    """Issue 13 item 7: every alert was Apprise type info."""
    config = parse_config(tiers_config(*tiers), env={})
    assert [t.notify_type for t in config.policy.tiers] == types


def test_an_unknown_severity_names_its_key() -> None:
    text = tiers_config('name = "new"\nremaining = "14d"\nnotify = ["team"]\nseverity = "red"')
    (problem,) = problems_of(text)
    assert problem.startswith("policy.tiers[0].severity:")
    assert "info" in problem and "failure" in problem


def test_interpolation_from_environment_and_files(tmp_path: Path) -> None:
    secret = tmp_path / "smtp-pass"
    secret.write_text("s3cret\n")
    text = MINIMAL.replace(
        'team = "json://127.0.0.1:9/hook"',
        f'team = "mailtos://${{SMTP_USER}}:${{file:{secret}}}@smtp.example.com"\n'
        'cost = "json://h/$${literal}"',
    )
    config = parse_config(text, env={"SMTP_USER": "bot"})
    assert config.channels["team"].url == "mailtos://bot:s3cret@smtp.example.com"
    assert config.channels["cost"].url == "json://h/${literal}"


@pytest.mark.parametrize(
    ("env", "listen"),
    [
        ({}, "127.0.0.1:9464"),  # unset: the default (a first run on a host)
        ({"RW_LISTEN": ""}, "127.0.0.1:9464"),  # empty, as in the shell
        ({"RW_LISTEN": "0.0.0.0:9464"}, "0.0.0.0:9464"),  # the container image sets it
    ],
)
def test_a_reference_may_name_a_default_for_an_unset_variable(
    env: dict[str, str], listen: str
) -> None:
    """One config file for a host and a container: the image sets the variable, a host
    install does not and gets the loopback default."""
    text = MINIMAL + '\n[server]\nlisten = "${RW_LISTEN:-127.0.0.1:9464}"\n'
    config = parse_config(text, env=env)
    assert config.server is not None and config.server.listen == listen


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("[auth]", "[auth]\ncolour = 1"), "auth.colour: unknown key"),
        (("[auth]", "[partner_centre]\nx = 1\n[auth]"), "partner_centre: unknown key"),
        (('remaining = "14d"', 'remaining = "14days"'), "policy.tiers[0].remaining: '14days'"),
        (('remaining = "14d"', "remaining = 14"), "policy.tiers[0].remaining: a duration must"),
        (('notify = ["team"]', 'notify = ["teams"]'), "policy.tiers[0].notify: unknown channel"),
        (('method = "env"', 'method = "password"'), "auth.method: Input should be"),
        (('method = "env"', 'method = "msal"'), 'auth: method "msal" needs tenant_id'),
        (('method = "env"', 'method = "command"'), 'auth: method "command" needs command'),
        (("[auth]", '[schedule]\ninterval = "0s"\n[auth]'), "schedule.interval: interval must"),
        (("[auth]", "[policy]\ndigest_over = 0\n[auth]"), "policy.digest_over: Input should be"),
        (
            ("[auth]", '[server]\nlisten = "9464"\n[auth]'),
            "server.listen: '9464' is not \"host:port\"",
        ),
        (("[auth]", '[messages]\ntimezone = "Europe/Amsterdm"\n[auth]'), "messages.timezone:"),
        (
            ("[auth]", '[operations]\nnotify = ["pager"]\n[auth]'),
            "operations.notify: unknown channel",
        ),
    ],
)
def test_each_problem_names_its_key(change: tuple[str, str], expected: str) -> None:
    old, new = change
    text = MINIMAL.replace(old, new, 1)
    assert any(expected in problem for problem in problems_of(text)), problems_of(text)


def test_channel_table_problems_are_reported() -> None:
    text = MINIMAL.replace(
        'team = "json://127.0.0.1:9/hook"',
        'team = { url = "json://h/", quiet_hours = "25:00-08:00", quiet_days = ["Sunday"], '
        'timezone = "Nowhere/City", match = { colour = "red" }, to_assignees = true }',
    )
    found = "\n".join(problems_of(text))
    for key in (
        "channels.team.quiet_hours",
        "channels.team.quiet_days[0]",
        "channels.team.timezone",
        "channels.team.match.colour: unknown key",
    ):
        assert key in found


def test_all_problems_come_at_once() -> None:
    text = """
[auth]
method = "env"
tokn_env = "X"
[policy]
digest_ovr = 3
[[policy.tiers]]
name = "new"
remaining = "soon"
notify = ["nobody"]
[channels]
team = "${MISSING_URL}"
"""
    found = problems_of(text)
    assert len(found) == 5, found
    joined = "\n".join(found)
    assert "auth.tokn_env" in joined
    assert "policy.digest_ovr" in joined
    assert "policy.tiers[0].remaining" in joined
    assert "policy.tiers[0].notify: unknown channel 'nobody'" in joined
    assert "channels.team: environment variable MISSING_URL is not set" in joined


def test_a_config_needs_at_least_one_tier() -> None:
    text = '[auth]\nmethod = "env"\n[policy]\ntiers = []\n'
    assert any("policy.tiers" in p for p in problems_of(text))


def test_problems_never_echo_secret_values() -> None:
    text = MINIMAL.replace('method = "env"', 'method = "env"\ntoken_env = 42')
    text = text.replace(
        'team = "json://127.0.0.1:9/hook"', 'team = { url = "slack://xoxb-SECRET", x = 1 }'
    )
    for problem in problems_of(text):
        assert "SECRET" not in problem


def test_secret_file_missing_is_a_problem(tmp_path: Path) -> None:
    text = MINIMAL.replace("json://127.0.0.1:9/hook", f"json://${{file:{tmp_path}/nope}}@h/")
    assert any("cannot read secret file" in p for p in problems_of(text))


def test_invalid_toml_names_the_line() -> None:
    assert "not valid TOML" in problems_of("[auth\nmethod=1")[0]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in caught.value.problems[0]
    assert "--config" in caught.value.problems[0]


def test_relative_state_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "rw.toml"
    path.parent.mkdir()
    path.write_text(MINIMAL + '\n[state]\npath = "data/state.db"\n')
    config = load_config(path, env={})
    assert config.state.path == tmp_path / "conf" / "data" / "state.db"
    assert config.cache_path == tmp_path / "conf" / "data" / "msal-cache.json"


def test_config_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_config_path("x.toml", {"REFERRAL_WATCH_CONFIG": "y.toml"}) == Path("x.toml")
    assert find_config_path(None, {"REFERRAL_WATCH_CONFIG": "y.toml"}) == Path("y.toml")
    (tmp_path / "referral-watch.toml").write_text("")
    assert find_config_path(None, {}) == Path("referral-watch.toml")
    os.remove(tmp_path / "referral-watch.toml")
    if not Path("/etc/referral-watch/config.toml").exists():
        # nothing found: the first default is named, so the error says where it looked
        assert find_config_path(None, {}) == Path("referral-watch.toml")


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL, env={})
    with pytest.raises(ValueError, match="frozen"):
        config.schedule.interval = timedelta(seconds=1)  # type: ignore[misc]
