"""The generated stubs import and describe the weir.v1 contract, and the contract ships beside them."""

from importlib import resources

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
        "LoadAdapter",
        "UnloadAdapter",
        "ListAdapters",
    }
    assert hasattr(inference_pb2_grpc, "InferenceServiceStub")


def test_generate_request_input_is_a_oneof() -> None:
    oneof = inference_pb2.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"]
    assert {f.name for f in oneof.fields} == {"prompt", "token_ids", "messages"}


def test_stubs_are_generated_from_the_proto_at_its_import_path() -> None:
    # buf breaking compares files by path: the stubs, the package and the released descriptor sets all say this one.
    assert inference_pb2.DESCRIPTOR.name == "weir/v1/inference.proto"
    assert inference_pb2.DESCRIPTOR.package == "weir.v1"


def test_the_proto_source_ships_with_the_stubs() -> None:
    source = (resources.files("weir.v1") / "inference.proto").read_text()
    assert "package weir.v1;" in source and "service InferenceService" in source
    assert (resources.files("weir.v1") / "inference_pb2.pyi").is_file()


def test_lora_adapters_are_named_on_generate_and_listed_with_their_parent() -> None:
    assert inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["adapter"].number == 11
    assert {"parent", "root"} <= set(inference_pb2.ModelInfo.DESCRIPTOR.fields_by_name)
