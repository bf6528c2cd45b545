"""The Helm chart (deploy/helm/weir) lints clean and renders valid manifests for the value sets people deploy:
defaults (CPU), GPUs with tensor parallelism, autoscaling, and API keys from a Secret they manage or one the chart
makes. It runs with a `helm` binary on PATH (`helm lint --strict`, `helm template`), else with helm-python-sdk
(Helm's own Go SDK as a library: the same lint and render code, no binary); neither present, it skips."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_support import OLDEST_KUBERNETES, by_kind, container_args, flag_value, validate_manifests

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "weir"
HELM = shutil.which("helm")
HAS_SDK = importlib.util.find_spec("helm_python") is not None

pytestmark = pytest.mark.skipif(
    HELM is None and not HAS_SDK,
    reason="needs helm on PATH (go install helm.sh/helm/v4/cmd/helm@v4.3.2) or the dev dependency helm-python-sdk",
)

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu": {"gpu": {"enabled": True, "count": 2}, "model": {"name": "Qwen/Qwen3-8B", "cache": {"enabled": True}}},
    "autoscaling": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}},
    "existing-secret": {"apiKeys": {"existingSecret": "weir-keys"}},
    "created-secret": {"apiKeys": {"create": True, "gatewayKey": "gw-key", "serverKey": "srv-key"}},
    "observability": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                      "otel": {"endpoint": "http://otel-collector:4317"}},
}  # fmt: skip


class HelmError(Exception):
    """helm refused the chart or the values; the message is its own."""


def _lint(values: dict[str, Any], tmp_path: Path) -> list[str]:
    """Findings of `helm lint --strict` (warnings and errors; infos such as 'icon is recommended' left out)."""
    if HELM:
        result = _helm("lint", "--strict", "--kube-version", OLDEST_KUBERNETES, str(CHART), values=values, tmp=tmp_path)
        return [] if result.returncode == 0 else [result.stdout + result.stderr]
    import helm_python

    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{OLDEST_KUBERNETES}")
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]


def _template(values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    """`helm template demo` in namespace ml, as parsed documents."""
    if HELM:
        args = ("template", "demo", str(CHART), "--namespace", "ml", "--kube-version", OLDEST_KUBERNETES)
        result = _helm(*args, values=values, tmp=tmp_path)
        if result.returncode != 0:
            raise HelmError(result.stderr)
        texts = [result.stdout]
    else:
        import helm_python

        with helm_python.Chart.load(CHART) as chart:
            try:
                rendered = chart.render(values, name="demo", namespace="ml")
            except helm_python.HelmError as e:
                raise HelmError(str(e)) from e
        texts = [text for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")]
    return [d for text in texts for d in yaml.safe_load_all(text) if d]


def _helm(*args: str, values: dict[str, Any], tmp: Path) -> subprocess.CompletedProcess[str]:
    values_file = tmp / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    return subprocess.run([HELM, *args, "--values", str(values_file)], capture_output=True, text=True, timeout=120)


def _one(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (document,) = [d for d in by_kind(documents).get(kind, []) if d["metadata"]["name"] == name]
    return document


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_clean(values, tmp_path):
    assert _lint(values, tmp_path) == []


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_manifests_are_valid_kubernetes(values, tmp_path):
    documents = _template(values, tmp_path)
    validate_manifests(documents)
    assert {"Deployment", "Service"} <= set(by_kind(documents))


def test_defaults_run_cpu_servers_behind_a_gateway_on_their_headless_service(tmp_path):
    documents = _template({}, tmp_path)
    server = _one(documents, "Deployment", "demo-weir-server")
    assert server["spec"]["template"]["spec"]["containers"][0]["image"] == "weir-server:cpu"
    assert "nvidia.com/gpu" not in str(server)
    headless = _one(documents, "Service", "demo-weir-server-headless")
    assert headless["spec"]["clusterIP"] == "None"
    backend = flag_value(container_args(_one(documents, "Deployment", "demo-weir-gateway")), "--backend")
    assert backend == "dns:///demo-weir-server-headless.ml.svc.cluster.local:50051"
    assert {"PodDisruptionBudget"} <= set(by_kind(documents))
    assert not {"Secret", "HorizontalPodAutoscaler", "ServiceMonitor"} & set(by_kind(documents))


def test_gpu_values_request_gpus_shared_memory_and_tensor_parallelism(tmp_path):
    documents = _template(VALUE_SETS["gpu"], tmp_path)
    server = _one(documents, "Deployment", "demo-weir-server")
    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container_args(server)
    assert container["image"] == "weir-server:cuda"
    assert flag_value(args, "--device") == "cuda" and flag_value(args, "--model") == "Qwen/Qwen3-8B"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2 == int(flag_value(args, "--tensor-parallel-size"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    claim = _one(documents, "PersistentVolumeClaim", "demo-weir-model-cache")
    assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_autoscaling_hands_the_server_replicas_to_an_hpa_on_waiting_requests(tmp_path):
    documents = _template(VALUE_SETS["autoscaling"], tmp_path)
    assert "replicas" not in _one(documents, "Deployment", "demo-weir-server")["spec"]
    hpa = _one(documents, "HorizontalPodAutoscaler", "demo-weir-server")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "demo-weir-server"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "weir_requests_waiting"


def test_an_existing_secret_keys_the_gateway_and_the_servers_and_none_is_created(tmp_path):
    documents = _template(VALUE_SETS["existing-secret"], tmp_path)
    assert "Secret" not in by_kind(documents)
    server, gateway = (_one(documents, "Deployment", f"demo-weir-{c}") for c in ("server", "gateway"))
    assert flag_value(container_args(server), "--api-key-file") == "/etc/weir/api-keys/server-api-key"
    assert flag_value(container_args(gateway), "--api-key-file") == "/etc/weir/api-keys/gateway-api-key"
    for deployment in (server, gateway):
        (keys,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys"]
        assert keys["secret"]["secretName"] == "weir-keys"
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WEIR_BACKEND_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "weir-keys", "key": "server-api-key"}


def test_a_created_secret_holds_both_keys_and_refuses_a_missing_one(tmp_path):
    documents = _template(VALUE_SETS["created-secret"], tmp_path)
    secret = _one(documents, "Secret", "demo-weir-api-keys")
    assert set(secret["data"]) == {"gateway-api-key", "server-api-key"}
    with pytest.raises(HelmError, match="apiKeys.create needs apiKeys.serverKey"):
        _template({"apiKeys": {"create": True, "gatewayKey": "gw-key"}}, tmp_path)


def test_service_monitors_scrape_the_server_metrics_port_and_the_gateway(tmp_path):
    documents = _template(VALUE_SETS["observability"], tmp_path)
    monitors = {m["metadata"]["name"]: m for m in by_kind(documents)["ServiceMonitor"]}
    assert monitors["demo-weir-server"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitors["demo-weir-gateway"]["spec"]["endpoints"][0]["port"] == "http"
    assert all(m["metadata"]["labels"]["release"] == "prometheus" for m in monitors.values())
    selector = monitors["demo-weir-server"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= _one(documents, "Service", "demo-weir-server")["metadata"]["labels"].items()


@pytest.mark.parametrize(
    ("values", "path"), [({"gpus": 2}, "gpus"), ({"gpu": {"enabled": True, "count": 0}}, "/gpu/count")]
)
def test_values_schema_names_a_misspelt_or_out_of_range_value(values, path, tmp_path):
    findings = _lint(values, tmp_path)
    assert findings and path in " ".join(findings)
    with pytest.raises(HelmError, match=path):
        _template(values, tmp_path)
