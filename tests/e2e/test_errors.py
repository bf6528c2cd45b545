"""Bad requests get the right status code and a message naming the field; the server keeps serving after each."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from weir.v1 import inference_pb2 as pb
from weir.v1.inference_pb2_grpc import InferenceServiceStub

pytestmark = pytest.mark.slow


def _error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, pb.EmbedResponse | pb.TokenizeResponse | pb.DetokenizeResponse):
            list(result)  # a stream fails when read
    return info.value


def _field(error: grpc.RpcError) -> str | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return bad_request.field_violations[0].field
    return None


@pytest.fixture(autouse=True)
def still_serving(weir_stub: InferenceServiceStub) -> Any:
    """After every bad request, a normal one succeeds."""
    yield
    request = pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(max_tokens=2, temperature=0))
    messages = list(weir_stub.Generate(request, timeout=60))
    assert messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


BAD_SAMPLING = [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 2.5}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [10_000_000]}, "stop_token_ids"),
]


@pytest.mark.parametrize(("params", "name"), BAD_SAMPLING, ids=[f"{n}={p}" for p, n in BAD_SAMPLING])
def test_sampling_parameter_out_of_range_is_invalid_argument(
    weir_stub: InferenceServiceStub, params: dict[str, Any], name: str
) -> None:
    request = pb.GenerateRequest(prompt="Hi", sampling_params=pb.SamplingParams(**params))
    error = _error(lambda: weir_stub.Generate(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert _field(error) == f"sampling_params.{name}"
    assert name in error.details()  # type: ignore[attr-defined]


BAD_GENERATE = [
    (pb.GenerateRequest(prompt=""), "prompt"),
    (pb.GenerateRequest(), "input"),
    (pb.GenerateRequest(prompt="hello " * 1100), "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "token_ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, -5])), "token_ids"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 49152])), "token_ids"),
    (pb.GenerateRequest(messages=pb.ChatMessages()), "messages"),
    (
        pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])),
        "messages[0].role",
    ),
    (pb.GenerateRequest(prompt="Hi", model="all-minilm-l6-v2"), "model"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_GENERATE, ids=[f for _, f in BAD_GENERATE])
def test_bad_generate_input_is_invalid_argument_naming_the_field(
    weir_stub: InferenceServiceStub, request_: pb.GenerateRequest, field: str
) -> None:
    error = _error(lambda: weir_stub.Generate(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert _field(error) == field
    assert field in error.details()  # type: ignore[attr-defined]


def test_unknown_model_is_not_found_and_lists_the_loaded_ones(weir_stub: InferenceServiceStub) -> None:
    error = _error(lambda: weir_stub.Generate(pb.GenerateRequest(prompt="Hi", model="gpt-17")))
    assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    message = error.details()  # type: ignore[attr-defined]
    assert "gpt-17" in message and "smollm2-135m-instruct" in message and "all-minilm-l6-v2" in message
    assert _field(error) == "model"


def test_unknown_model_on_embed_and_tokenize_is_not_found(weir_stub: InferenceServiceStub) -> None:
    for call in (
        lambda: weir_stub.Embed(pb.EmbedRequest(model="nope", texts=["x"])),
        lambda: weir_stub.Tokenize(pb.TokenizeRequest(model="nope", texts=["x"])),
        lambda: weir_stub.Detokenize(pb.DetokenizeRequest(model="nope")),
    ):
        assert _error(call).code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_invalid_output_constraint_is_invalid_argument_naming_it(weir_stub: InferenceServiceStub) -> None:
    request = pb.GenerateRequest(prompt="Hi", regex="[a-z")
    error = _error(lambda: weir_stub.Generate(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert _field(error) == "regex"


BAD_EMBED = [
    (pb.EmbedRequest(), "texts"),
    (pb.EmbedRequest(texts=["a"], token_ids=[pb.TokenIds(ids=[101])]), "token_ids"),
    (pb.EmbedRequest(texts=["word " * 600]), "texts[0]"),
    (pb.EmbedRequest(token_ids=[pb.TokenIds(ids=[101, 999_999])]), "token_ids[0]"),
    (pb.EmbedRequest(token_ids=[pb.TokenIds(ids=[])]), "token_ids[0]"),
    (pb.EmbedRequest(texts=["a"], dimensions=4096), "dimensions"),
    (pb.EmbedRequest(texts=["a"], model="smollm2-135m-instruct"), "model"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_EMBED, ids=[f for _, f in BAD_EMBED])
def test_bad_embed_request_is_invalid_argument_naming_the_field(
    weir_stub: InferenceServiceStub, request_: pb.EmbedRequest, field: str
) -> None:
    error = _error(lambda: weir_stub.Embed(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert _field(error) == field


def test_detokenize_out_of_range_ids_names_the_sequence(weir_stub: InferenceServiceStub) -> None:
    request = pb.DetokenizeRequest(sequences=[pb.TokenIds(ids=[1, 2]), pb.TokenIds(ids=[-3])])
    error = _error(lambda: weir_stub.Detokenize(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert _field(error) == "sequences[1]"


def test_tokenize_stream_error_ends_the_stream_with_the_status(weir_stub: InferenceServiceStub) -> None:
    requests = [pb.TokenizeStreamRequest(tokenize=pb.TokenizeRequest(texts=["a"])), pb.TokenizeStreamRequest()]
    responses: list[pb.TokenizeStreamResponse] = []
    with pytest.raises(grpc.RpcError) as info:
        for response in weir_stub.TokenizeStream(iter(requests)):
            responses.append(response)
    assert len(responses) == 1
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
