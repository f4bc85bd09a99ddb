"""TOML + environment -> one frozen, validated Config (the schema is config/__init__.py).

Every problem is collected and reported at once, each with its key path
(``policy.tiers[1].notify``), so an operator fixes the file in one go.
"""

from __future__ import annotations

import io
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from referral_watch.config import Config
from referral_watch.errors import ConfigError

DEFAULT_PATHS = (Path("referral-watch.toml"), Path("/etc/referral-watch/config.toml"))
CONFIG_ENV = "REFERRAL_WATCH_CONFIG"
ENV_FILE_ENV = "REFERRAL_WATCH_ENV_FILE"


_REFERENCE = re.compile(r"\$\$|\$\{([^}]*)\}")


def key_path(loc: tuple[int | str, ...]) -> str:
    """('policy', 'tiers', 1, 'notify') -> 'policy.tiers[1].notify'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _interpolate(text: str, where: str, env: Mapping[str, str], problems: list[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1).strip()
        if name.startswith("file:"):
            return _secret_file(Path(name[5:]), where, problems)
        # ${NAME:-default}, as in the shell: the default when NAME is unset or empty
        name, fallback, default = name.partition(":-")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            problems.append(f"{where}: ${{{name}}} is not a variable name or ${{file:/path}}")
            return ""
        if fallback and not env.get(name):
            return default
        if name not in env:
            problems.append(
                f"{where}: environment variable {name} is not set "
                "(export it, or put it in the service's environment file)"
            )
            return match.group(0)  # keep the reference so no second problem follows
        return env[name]

    return _REFERENCE.sub(replace, text)


# A secret file larger than this is not a secret (`${file:/dev/zero}` would read for ever).
SECRET_FILE_LIMIT = 64 * 1024


def _secret_file(file_path: Path, where: str, problems: list[str]) -> str:
    try:
        with file_path.open("rb") as stream:
            data = stream.read(SECRET_FILE_LIMIT + 1)
    except OSError as exc:
        problems.append(f"{where}: cannot read secret file {file_path}: {exc.strerror}")
        return ""
    if len(data) > SECRET_FILE_LIMIT:
        problems.append(f"{where}: secret file {file_path} is larger than 64 KiB: not a secret")
        return ""
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        problems.append(f"{where}: secret file {file_path} is not UTF-8 text")
        return ""


def _walk(
    value: Any, loc: tuple[int | str, ...], env: Mapping[str, str], problems: list[str]
) -> Any:
    if isinstance(value, str):
        return _interpolate(value, key_path(loc), env, problems)
    if isinstance(value, dict):
        return {k: _walk(v, (*loc, k), env, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, (*loc, i), env, problems) for i, v in enumerate(value)]
    return value


def _pydantic_problems(error: ValidationError) -> Iterator[str]:
    for item in error.errors(include_input=False, include_url=False):
        loc = tuple(part for part in item["loc"] if not _is_pydantic_tag(part))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling, see config/referral-watch.example.toml)"
        elif item["type"] == "missing":
            message = "required key is missing"
        yield f"{key_path(loc)}: {message}"


def _is_pydantic_tag(part: int | str) -> bool:
    # Union members and validators show up in the loc as e.g. 'function-before[...]'.
    return isinstance(part, str) and ("[" in part or part in {"str", "list[str]"})


def _channel_references(raw: Mapping[str, Any]) -> Iterator[str]:
    """Every `notify`-style list must name channels that exist."""
    channels = raw.get("channels") if isinstance(raw.get("channels"), dict) else {}
    assert isinstance(channels, dict)
    known = sorted(channels)

    def check(names: Any, where: str) -> Iterator[str]:
        for name in [names] if isinstance(names, str) else names if isinstance(names, list) else []:
            if isinstance(name, str) and name not in channels:
                hint = f"known channels: {', '.join(known)}" if known else "[channels] is empty"
                yield f"{where}: unknown channel {name!r} ({hint})"

    policy = raw.get("policy") if isinstance(raw.get("policy"), dict) else {}
    assert isinstance(policy, dict)
    for i, tier in enumerate(_items(policy.get("tiers"))):
        if isinstance(tier, dict):
            yield from check(tier.get("notify", []), f"policy.tiers[{i}].notify")
    for key in ("on_expired", "on_resolved"):
        yield from check(policy.get(key, []), f"policy.{key}")
    for i, report in enumerate(_items(raw.get("reports"))):
        if isinstance(report, dict):
            yield from check(report.get("notify", []), f"reports[{i}].notify")
    operations = raw.get("operations")
    if isinstance(operations, dict):
        yield from check(operations.get("notify", []), "operations.notify")


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []  # a non-list is reported by validation


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are relative to the file, not to the working directory."""
    for section, key in (
        ("state", "path"),
        ("auth", "cache_path"),
        ("auth", "client_certificate"),
        ("webhooks", "trust_roots"),
        ("webhooks", "intermediates"),
    ):
        table = data.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and table[key]:
            path = Path(table[key]).expanduser()
            table[key] = str(path if path.is_absolute() else base / path)


def parse_config(
    text: str, *, env: Mapping[str, str] | None = None, source: Path | None = None
) -> Config:
    """Parse TOML text into a Config, or raise ConfigError listing every problem."""
    config, _, problems = read_config(text, env=env, source=source)
    if problems or config is None:
        raise ConfigError(problems, str(source) if source else None)
    return config


def read_config(
    text: str, *, env: Mapping[str, str] | None = None, source: Path | None = None
) -> tuple[Config | None, dict[str, Any], list[str]]:
    """(the Config or None, the file's values with ${...} filled in, every problem found by
    the schema); a TOML syntax error is a ConfigError at once (nothing else can be read)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(source) if source else None) from None
    problems: list[str] = []
    data = _walk(raw, (), os.environ if env is None else env, problems)
    problems.extend(_channel_references(data))
    if source is not None:
        _resolve_paths(data, source.resolve().parent)
    config: Config | None = None
    try:
        config = Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc))
    return config, data, problems


def find_config_path(cli_path: str | None, env: Mapping[str, str] | None = None) -> Path:
    """--config, else $REFERRAL_WATCH_CONFIG, else ./referral-watch.toml, else /etc/..."""
    environ = os.environ if env is None else env
    if cli_path:
        return Path(cli_path)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_PATHS[0]


def find_env_file(
    cli_path: str | None, config_path: Path, env: Mapping[str, str] | None = None
) -> Path | None:
    """--env-file, else $REFERRAL_WATCH_ENV_FILE, else a `.env` beside the config if there."""
    environ = os.environ if env is None else env
    if cli_path:
        return Path(cli_path)
    if environ.get(ENV_FILE_ENV):
        return Path(environ[ENV_FILE_ENV])
    beside = config_path.parent / ".env"
    return beside if beside.is_file() else None


def read_env_file(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of a dotenv file (python-dotenv's syntax, no ${} expansion:
    Docker's env_file and systemd's EnvironmentFile read the same file without any)."""
    from dotenv import dotenv_values

    text = _read_text(
        path, "environment file", f"--env-file PATH or set {ENV_FILE_ENV}", "config/.env.example"
    )
    values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    return {name: value for name, value in values.items() if value is not None}


def environment(env_file: Path | None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What ``${NAME}`` references see: the env file's values, overridden by the environment."""
    environ = os.environ if env is None else env
    from_file = read_env_file(env_file) if env_file is not None else {}
    return {**from_file, **environ}


def _read_text(path: Path, what: str, how: str, example: str) -> str:
    """A file's UTF-8 text; a missing or unreadable one is a ConfigError saying what to do."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [f"{what} {path} does not exist: pass {how} (an example is {example})"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError([f"cannot read {what} {path}: {reason}"]) from None


def config_text(path: Path) -> str:
    """The config file's text; a missing or unreadable file is a ConfigError saying what to do."""
    return _read_text(
        path,
        "config file",
        f"--config PATH or set {CONFIG_ENV}",
        "config/referral-watch.example.toml",
    )


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    return parse_config(config_text(path), env=env, source=path)
