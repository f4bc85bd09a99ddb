"""The Kubernetes manifests (deploy/kubernetes, and deploy/kubernetes-ha for replicas on
PostgreSQL): parsed, and rendered by kustomize (`kubectl kustomize`) where kubectl is installed.

The ConfigMap is not a copy of the config: kustomize's configMapGenerator builds it from the
operator's config/referral-watch.toml, the file Compose mounts and systemd installs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from referral_watch.config import Config, StateConfig
from referral_watch.config.loader import parse_config

from deployfiles import (
    ENV_EXAMPLE,
    EXAMPLE,
    OPERATOR_CONFIG,
    ROOT,
    image_env,
    image_uid,
    load_yaml,
    read_env_file,
)

K8S = ROOT / "deploy" / "kubernetes"
K8S_HA = ROOT / "deploy" / "kubernetes-ha"
LIVENESS = "/livez"
READINESS = "/healthz"
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


def k8s(name: str) -> dict[str, Any]:
    return load_yaml(K8S / name)


def container() -> dict[str, Any]:
    [only] = k8s("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def secret_env() -> dict[str, str]:
    data = k8s("secret.example.yaml")["stringData"]
    assert isinstance(data, dict)
    return {str(k): str(v) for k, v in data.items()}


def in_the_pod(text: str, **extra: str) -> Config:
    """A config as the pod reads it: the Secret's variables and the image's environment."""
    return parse_config(text, env={**secret_env(), **image_env(), **extra})


def referenced(text: str) -> set[str]:
    """The variables the settings (not the comments) of a TOML text refer to, defaults aside."""
    settings = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return {name for name in REFERENCE.findall("\n".join(settings))}


def generator() -> dict[str, Any]:
    [only] = k8s("kustomization.yaml")["configMapGenerator"]
    assert isinstance(only, dict)
    return only


def ha_config_text() -> str:
    """The operator's config for replicas: the example with [state] url instead of path."""
    text = EXAMPLE.read_text(encoding="utf-8")
    path = 'path = "/var/lib/referral-watch/state.db"\n'
    assert path in text
    return text.replace(
        path,
        'url = "postgresql://referral_watch:${STATE_DB_PASSWORD}@postgres.databases.svc:5432/'
        'referral_watch?sslmode=require"\n',
    )


def render(tmp_path: Path, overlay: str, config_text: str) -> dict[str, dict[str, Any]]:
    """`kubectl kustomize --load-restrictor LoadRestrictionsNone deploy/<overlay>` (the command
    the kustomization documents) on a copy of deploy/ beside an operator's config file."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed on this machine")
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / OPERATOR_CONFIG.name).write_text(config_text, encoding="utf-8")
    command = [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone"]
    assert " ".join(["kubectl", *command[1:], "deploy/kubernetes"]) in (
        (K8S / "kustomization.yaml").read_text(encoding="utf-8")
    )
    result = subprocess.run(
        [*command, str(tmp_path / "deploy" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = list(yaml.safe_load_all(result.stdout))
    by_kind = {r["kind"]: r for r in rendered}
    assert len(by_kind) == len(rendered), "one object of each kind"
    return by_kind


# --- the manifests as files ----------------------------------------------------------------


def test_one_pod_at_a_time() -> None:
    spec = k8s("deployment.yaml")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}  # never two pods on one state file


def test_liveness_asks_whether_the_process_is_stuck_and_readiness_whether_it_can_poll() -> None:
    """Issue 27.9: liveness ran `status --check`, so an expired sign-in restarted the pod for
    ever. Liveness (and the startup probe that gates it) now ask /livez; readiness /healthz."""
    probes = container()
    for probe in ("startupProbe", "livenessProbe"):
        assert "exec" not in probes[probe]
        assert probes[probe]["httpGet"]["path"] == LIVENESS
    readiness = probes["readinessProbe"]["httpGet"]
    assert readiness["path"] == READINESS
    [port] = [p for p in probes["ports"] if p["name"] == readiness["port"]]
    assert probes["livenessProbe"]["httpGet"]["port"] == port["name"]
    # the config, as the pod reads it, listens on that port on every interface
    server = in_the_pod(EXAMPLE.read_text(encoding="utf-8")).server
    assert server is not None and server.listen == f"0.0.0.0:{port['containerPort']}"


def test_the_pod_is_locked_down_but_can_write_its_state() -> None:
    pod = k8s("deployment.yaml")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid()
    assert pod["securityContext"]["fsGroup"] == image_uid()  # the volume is writable for it
    box = container()["securityContext"]
    assert box["readOnlyRootFilesystem"] is True
    assert box["allowPrivilegeEscalation"] is False
    assert box["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {
        m["mountPath"]: volumes[m["name"]]
        for m in container()["volumeMounts"]
        if not m.get("readOnly")
    }
    assert set(writable) == {"/data", "/tmp"}
    assert (
        writable["/data"]["persistentVolumeClaim"]["claimName"]
        == k8s("pvc.yaml")["metadata"]["name"]
    )
    assert "emptyDir" in writable["/tmp"]
    assert {"requests", "limits"} <= set(container()["resources"])
    assert "memory" in container()["resources"]["limits"]


def test_the_configmap_is_built_from_the_config_file_compose_and_systemd_use() -> None:
    """Issue 27.9: the ConfigMap was an inline, shorter copy of the config (a fourth place to
    keep in step). Now kustomize builds it from config/referral-watch.toml."""
    key, _, source = generator()["files"][0].partition("=")
    assert generator()["files"] == [f"{key}={source}"]
    assert (K8S / source).resolve() == OPERATOR_CONFIG
    config_path = Path(image_env()["REFERRAL_WATCH_CONFIG"])
    assert key == config_path.name
    # the pod mounts it where the image reads its config
    pod = k8s("deployment.yaml")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [m for m in container()["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["configMap"]["name"] == generator()["name"]
    # and no manifest carries a copy of a config any more
    for manifest in [*K8S.glob("*.yaml"), *K8S_HA.glob("*.yaml")]:
        for document in yaml.safe_load_all(manifest.read_text(encoding="utf-8")):
            assert document.get("kind") != "ConfigMap", manifest.name


def test_the_example_config_runs_in_the_pod_with_its_state_on_the_volume() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    config = in_the_pod(text)
    # the image links the default state folder to the /data volume (test_deploy checks it)
    assert config.state.path.parent == StateConfig().path.parent == Path("/var/lib/referral-watch")
    assert config.cache_path.parent == config.state.path.parent
    assert referenced(text) == set(secret_env()) | {"REFERRAL_WATCH_LISTEN"}
    assert "REFERRAL_WATCH_LISTEN" in image_env()


def test_the_pod_reads_the_secret_the_env_example_describes() -> None:
    [source] = container()["envFrom"]
    assert source["secretRef"]["name"] == k8s("secret.example.yaml")["metadata"]["name"]
    # `kubectl create secret generic --from-env-file` of a filled-in .env gives the same Secret
    env = read_env_file(ENV_EXAMPLE)
    assert {name: env[name] for name in secret_env()} == secret_env()
    # the PVC is ReadWriteOnce: one node, one pod
    assert k8s("pvc.yaml")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_the_service_and_the_example_ingress_reach_the_pods_web_port() -> None:
    service = k8s("service.yaml")
    pod = k8s("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container()["ports"]}
    ingress = k8s("ingress.example.yaml")
    [rule] = ingress["spec"]["rules"]
    for path in rule["http"]["paths"]:
        backend = path["backend"]["service"]
        assert backend == {"name": service["metadata"]["name"], "port": {"name": port["name"]}}
    assert ingress["spec"]["tls"][0]["hosts"] == [rule["host"]]


def _routed(path: str) -> bool:
    """Whether the example Ingress routes ``path`` (the Ingress API's Exact and Prefix rules:
    a prefix matches whole path elements)."""
    [rule] = k8s("ingress.example.yaml")["spec"]["rules"]
    for entry in rule["http"]["paths"]:
        wanted = entry["path"]
        if entry["pathType"] == "Exact" and path == wanted:
            return True
        prefix = wanted.rstrip("/")
        if entry["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/")):
            return True
    return False


def test_the_example_ingress_routes_the_console_and_webhooks_but_no_probe_or_metrics() -> None:
    """No controller-specific snippet (current ingress-nginx ignores server-snippet by
    default): /metrics, /healthz and /livez simply have no public route."""
    ingress = k8s("ingress.example.yaml")
    assert "annotations" not in ingress["metadata"]
    for path in ("/metrics", "/healthz", "/livez", "/metrics/", "/healthzx"):
        assert not _routed(path), path
    for path in (
        "/",
        "/leads/abc",
        "/leads/abc/answer",
        "/api/leads",
        "/auth/login",
        "/auth/callback",
        "/static/console.css",
        "/favicon.ico",
        "/webhooks/partner-center",
    ):
        assert _routed(path), path


def test_the_example_network_policy_lets_only_prometheus_and_the_ingress_in() -> None:
    policy = k8s("networkpolicy.example.yaml")
    pod = k8s("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources = [rule["from"] for rule in policy["spec"]["ingress"]]
    namespaces = [
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for peers in sources
        for peer in peers
    ]
    assert namespaces == ["monitoring", "ingress-nginx"]  # nobody else, no ipBlock
    [prometheus] = sources[0]
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    ports = {p["name"] for p in container()["ports"]}
    for rule in policy["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == ["metrics"] and "metrics" in ports


def test_the_kustomization_applies_everything_but_the_example_secret() -> None:
    listed = k8s("kustomization.yaml")["resources"]
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {"secret.example.yaml", "ingress.example.yaml", "networkpolicy.example.yaml"}
    assert set(listed) == manifests - examples
    assert "service.yaml" in listed


# --- rendered by kustomize -----------------------------------------------------------------


def test_kustomize_renders_the_configmap_from_the_operators_config_file(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8") + "\n# this operator's own edit\n"
    rendered = render(tmp_path, "kubernetes", text)
    assert sorted(rendered) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"]
    configmap = rendered["ConfigMap"]
    assert configmap["data"] == {"config.toml": text}  # the file itself, byte for byte
    # a changed file is a new name (kustomize's hash), so applying it rolls the pod
    name = configmap["metadata"]["name"]
    assert name.startswith(generator()["name"] + "-")
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "config", "configMap": {"name": name}} in pod["volumes"]
    assert pod["containers"][0]["image"] != "referral-watch"  # the kustomization's `images:`
    assert configmap["metadata"]["labels"]["app.kubernetes.io/part-of"] == "referral-watch"


def test_the_ha_overlay_runs_two_replicas_that_a_drain_cannot_both_stop(tmp_path: Path) -> None:
    rendered = render(tmp_path, "kubernetes-ha", ha_config_text())
    assert {"ConfigMap", "Deployment", "PersistentVolumeClaim", "PodDisruptionBudget"} <= set(
        rendered
    )
    spec = rendered["Deployment"]["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    budget = rendered["PodDisruptionBudget"]["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert rendered["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    [pod] = spec["template"]["spec"]["containers"]
    # /healthz is 200 on a healthy standby: readiness never takes the standby out
    assert pod["readinessProbe"]["httpGet"]["path"] == READINESS
    assert pod["livenessProbe"]["httpGet"]["path"] == LIVENESS
    config = in_the_pod(rendered["ConfigMap"]["data"]["config.toml"], STATE_DB_PASSWORD="pw")
    assert config.state.url is not None and config.state.url.startswith("postgresql://")
    assert config.state.shown.startswith("postgresql://referral_watch:***@")
    # the token cache on the shared volume (the image links /var/lib/referral-watch to /data)
    assert config.cache_path == Path("/var/lib/referral-watch/msal-cache.json")


def test_the_ha_config_takes_its_database_password_from_the_env_example() -> None:
    assert referenced(ha_config_text()) == set(secret_env()) | {
        "STATE_DB_PASSWORD",
        "REFERRAL_WATCH_LISTEN",
    }
    assert "STATE_DB_PASSWORD" in read_env_file(ENV_EXAMPLE)
