"""The deployment files pass the real validators: hadolint (Dockerfiles), the Compose Specification schema
(check-jsonschema's vendored copy: PyPI's docker-compose 1.29 no longer installs on Python 3.11+), and
kubernetes-validate (strict, against the oldest Kubernetes we support)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OLDEST_KUBERNETES = "1.30.0"


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(path).exists(), f"{name} is a dev dependency: pip install -e '.[dev]'"
    return path


CLIENT_NEEDS = {
    "weir-proto",
    "grpcio",
    "grpcio-health-checking",
    "grpcio-status",
    "protobuf",
    "googleapis-common-protos",
}


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.server", "Dockerfile.gateway"])
def test_dockerfile_passes_hadolint(dockerfile):
    result = _run(_tool("hadolint"), str(DEPLOY / dockerfile))
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_image_installs_no_torch():
    lines = [line for line in (DEPLOY / "Dockerfile.gateway").read_text().splitlines() if not line.startswith("#")]
    text = "\n".join(lines)
    assert "./gateway" in text and "./server" not in text and "torch" not in text


def _dependencies(folder: str) -> list[str]:
    with open(REPO / folder / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def test_gateway_and_client_distributions_never_need_the_server():
    for folder in ("gateway", "client", "proto"):
        names = " ".join(_dependencies(folder))
        assert "torch" not in names and "weir-server" not in names, folder
    assert all(d.split(">")[0].split("=")[0] in CLIENT_NEEDS for d in _dependencies("client"))


def test_compose_file_matches_the_compose_specification():
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_servers_gateway_collector_and_prometheus_with_health_checks():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"gateway", "otel-collector", "prometheus"} <= set(services)
    servers = [name for name, s in services.items() if "Dockerfile.server" in str(s.get("build"))]
    assert len(servers) >= 2
    for name in [*servers, "gateway"]:
        assert "healthcheck" in services[name], name
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4317")
    for mounted in ("otel-collector", "prometheus"):
        for volume in services[mounted]["volumes"]:
            assert (REPO / volume.split(":")[0]).exists(), volume


def test_prometheus_scrapes_the_gateway_and_every_compose_server():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert "gateway:8000" in targets
    assert {"weir-server-1:9400", "weir-server-2:9400"} <= targets


def test_kubernetes_manifests_are_valid():
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    result = _run(_tool("kubernetes-validate"), "--strict", "-k", OLDEST_KUBERNETES, *manifests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_has_a_headless_service_grpc_readiness_and_an_autoscaler_on_waiting_requests():
    documents = [d for p in (DEPLOY / "k8s").glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d]
    by_kind: dict[str, list[dict]] = {}
    for d in documents:
        by_kind.setdefault(d["kind"], []).append(d)
    assert any(s["spec"].get("clusterIP") == "None" for s in by_kind["Service"])
    server = next(d for d in by_kind["Deployment"] if d["metadata"]["name"] == "weir-server")
    probe = server["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["grpc"] == {"port": 50051, "service": "weir.v1.InferenceService"}
    (hpa,) = by_kind["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "weir_requests_waiting"
