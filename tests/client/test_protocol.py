"""The client without a server: request building, local validation, error parsing, retries, no torch."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_client import WeirClient, WeirClientError
from weir_client import _protocol as proto


def test_generate_request_sets_only_given_sampling_fields() -> None:
    request = proto.generate_request("Hi", None, None, "m", "r1", True, {"max_tokens": 5, "stop": "\n", "seed": 3})
    assert request.prompt == "Hi" and request.model == "m" and request.request_id == "r1"
    params = request.sampling_params
    assert params.max_tokens == 5 and list(params.stop) == ["\n"] and params.seed == 3
    assert not params.HasField("temperature")


def test_generate_request_from_messages() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    request = proto.generate_request(None, messages, None, "", "", False, {})
    assert [(m.role, m.content) for m in request.messages.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert request.messages.add_generation_prompt is False


@pytest.mark.parametrize("inputs", [{}, {"prompt": "a", "token_ids": [1]}])
def test_generate_request_needs_exactly_one_input(inputs: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="exactly one"):
        proto.generate_request(inputs.get("prompt"), None, inputs.get("token_ids"), "", "", True, {})


def test_unknown_sampling_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="temprature"):
        proto.sampling_params({"temprature": 1.0})  # type: ignore[typeddict-unknown-key]


def test_value_the_proto_cannot_hold_raises_invalid_argument_naming_the_field() -> None:
    with pytest.raises(WeirClientError) as info:
        proto.sampling_params({"max_tokens": -1})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "sampling_params.max_tokens"


class _FlakyServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Fails the first call of each method with UNAVAILABLE (rich details attached), then answers."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _first_fails(self, name: str, context: grpc.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        self._first_fails("Tokenize", context)
        return pb.TokenizeResponse(model="fake", results=[pb.Tokenization(token_ids=[1, 2])])

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:
        self._first_fails("Generate", context)
        yield pb.GenerateResponse(text="ok", finish_reason=pb.FINISH_REASON_STOP)

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        detail = error_details_pb2.RetryInfo()
        detail.retry_delay.FromSeconds(3)
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="queue full")
        status.details.add().Pack(detail)
        context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("unreachable")


@pytest.fixture
def flaky() -> Any:
    servicer = _FlakyServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_idempotent_calls_are_retried_on_unavailable(flaky: Any) -> None:
    servicer, target = flaky
    with WeirClient(target, timeout=10) as client:
        assert client.tokenize("x")[0].token_ids == [1, 2]
    assert servicer.calls["Tokenize"] == 2


def test_generate_is_never_retried(flaky: Any) -> None:
    servicer, target = flaky
    with WeirClient(target, timeout=10) as client, pytest.raises(WeirClientError) as info:
        list(client.generate("x"))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls["Generate"] == 1


def test_retry_info_becomes_retry_after(flaky: Any) -> None:
    _, target = flaky
    with WeirClient(target, timeout=10) as client, pytest.raises(WeirClientError) as info:
        client.embed(["x"])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.retry_after == 3.0


def test_client_package_never_imports_torch() -> None:
    code = "import sys, weir_client, weir_client.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
