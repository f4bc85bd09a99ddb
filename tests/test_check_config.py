"""check-config: every problem in one pass, placeholders and unset variables as warnings
(exit 0, or 2 with --strict), channel names that are not channels refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from referral_watch.redact import scrub

from conftest import World

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "referral-watch.example.toml"
ENV_EXAMPLE = EXAMPLE.with_name(".env.example")


def untouched_example(tmp_path: Path) -> Path:
    """The example and its .env, copied as a new operator does before editing them."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "config.toml").write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / ".env").write_text(ENV_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    return folder / "config.toml"


def test_the_untouched_example_reports_its_placeholders(world: World, tmp_path: Path) -> None:
    path = untouched_example(tmp_path)
    checked = world.cli("--config", str(path), "check-config")
    assert checked.code == 0, checked.err  # valid: the placeholders are warnings
    assert "valid" in checked.out and "warning(s)" in checked.out
    assert "warning: auth.client_id: holds the all-zero placeholder id" in checked.err
    assert 'warning: channels.team: holds a "REPLACE-WITH-..." placeholder' in checked.err
    assert "REPLACE-WITH-THE-SIGNATURE" not in checked.err  # the value itself is not shown
    assert "referral-watch login" in checked.err  # nobody signed in yet
    strict = world.cli("--config", str(path), "check-config", "--strict")
    assert strict.code == 2


def test_three_independent_problems_are_reported_in_one_run(world: World) -> None:
    """A schema error, a channel URL Apprise does not know, a cross-section rule and an unset
    token variable: all four in one run, not one layer at a time."""
    world.channels = {"ops": "nosuchscheme://somewhere/x"}
    world.state = 'keep_resolvd = "30d"'  # a typo: unknown key
    world.auth = 'method = "env"\ntoken_env = "NOBODY_SET_THIS_TOKEN"'
    world.extra = '[server]\nlisten = "0.0.0.0:9464"\n[console]\nsign_in = "none"\n'
    checked = world.cli("check-config")
    assert checked.code == 2
    assert "state.keep_resolvd: unknown key" in checked.err
    assert "channels.ops.url: Apprise does not know the scheme nosuchscheme://" in checked.err
    assert 'console.sign_in: "none" lets anyone' in checked.err
    assert "warning: auth.token_env: the environment variable NOBODY_SET_THIS_TOKEN" in checked.err


def test_a_key_under_channels_that_is_no_channel_is_refused(world: World) -> None:
    world.channels = {"intervall": "5m", "digest": "{ }"}
    checked = world.cli("check-config")
    assert checked.code == 2
    assert "channels.intervall.url: '5m' is not a URL" in checked.err
    run = world.cli("run", "--once")
    assert run.code == 2 and "channels.intervall" in run.err


def test_an_unset_token_variable_is_a_warning_and_strict_fails(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PARTNER_CENTER_TOKEN", raising=False)
    world.auth = 'method = "env"'
    checked = world.cli("check-config")
    assert checked.code == 0
    assert "PARTNER_CENTER_TOKEN is not set" in checked.err
    assert world.cli("check-config", "--strict").code == 2
    monkeypatch.setenv("PARTNER_CENTER_TOKEN", "sandbox-token")
    clean = world.cli("check-config", "--strict")
    assert clean.code == 0 and "warning" not in clean.err


def test_a_missing_token_program_is_a_warning(world: World) -> None:
    world.auth = 'method = "command"\ncommand = ["no-such-token-program-here", "--print"]'
    checked = world.cli("check-config")
    assert checked.code == 0
    assert "'no-such-token-program-here' is not found on PATH" in checked.err


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("the bearer token was refused", "the bearer token was refused"),
        ("a Bearer header is missing.", "a Bearer header is missing."),
        ("Authorization: Bearer eyJ0eXAiOiJKV1Qi.eyJzdWIi.c2ln", "Authorization: Bearer ***"),
        ("Bearer sandbox-token", "Bearer ***"),
        ("bearer abc123", "bearer ***"),
        ("bearer QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "bearer ***"),
    ],
)
def test_the_scrubber_masks_tokens_not_words(text: str, shown: str) -> None:
    assert scrub(text) == shown
