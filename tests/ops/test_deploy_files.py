"""The deployment files pass the real validators: hadolint (Dockerfiles), the Compose Specification schema
(check-jsonschema's vendored copy: PyPI's docker-compose 1.29 no longer installs on Python 3.11+; no Docker
engine or compose plugin is needed), kubernetes-validate (strict, against the oldest Kubernetes we support), and
the Prometheus Operator CRD's schema for ServiceMonitors (tests/ops/schemas)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from k8s_support import OLDEST_KUBERNETES, by_kind, container_args, flag_value, validate_service_monitor

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    assert Path(path).exists(), f"{name} is a dev dependency: pip install -e '.[dev]'"
    return path


CLIENT_NEEDS = {
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


def _stages(dockerfile: str) -> dict[str, list[str]]:
    """Each build stage's instructions (continuation lines joined, comments dropped), by name; the last is "final"."""
    text = (DEPLOY / dockerfile).read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            words = line.split()
            current = [line]
            stages[words[3] if len(words) > 3 and words[2].upper() == "AS" else f"stage{len(stages)}"] = current
        elif current:
            current.append(line)
    stages["final"] = current
    return stages


def _runtime_instructions(dockerfile: str) -> list[str]:
    """The final stage's instructions with those of the stages it is built FROM (its run-time image)."""
    stages = _stages(dockerfile)
    stage = stages["final"]
    instructions = list(stage)
    while (parent := stages.get(stage[0].split()[1])) is not None and parent is not stage:
        instructions = parent + instructions
        stage = parent
    return instructions


def test_server_runtime_has_the_c_compiler_and_python_headers_triton_compiles_with():
    installs = " ".join(i for i in _runtime_instructions("Dockerfile.server") if "apt-get install" in i)
    packages = set(re.findall(r"[\w.+-]+", installs))
    assert {"gcc", "libc6-dev"} <= packages or "build-essential" in packages, installs
    assert "python3-dev" in packages, installs


@pytest.mark.parametrize("dockerfile", ["Dockerfile.server", "Dockerfile.gateway"])
def test_every_copy_source_exists_in_the_repository(dockerfile):
    copies = [i.split() for s in _stages(dockerfile).values() for i in s if i.upper().startswith("COPY ")]
    sources = [c[1:-1] for c in copies if not any(w.startswith("--from") for w in c)]
    assert sources, dockerfile
    for source in (s for group in sources for s in group):
        assert (REPO / source).exists(), f"{dockerfile} copies {source}, which is not in the repository"
        if (REPO / source).is_dir():
            assert (REPO / source / "pyproject.toml").exists(), f"{source} is no distribution"


def test_gateway_image_installs_no_torch():
    lines = [line for line in (DEPLOY / "Dockerfile.gateway").read_text().splitlines() if not line.startswith("#")]
    text = "\n".join(lines)
    assert "./gateway" in text and "./server" not in text and "torch" not in text


def _dependencies(folder: str) -> list[str]:
    with open(REPO / folder / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def test_gateway_and_client_distributions_never_need_the_server():
    for folder in ("gateway", "client"):
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


def test_compose_gpu_profile_reserves_gpus_shared_memory_and_a_model_cache():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    gpu = compose["services"]["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert flag_value([str(a) for a in gpu["command"]], "--tensor-parallel-size") == str(device["count"])
    assert gpu["shm_size"]
    (cache,) = gpu["volumes"]
    assert cache.split(":")[0] in compose["volumes"] and cache.split(":")[1] == "/home/weir/.cache/huggingface"
    default_services = [name for name, s in compose["services"].items() if "profiles" not in s]
    assert "server-gpu" not in default_services and "gateway-gpu" not in default_services


def test_prometheus_scrapes_the_gateway_and_every_compose_server():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert "gateway:8000" in targets
    assert {"weir-server-1:9400", "weir-server-2:9400"} <= targets


def _k8s_documents() -> list[dict]:
    return [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def test_kubernetes_manifests_are_valid():
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    result = _run(_tool("kubernetes-validate"), "--strict", "-k", OLDEST_KUBERNETES, *manifests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_monitors_match_the_prometheus_operator_crd():
    monitors = by_kind(_k8s_documents())["ServiceMonitor"]
    for monitor in monitors:
        validate_service_monitor(monitor)
    ports = {e["port"] for m in monitors for e in m["spec"]["endpoints"]}
    assert ports == {"metrics", "http"}


def test_gpu_server_requests_one_gpu_per_tensor_parallel_rank_and_shared_memory():
    kinds = by_kind(yaml.safe_load_all((DEPLOY / "k8s" / "server-gpu.yaml").read_text()))
    (deployment,) = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container_args(deployment)
    assert flag_value(args, "--device") == "cuda"
    assert int(flag_value(args, "--tensor-parallel-size")) == container["resources"]["limits"]["nvidia.com/gpu"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    (claim,) = kinds["PersistentVolumeClaim"]
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe
    (budget,) = kinds["PodDisruptionBudget"]
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


def test_every_deployment_has_a_disruption_budget_selecting_it():
    kinds = by_kind(_k8s_documents())
    selectors = [b["spec"]["selector"] for b in kinds["PodDisruptionBudget"]]
    for deployment in kinds["Deployment"]:
        assert deployment["spec"]["selector"] in selectors, deployment["metadata"]["name"]


def test_kubernetes_has_a_headless_service_grpc_readiness_and_an_autoscaler_on_waiting_requests():
    kinds = by_kind(_k8s_documents())
    assert any(s["spec"].get("clusterIP") == "None" for s in kinds["Service"])
    server = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "weir-server")
    probe = server["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["grpc"] == {"port": 50051, "service": "weir.v1.InferenceService"}
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "weir_requests_waiting"
