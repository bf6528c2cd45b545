"""Validating Kubernetes manifests offline: built-in kinds against kubernetes-validate's schemas (strict, at the
oldest Kubernetes we support), ServiceMonitors and InferencePools against schemas derived from their CRDs (Prometheus
Operator, Gateway API Inference Extension) kept beside the tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate

OLDEST_KUBERNETES = "1.30.0"
SERVICE_MONITOR_SCHEMA = json.loads(
    (Path(__file__).parent / "schemas" / "servicemonitor-monitoring.coreos.com-v1.json").read_text()
)
# Derived from the Gateway API Inference Extension's CRD; the source commit is in the file's $comment.
INFERENCE_POOL_SCHEMA = json.loads(
    (Path(__file__).parent / "schemas" / "inferencepool-inference.networking.k8s.io-v1.json").read_text()
)


def validate_service_monitor(document: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError where the CRD (with strict field validation) would refuse it."""
    jsonschema.validate(document, SERVICE_MONITOR_SCHEMA)


def validate_inference_pool(document: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError where the InferencePool CRD (strict field validation) would refuse it."""
    jsonschema.validate(document, INFERENCE_POOL_SCHEMA)


def validate_manifests(documents: Iterable[dict[str, Any]]) -> None:
    """Validate each document by its kind: a ServiceMonitor by its CRD, everything else by Kubernetes' own API."""
    for document in documents:
        if document.get("kind") == "ServiceMonitor":
            validate_service_monitor(document)
        elif document.get("kind") == "InferencePool":
            validate_inference_pool(document)
        else:
            kubernetes_validate.validate(document, OLDEST_KUBERNETES, strict=True)


def by_kind(documents: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The documents grouped by kind."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for document in documents:
        grouped.setdefault(document["kind"], []).append(document)
    return grouped


def container_args(deployment: dict[str, Any]) -> list[str]:
    """The first container's args, as strings."""
    return [str(a) for a in deployment["spec"]["template"]["spec"]["containers"][0].get("args", [])]


def flag_value(args: list[str], flag: str) -> str | None:
    """The value following `flag` in an argument list, or None where the flag is absent."""
    return args[args.index(flag) + 1] if flag in args else None
