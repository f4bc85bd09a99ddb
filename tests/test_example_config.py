"""The shipped example config is the configuration reference: it must parse, name every key
the schema knows (with a comment giving its default), and use only variables .env.example has."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from referral_watch.config import Config, MatchConfig, format_duration, parse_duration
from referral_watch.config.loader import parse_config
from referral_watch.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "referral-watch.example.toml"
ENV_EXAMPLE = ROOT / "config" / ".env.example"

# "# key = value" or "# [table]" at the start of a line: an optional setting shown commented out.
# Prose comments never look like that (they start with a capital, a quote or a symbol).
COMMENTED_SETTING = re.compile(r"^# ?(\[\[?[a-z_.]+\]\]?\s*$|[a-z_]+ = \S.*$)")
SETTING = re.compile(r"^([a-z_]+) = ")
TABLE = re.compile(r"^\[\[?([a-z_.]+)\]\]?\s*$")
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=value lines, as Docker's env_file, systemd's EnvironmentFile and kubectl read them."""
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: not NAME=value: {line!r}"
            env[name] = value
    return env


# Settings that replace another one: switching the first on switches the second off.
INSTEAD_OF = {("state", "url"): "path"}  # PostgreSQL instead of the SQLite file


def uncommented(text: str, *, alternatives: bool = True) -> str:
    """The example with every commented-out setting switched on (one of each pair in
    INSTEAD_OF unless `alternatives` is false: a set of keys, not a config)."""
    lines = []
    switched: set[str] = set()  # "table.key" switched on here
    table = ""
    for line in text.splitlines():
        match = COMMENTED_SETTING.match(line)
        active = match.group(1) if match else line
        if header := TABLE.match(active):
            table = header.group(1)
        elif match and (setting := SETTING.match(active)):
            switched.add(f"{table}.{setting.group(1)}")
        lines.append(active)
    off = {
        f"{section}.{old}"
        for (section, new), old in INSTEAD_OF.items()
        if alternatives and f"{section}.{new}" in switched
    }
    table, out = "", []
    for line in lines:
        if header := TABLE.match(line):
            table = header.group(1)
        setting = SETTING.match(line)
        out.append(f"# {line}" if setting and f"{table}.{setting.group(1)}" in off else line)
    return "\n".join(out) + "\n"


def normalize(path: tuple[str, ...]) -> str:
    """channels.<any name>.x -> channels.*.x: channel names are the operator's choice."""
    parts = list(path)
    if len(parts) >= 2 and parts[0] == "channels":
        parts[1] = "*"
    return ".".join(parts)


def file_keys(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[str]:
    """Every key path in parsed TOML; lists of tables contribute their items' keys."""
    for key, value in data.items():
        path = (*prefix, key)
        yield normalize(path)
        tables = value if isinstance(value, list) else [value]
        for table in tables:
            if isinstance(table, dict):
                yield from file_keys(table, path)


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside Optional[...], list[...], dict[str, ...] and Annotated[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is dict:
        return model_of(typing.get_args(annotation)[1])
    for arg in typing.get_args(annotation):
        found = model_of(arg)
        if found is not None:
            return found
    return None


def model_fields(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, FieldInfo]]:
    """(key path, field) for every key a config file may set, walking nested sections."""
    for name, field in model.model_fields.items():
        if field.exclude:  # set by the loader, not by the file (Config.source)
            continue
        annotation = field.annotation
        path = (*prefix, name)
        yield ".".join(path), field
        if typing.get_origin(annotation) is dict:
            path = (*path, "*")
            yield ".".join(path), field
        nested = model_of(annotation)
        if nested is not None:
            yield from model_fields(nested, path)


@pytest.fixture(scope="module")
def text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def test_example_parses_with_the_env_example_variables(text: str, env: dict[str, str]) -> None:
    config = parse_config(text, env=env)
    assert [t.name for t in config.policy.tiers] == ["new", "reminder", "urgent", "final"]
    assert set(config.channels) == {"team", "managers", "ops"}
    assert config.channels["team"].url == env["TEAMS_WORKFLOW_URL"]
    assert env["SMTP_PASS"] in config.channels["managers"].url


def test_example_needs_its_variables(text: str, env: dict[str, str]) -> None:
    """The example really reads the environment: without .env it is rejected, naming the key."""
    without = {k: v for k, v in env.items() if k != "TEAMS_WORKFLOW_URL"}
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=without)
    [problem] = caught.value.problems
    assert problem.startswith("channels.team: ")
    assert "TEAMS_WORKFLOW_URL" in problem


def test_commented_out_settings_are_valid_too(text: str, env: dict[str, str]) -> None:
    """Switching on every optional setting shown in the example still gives a valid config,
    so no commented-out key is misspelt or has a value of the wrong shape."""
    switched_on = uncommented(text)
    assert switched_on != text
    config = parse_config(switched_on, env=env)
    assert config.heartbeat is not None
    assert config.channels["owners"].to_assignees
    benelux = config.channels["benelux"].match
    assert benelux is not None
    assert benelux.country == ["NL", "BE", "LU"]


def test_the_example_product_match_matches_microsofts_sample_referrals(
    text: str, env: dict[str, str]
) -> None:
    """Product tags are ids such as `Microsoft365`: a match on a marketing name ("Microsoft 365
    E5") could never hear about any lead."""
    from referral_watch.model import parse_referral
    from referral_watch.policy import channel_matches

    config = parse_config(uncommented(text), env=env)
    benelux = config.channels["benelux"]
    assert benelux.match is not None and benelux.match.product
    only_products = benelux.model_copy(update={"match": MatchConfig(product=benelux.match.product)})
    # the `requirements` of Microsoft's own samples (shared/reference/sample-referrals-page.json)
    samples = [
        {"products": [{"id": "Microsoft365"}], "solutions": [{"id": "SOL-Microsoft365"}]},
        {"products": [{"id": "AzureSQL"}], "services": [{"id": "Migration"}]},
    ]
    for requirements in samples:
        record = {
            "id": "c5fbb3b6-be74-4795-9fb5-4324c73fed37",
            "createdDateTime": "2020-10-30T21:03:00.0000000Z",
            "details": {"requirements": requirements},
        }
        assert channel_matches(only_products, parse_referral(record)), requirements


def test_every_variable_the_example_uses_is_in_env_example(text: str, env: dict[str, str]) -> None:
    settings = [line for line in uncommented(text).splitlines() if not line.startswith("#")]
    used = set(VARIABLE.findall("\n".join(settings)))
    assert used, "the example should take its secrets from ${NAME}s"
    assert sorted(used - set(env)) == []
    # and .env.example lists nothing the example does not use
    assert sorted(set(env) - used) == []


def test_env_example_is_plain_name_equals_value() -> None:
    """No quotes or `export`: Docker, systemd and kubectl would read those differently."""
    for name, value in read_env_file(ENV_EXAMPLE).items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), name
        assert value and value == value.strip(), name
        assert not value.startswith(("'", '"')), name


def test_every_key_of_the_schema_is_in_the_example(text: str) -> None:
    in_file = set(file_keys(tomllib.loads(uncommented(text, alternatives=False))))
    in_model = {path for path, _ in model_fields(Config)}
    # the walk reaches into dicts, lists and optional sections
    assert {"channels.*.match.min_deal_value", "policy.tiers.repeat", "heartbeat.url"} <= in_model
    assert sorted(in_model - in_file) == []
    assert sorted(in_file - in_model) == []


def setting_comments(text: str) -> dict[str, list[str]]:
    """For each key path (first occurrence), the prose comment lines just above it, skipping
    over neighbouring settings (so `body` shares the comment written above `title`)."""
    lines = text.splitlines()
    table: tuple[str, ...] = ()
    found: dict[str, list[str]] = {}
    for index, line in enumerate(lines):
        active = uncommented(line).rstrip("\n")
        if header := TABLE.match(active):
            table = tuple(header.group(1).split("."))
            continue
        setting = SETTING.match(active)
        if not setting:
            continue
        path = normalize((*table, setting.group(1)))
        if path not in found:
            found[path] = prose_above(lines, index)
    return found


def prose_above(lines: list[str], index: int) -> list[str]:
    above = index - 1
    while above >= 0 and (SETTING.match(lines[above]) or COMMENTED_SETTING.match(lines[above])):
        above -= 1
    prose: list[str] = []
    while above >= 0 and lines[above].startswith("#") and not COMMENTED_SETTING.match(lines[above]):
        prose.insert(0, lines[above])
        above -= 1
    return prose


def stated_default(prose: list[str]) -> str | None:
    match = re.search(r"Default: (.*)$", " ".join(line.lstrip("# ") for line in prose))
    return match.group(1) if match else None


def as_written(value: Any) -> str:
    """A model default in the notation the example uses for it."""
    if isinstance(value, timedelta):
        return f'"{format_duration(value)}"'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | Path):
        return f'"{value}"'
    return str(value)


def test_every_key_has_a_comment_with_its_default(text: str) -> None:
    comments = setting_comments(text)
    fields = dict(model_fields(Config))
    leaves = {
        path: field
        for path, field in fields.items()
        if not any(p.startswith(path + ".") for p in fields)
    }
    problems = []
    for path, field in sorted(leaves.items()):
        prose = comments.get(path)
        if not prose:
            problems.append(f"{path}: no comment above it")
            continue
        said = stated_default(prose)
        required = field.default is PydanticUndefined and field.default_factory is None
        if required:
            if not any("Required" in line for line in prose):
                problems.append(f"{path}: required, and the comment should say so")
        elif said is None:
            problems.append(f"{path}: the comment gives no 'Default: ...'")
        else:
            problems.extend(default_mismatch(path, said, field.default))
    assert problems == []


def default_mismatch(path: str, said: str, default: Any) -> list[str]:
    """Check the stated default where it is a literal; prose ('beside state.path') is trusted."""
    if said.startswith(("none", "any")):
        expected_none = default is None or default == []
        return [] if expected_none else [f"{path}: says {said!r}, the default is {default!r}"]
    if re.match(r"\[\]( |$)", said):
        return [] if default == [] else [f"{path}: says [], the default is {default!r}"]
    literal = re.match(r'("[^"]*"|\d+\b|true\b|false\b)', said)
    if literal is None:
        return []
    written = literal.group(1)
    if isinstance(default, timedelta):  # "14d" and "2w" are the same default
        same = parse_duration(written.strip('"')) == default
    else:
        same = written == as_written(default)
    return [] if same else [f"{path}: says {written}, the default is {as_written(default)}"]


def test_the_default_check_notices_a_wrong_default() -> None:
    """The comment check above is not vacuous: a drifted default is reported."""
    wrong = EXAMPLE.read_text(encoding="utf-8").replace(
        'Default: "15m"\ninterval', 'Default: "10m"\ninterval'
    )
    assert wrong != EXAMPLE.read_text(encoding="utf-8")
    fields = dict(model_fields(Config))
    said = stated_default(setting_comments(wrong)["schedule.interval"])
    assert said is not None
    assert default_mismatch("schedule.interval", said, fields["schedule.interval"].default)


def check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`referral-watch --config PATH check-config`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "referral_watch", "--config", str(path), "check-config"],
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(path.parent), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("switched_on", [False, True], ids=["as-shipped", "all-options-on"])
def test_check_config_accepts_the_example(
    text: str, env: dict[str, str], tmp_path: Path, switched_on: bool
) -> None:
    """check-config also checks what parse_config cannot: Apprise URLs and tier templates."""
    path = tmp_path / "config.toml"
    path.write_text(uncommented(text) if switched_on else text, encoding="utf-8")
    result = check_config(path, env)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_check_config_rejects_a_bad_channel_url(
    text: str, env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    result = check_config(path, {**env, "TEAMS_WORKFLOW_URL": "teams-url-goes-here"})
    assert result.returncode == 2
    assert "channels.team.url" in result.stderr
