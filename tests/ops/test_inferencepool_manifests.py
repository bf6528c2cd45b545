"""deploy/k8s/inferencepool.yaml: the InferencePool passes a schema derived from the Inference Extension's CRD,
the built-in kinds pass kubernetes-validate (strict), and the pool selects the pods whose sidecar gateway listens on
the port it targets."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from k8s_support import by_kind, container_args, flag_value, validate_inference_pool, validate_manifests

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "inferencepool.yaml"


@pytest.fixture(scope="module")
def kinds() -> dict[str, list[dict]]:
    return by_kind(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d)


def test_every_document_is_valid(kinds):
    validate_manifests(d for documents in kinds.values() for d in documents)


def test_pool_selects_the_deployments_pods(kinds):
    (pool,), (deployment,) = kinds["InferencePool"], kinds["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_pool_targets_the_sidecar_gateway_which_reaches_the_server_over_loopback(kinds):
    (pool,), (deployment,) = kinds["InferencePool"], kinds["Deployment"]
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    (target,) = (p["number"] for p in pool["spec"]["targetPorts"])
    assert target in {p["containerPort"] for p in containers["gateway"]["ports"]}
    grpc_port = next(p["containerPort"] for p in containers["server"]["ports"] if p["name"] == "grpc")
    gateway_args = container_args({"spec": {"template": {"spec": {"containers": [containers["gateway"]]}}}})
    assert flag_value(gateway_args, "--backend") == f"127.0.0.1:{grpc_port}"


def test_pool_names_an_endpoint_picker_service_and_port(kinds):
    (pool,) = kinds["InferencePool"]
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] and ref.get("kind", "Service") == "Service"
    assert ref["port"]["number"] == 9002


@pytest.mark.parametrize(
    "breakage",
    [
        lambda p: p["spec"].pop("targetPorts"),
        lambda p: p["spec"]["endpointPickerRef"].pop("port"),  # the CRD's rule: a Service ref needs a port
        lambda p: p["spec"]["targetPorts"].append({"number": 8000}),  # port numbers are unique
        lambda p: p["spec"].update(unknownField=1),  # strict field validation
        lambda p: p["spec"].update(appProtocol="grpc"),
    ],
)
def test_schema_refuses_what_the_crd_refuses(kinds, breakage):
    pool = copy.deepcopy(kinds["InferencePool"][0])
    breakage(pool)
    with pytest.raises(jsonschema.ValidationError):
        validate_inference_pool(pool)
