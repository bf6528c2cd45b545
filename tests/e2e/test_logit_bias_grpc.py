"""logit_bias over gRPC with SmolLM2-135M-Instruct: -100 bans a token, +100 forces one, bad entries are
INVALID_ARGUMENT naming `sampling_params.logit_bias`."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from weir.v1 import inference_pb2 as pb
from weir.v1.inference_pb2_grpc import InferenceServiceStub

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def _greedy_tokens(stub: InferenceServiceStub, max_tokens: int = 1, **params: Any) -> list[int]:
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **params)
    messages = list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling_params=sampling), timeout=120))
    return [t for m in messages for t in m.token_ids]


def _bad_field(stub: InferenceServiceStub, logit_bias: dict[int, float]) -> tuple[str | None, str]:
    """The field the BadRequest details name, and the message, of a request that must be INVALID_ARGUMENT."""
    request = pb.GenerateRequest(prompt=PROMPT, sampling_params=pb.SamplingParams(logit_bias=logit_bias))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=60))
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return bad_request.field_violations[0].field, error.details()  # type: ignore[attr-defined]
    return None, error.details()  # type: ignore[attr-defined]


def test_minus_100_on_the_greedy_first_token_gives_another(weir_stub: InferenceServiceStub) -> None:
    [first] = _greedy_tokens(weir_stub)
    [again] = _greedy_tokens(weir_stub)
    assert again == first  # greedy is repeatable, so the change below is the bias's
    banned = _greedy_tokens(weir_stub, max_tokens=4, logit_bias={first: -100})
    assert banned[0] != first and first not in banned


def test_plus_100_forces_a_token(weir_stub: InferenceServiceStub) -> None:
    [first] = _greedy_tokens(weir_stub)
    forced = first + 1
    assert _greedy_tokens(weir_stub, max_tokens=3, logit_bias={forced: 100}) == [forced] * 3


def test_token_id_outside_the_vocabulary_is_invalid_argument(weir_stub: InferenceServiceStub) -> None:
    field, message = _bad_field(weir_stub, {10_000_000: 1.0})
    assert field == "sampling_params.logit_bias"
    assert "10000000" in message


def test_bias_above_100_is_invalid_argument(weir_stub: InferenceServiceStub) -> None:
    field, message = _bad_field(weir_stub, {5: 150.0})
    assert field == "sampling_params.logit_bias"
    assert "token id 5" in message
