"""The request tables hold both ways, lenient and strict: schemathesis bodies that /openapi.json calls valid never
get a 5xx, and bodies it calls invalid are refused (over the fake backend; tests/reliability fuzzes a real one)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from gateway_support import RunningGateway
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, status_code_conformance

from weir_gateway.config import GatewayConfig

CHECKS = [not_a_server_error, status_code_conformance, negative_data_rejection]
BODIES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize")


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_bodies_follow_the_served_description(
    make_gateway: Callable[..., RunningGateway], fake, strict: bool, mode: GenerationMode
) -> None:
    gateway = make_gateway(GatewayConfig(backends=(fake.address,), max_n=2, max_tokens=4, strict=strict))
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if op.method.upper() == "POST" and op.path in BODIES]
    assert len(operations) == len(BODIES)
    for operation in operations:

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:  # noqa: ANN001 - a schemathesis Case
            case.validate_response(case.call(timeout=30), checks=CHECKS)

        check()
