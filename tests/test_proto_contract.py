"""The generated stubs import and describe the weir.v1 contract."""

from weir.v1 import inference_pb2, inference_pb2_grpc


def test_inference_service_has_every_rpc() -> None:
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert {m.name for m in service.methods} == {
        "Generate",
        "Embed",
        "EmbedStream",
        "Tokenize",
        "Detokenize",
        "TokenizeStream",
        "ListModels",
    }
    assert hasattr(inference_pb2_grpc, "InferenceServiceStub")


def test_generate_request_input_is_a_oneof() -> None:
    oneof = inference_pb2.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"]
    assert {f.name for f in oneof.fields} == {"prompt", "token_ids", "messages"}
