"""`check-config`: every problem of a config file in one pass, and what would stop it working.

One pass: the schema's problems, the checks across keys and sections (channel URLs Apprise
understands, templates that render, the console's and webhooks' rules, report schedules) and
the warnings are collected together; a section the schema refused only keeps the checks that
read it from running (TOML syntax errors aside: then nothing else can be read).

Warnings are what the schema cannot call wrong but a first run trips over: placeholders left
from the example file and the variables or programs the sign-in needs. `check-config` exits 0
with warnings, 2 with `--strict`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from referral_watch.config import Config, console_problems
from referral_watch.config.claims import claims_problems
from referral_watch.config.loader import key_path, read_config
from referral_watch.errors import ConfigError, ReferralWatchError


@dataclass
class Inspection:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: Config | None = None  # None when the schema refused the file


def inspect_config(text: str, env: Mapping[str, str], source: Path | None = None) -> Inspection:
    """Every error and warning of a config file's text (ConfigError only for bad TOML)."""
    config, data, errors = read_config(text, env=env, source=source)
    whole = config is not None
    checked = config if config is not None else _partial(data)
    errors += cross_problems(checked, None if whole else _valid_sections(data))
    warnings = list(placeholder_warnings(data)) + readiness_warnings(checked)
    return Inspection(errors, warnings, config)


def cross_problems(config: Config, valid: set[str] | None = None) -> list[str]:
    """What the schema cannot see: channel URLs Apprise understands, templates that render,
    the console's and webhooks' rules, report schedules. `valid`: the sections that passed
    the schema (None: all); a check reading a refused section is skipped."""
    problems: list[str] = []
    for sections, check in _CROSS_CHECKS:
        if valid is None or all(section in valid for section in sections):
            problems += check(config)
    return problems


def _channel_problems(config: Config) -> list[str]:
    from referral_watch.notify import check_channels, register_console_target

    if any(channel.url.startswith("console://") for channel in config.channels.values()):
        register_console_target()
    return check_channels(config.channels)


def _template_problems(config: Config) -> list[str]:
    from referral_watch.render.template_check import check_templates

    return check_templates(config)


def _webhook_problems(config: Config) -> list[str]:
    """The webhook trust roots and intermediates must be readable PEM now, not at the first
    event; the events arrive at the server's address."""
    webhooks = config.webhooks
    if webhooks is None:
        return []
    if config.server is None:
        return ["webhooks: [webhooks] needs [server]: the events arrive at its listen address"]
    from referral_watch.partner_center.webhooks.certificates import load_pem_file, load_trust_roots

    problems = []
    if webhooks.trust_roots is not None:
        try:
            load_trust_roots(webhooks.trust_roots)
        except ReferralWatchError as exc:
            problems.append(f"webhooks.trust_roots: {exc}")
    if webhooks.intermediates is not None:
        try:
            load_pem_file(webhooks.intermediates, "intermediates")
        except ReferralWatchError as exc:
            problems.append(f"webhooks.intermediates: {exc}")
    return problems


def _report_problems(config: Config) -> list[str]:
    if not config.reports:
        return []
    from referral_watch.schedule import report_triggers

    try:
        report_triggers(config)
    except ConfigError as exc:
        return exc.problems
    return []


# (the sections a check reads, the check)
_CROSS_CHECKS: list[tuple[tuple[str, ...], Callable[[Config], list[str]]]] = [
    (("channels",), _channel_problems),
    (("policy", "channels", "messages"), _template_problems),
    (("console", "server"), console_problems),
    (("claims", "channels", "policy"), claims_problems),
    (("webhooks", "server"), _webhook_problems),
    (("reports",), _report_problems),
]


# --- the sections the schema accepted -------------------------------------------------------


def _section_values(data: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(section, its validated value) for each section of the file the schema accepts."""
    for name, info in Config.model_fields.items():
        if name == "source" or name not in data:
            continue
        try:
            yield name, _adapter(info.annotation).validate_python(data[name])
        except ValidationError:
            if name == "channels" and isinstance(data[name], dict):
                yield name, _valid_channels(data[name])


def _valid_channels(channels: Mapping[str, Any]) -> dict[str, Any]:
    """The channels that pass the schema on their own (a refused one is reported already)."""
    adapter = _adapter(Config.model_fields["channels"].annotation)
    valid: dict[str, Any] = {}
    for name, value in channels.items():
        try:
            valid.update(adapter.validate_python({name: value}))
        except ValidationError:
            continue
    return valid


def _adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


def _valid_sections(data: Mapping[str, Any]) -> set[str]:
    """The sections whose checks may run: accepted by the schema, or absent (the default).
    Channels count as accepted: the ones the schema accepted are checked."""
    accepted = {name for name, _ in _section_values(data)}
    return {name for name in Config.model_fields if name in accepted or name not in data}


def _partial(data: Mapping[str, Any]) -> Config:
    """A Config of the sections the schema accepted (the others left at their defaults, or
    unset): only the checks reading accepted sections look at it."""
    return Config.model_construct(**dict(_section_values(data)))


# --- warnings ---------------------------------------------------------------------------------

# What the example file and .env.example hold in place of real values.
_PLACEHOLDERS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)replace[-_ ]?with"), 'a "REPLACE-WITH-..." placeholder'),
    (re.compile(r"\b0{8}-0{4}-0{4}-0{4}-0{12}\b"), "the all-zero placeholder id"),
    (
        re.compile(r"(?i)(?<![\w.-])(?:[\w-]+\.)*example\.(?:com|org|net)\b"),
        "an example.com/.org/.net address (reserved for examples: nothing sent there arrives)",
    ),
]


def placeholder_warnings(data: Any, where: tuple[int | str, ...] = ()) -> Iterator[str]:
    """Each value still holding an example's placeholder, by key (the value itself is not
    shown: it may hold a secret)."""
    if isinstance(data, str):
        for pattern, what in _PLACEHOLDERS:
            if pattern.search(data):
                yield f"{key_path(where)}: holds {what}: put in your real value"
                return
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from placeholder_warnings(value, (*where, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from placeholder_warnings(value, (*where, index))


def readiness_warnings(config: Config) -> list[str]:
    """What the sign-in needs and this machine lacks: the token variable (read from the
    process environment), the token program, a signed-in account."""
    auth = config.__dict__.get("auth")  # unset when the schema refused [auth]
    if auth is None:
        return []
    warnings: list[str] = []
    if auth.method == "env" and not os.environ.get(auth.token_env, "").strip():
        warnings.append(
            f"auth.token_env: the environment variable {auth.token_env} is not set: `run` "
            "cannot get a Partner Center token (export a bearer token there; an env file's "
            'values only fill ${...} references); or use method = "msal"'
        )
    if auth.method == "command" and auth.command and shutil.which(auth.command[0]) is None:
        warnings.append(
            f"auth.command: the program {auth.command[0]!r} is not found on PATH: `run` cannot "
            "get a Partner Center token"
        )
    if auth.method == "msal" and not config.cache_path.exists():
        warnings.append(
            f"auth: nobody has signed in yet (no token cache at {config.cache_path}): run "
            "`referral-watch login` as the user the service runs as, before `run`"
        )
    webhooks = config.__dict__.get("webhooks")
    if webhooks is not None and auth.method == "env":
        variable = webhooks.registration_token_env
        if not os.environ.get(variable, "").strip():
            warnings.append(
                f"webhooks.registration_token_env: the environment variable {variable} is not "
                "set: `referral-watch webhooks register` will need a token there"
            )
    return warnings
