"""Readers for the files an operator deploys (Dockerfile, YAML manifests, env files), shared by
test_deploy.py and test_kubernetes.py."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
EXAMPLE = ROOT / "config" / "referral-watch.example.toml"
ENV_EXAMPLE = ROOT / "config" / ".env.example"
# The operator's copy of the example: what Compose mounts and the ConfigMap is built from.
OPERATOR_CONFIG = ROOT / "config" / "referral-watch.toml"

HEALTH_CHECK = ["referral-watch", "status", "--check"]


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, args))
    return found


def args_of(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON array) form: {args}"
    return [str(v) for v in value]


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    return env


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), path
    return data


def final_stage() -> list[tuple[str, str]]:
    return stages(DOCKERFILE.read_text(encoding="utf-8"))[-1]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(final_stage(), "ENV"):
        for item in shlex.split(args):
            name, _, value = item.partition("=")
            env[name] = value
    return env


def image_uid() -> int:
    [user] = args_of(final_stage(), "USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), "USER should be numeric, so Kubernetes can check runAsNonRoot"
    return int(uid)
