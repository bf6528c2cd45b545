"""Property-based fuzzing: request validation and the sampler never fail with anything but InvalidRequestError,
hostile GenerateRequests never get INTERNAL/UNKNOWN from the real server, and the gateway honours the OpenAPI
description it serves (schemathesis)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import schemathesis
import torch
from conftest import InProcessServer, Launcher, Tally
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from weir.v1 import inference_pb2 as pb
from weir.v1 import inference_pb2_grpc
from weir_server.engine.sampler import Sampler
from weir_server.engine.sequence import Sequence
from weir_server.engine.types import MAX_LOGPROBS, SamplingParams
from weir_server.errors import InvalidRequestError

VOCAB = 64
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, 1.0, 2.0, -0.0, 1e-9])
ANY_INT = st.integers(-(2**40), 2**40) | st.integers(-3, 40)


def sampling_params(floats: st.SearchStrategy[float], ints: st.SearchStrategy[int]) -> st.SearchStrategy:
    optional_int = st.none() | ints
    return st.builds(
        SamplingParams,
        max_tokens=ints,
        min_tokens=ints,
        temperature=floats,
        top_p=floats,
        top_k=ints,
        min_p=floats,
        repetition_penalty=floats,
        presence_penalty=floats,
        frequency_penalty=floats,
        seed=optional_int,
        stop=st.lists(st.text(max_size=4), max_size=20).map(tuple),
        stop_token_ids=st.lists(ints, max_size=4).map(tuple),
        ignore_eos=st.booleans(),
        logprobs=optional_int,
        prompt_logprobs=optional_int,
        n=ints,
    )


@settings(max_examples=400, deadline=None)
@given(params=sampling_params(ANY_FLOAT, ANY_INT))
def test_validate_accepts_only_in_range_params_and_names_the_field_otherwise(params: SamplingParams) -> None:
    try:
        params.validate(VOCAB)
    except InvalidRequestError as e:
        assert e.field.startswith("sampling_params.") and e.description
        return
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert math.isfinite(getattr(params, name))
    assert 1 <= params.max_tokens and 0 <= params.min_tokens <= params.max_tokens
    assert 0 <= params.temperature <= 2 and 0 < params.top_p <= 1 and 0 <= params.min_p <= 1
    assert 1 <= params.n <= 16 and params.top_k >= 0
    assert all(0 <= t < VOCAB for t in params.stop_token_ids)
    assert params.logprobs is None or 0 <= params.logprobs <= MAX_LOGPROBS


VALID_FLOAT = st.floats(0.0, 2.0, width=32)
valid_params = sampling_params(VALID_FLOAT, st.integers(0, 8)).filter(lambda p: _is_valid(p))


def _is_valid(params: SamplingParams) -> bool:
    try:
        params.validate(VOCAB)
    except InvalidRequestError:
        return False
    return True


@st.composite
def logit_rows(draw: st.DrawFn) -> torch.Tensor:
    """A vocabulary row with extreme values and masked (-inf) entries, at least one finite."""
    values = draw(
        st.lists(
            st.floats(-1e4, 1e4, width=32) | st.sampled_from([float("-inf"), -1e30, 1e30, 0.0]),
            min_size=VOCAB,
            max_size=VOCAB,
        )
    )
    row = torch.tensor(values, dtype=torch.float32)
    if not torch.isfinite(row).any():
        row[draw(st.integers(0, VOCAB - 1))] = 0.0
    return row


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(
    batch=st.lists(
        st.tuples(valid_params, logit_rows(), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)),
        min_size=1,
        max_size=4,
    )
)
def test_sampler_picks_an_allowed_token_for_any_valid_params_and_logits(batch: list) -> None:
    seqs = []
    for i, (params, _, prompt) in enumerate(batch):
        seq = Sequence(f"r{i}", 0, prompt, params)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        seqs.append(seq)
    logits = torch.stack([row for _, row, _ in batch])
    out = Sampler()(logits.clone(), seqs, eos_token_ids=(1,))
    assert len(out.token_ids) == len(batch)
    for (params, row, _), token, entry in zip(batch, out.token_ids, out.logprobs, strict=True):
        assert 0 <= token < VOCAB
        assert math.isfinite(row[token].item()), "sampled a masked (-inf) token"
        if params.logprobs is not None:
            assert entry is not None and entry.token_id == token and len(entry.top) == params.logprobs


# ---- protobuf fuzz against the real server --------------------------------------------------------------------

UINT32 = st.integers(0, 2**32 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
SMALL_UINT = st.integers(0, 40) | UINT32
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True) | st.floats(0, 1, width=32)
TEXT = st.text(max_size=40) | st.sampled_from(["", "\x00", "\ud7ff" * 3, "{{ 7*7 }}", "<|im_start|>", "a" * 5000])


def _often(draw: st.DrawFn, percent: int) -> bool:
    return draw(st.integers(0, 99)) < percent


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Mostly well-formed requests with hostile values here and there, so every layer gets its share."""
    params = pb.SamplingParams()
    for name, strategy in {
        "max_tokens": SMALL_UINT, "min_tokens": SMALL_UINT, "temperature": FLOAT32, "top_p": FLOAT32,
        "top_k": INT32, "min_p": FLOAT32, "repetition_penalty": FLOAT32, "presence_penalty": FLOAT32,
        "frequency_penalty": FLOAT32, "seed": st.integers(-(2**63), 2**63 - 1), "logprobs": SMALL_UINT,
        "prompt_logprobs": SMALL_UINT, "n": SMALL_UINT, "skip_special_tokens": st.booleans(),
        "ignore_eos": st.booleans(), "include_stop_str_in_output": st.booleans(),
    }.items():  # fmt: skip
        if _often(draw, 12):
            setattr(params, name, draw(strategy))
    if _often(draw, 12):
        params.stop.extend(draw(st.lists(TEXT, max_size=20)))
    if _often(draw, 12):
        params.stop_token_ids.extend(draw(st.lists(INT32, max_size=5)))
    request = pb.GenerateRequest(sampling_params=params)
    if _often(draw, 15):
        request.model = draw(st.sampled_from(["smollm2-135m-instruct", "all-minilm-l6-v2"]) | TEXT)
    if _often(draw, 20):
        request.request_id = draw(TEXT)
    kind = draw(st.integers(0, 99))
    if kind < 50:
        request.prompt = draw(TEXT) if _often(draw, 30) else draw(st.text(min_size=1, max_size=60))
    elif kind < 70:
        ids = st.integers(0, 49151) if _often(draw, 70) else INT32
        request.token_ids.ids.extend(draw(st.lists(ids, max_size=8)))
    elif kind < 92:
        roles = st.sampled_from(["user", "system", "assistant"]) if _often(draw, 80) else TEXT
        for _ in range(draw(st.integers(0, 3))):
            request.messages.messages.add(role=draw(roles), content=draw(TEXT))
        if _often(draw, 30):
            request.messages.add_generation_prompt = draw(st.booleans())
    if _often(draw, 12):
        constraint = draw(st.sampled_from(["json_schema", "json_object", "regex", "choice", "grammar"]))
        if constraint == "json_object":
            request.json_object = draw(st.booleans())
        elif constraint == "choice":
            request.choice.values.extend(draw(st.lists(TEXT, max_size=3)))
        else:
            setattr(request, constraint, draw(TEXT | st.sampled_from(['{"type": "object"}', "[a-z]+", "(", "{"])))
    return request


BAD_FOR_BAD_INPUT = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture(scope="module")
def fuzz_stub(small_server: InProcessServer) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(small_server.target) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def test_hostile_generate_requests_get_a_clear_status_never_internal(
    small_server: InProcessServer, fuzz_stub: inference_pb2_grpc.InferenceServiceStub
) -> None:
    tally = Tally("protobuf-fuzz")
    seen: dict[str, int] = {}

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=generate_requests())
    def check(request: pb.GenerateRequest) -> None:
        tally.sent += 1
        call = fuzz_stub.Generate(request, timeout=60)
        try:
            next(iter(call), None)  # the first message (or the error) is all that matters
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        finally:
            call.cancel()
        seen[code.name] = seen.get(code.name, 0) + 1
        if code == grpc.StatusCode.OK:  # let the engine drop the cancelled request before the next one
            small_server.wait_engine_idle(timeout=5)
        assert code not in BAD_FOR_BAD_INPUT, (code, call.details(), request)

    check()
    tally.answered = seen.get("OK", 0)
    tally.refused = tally.sent - tally.answered
    tally.other = seen
    tally.report()
    assert tally.answered > 10  # the fuzz reaches the engine, not just the validators
    stats = small_server.wait_engine_idle(timeout=30)
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_malformed_protobuf_bytes_do_not_hurt_the_server(small_server: InProcessServer) -> None:
    with grpc.insecure_channel(small_server.target) as channel:
        raw = channel.unary_stream("/weir.v1.InferenceService/Generate")  # bytes in, bytes out
        for junk in (b"\xff\xff\xff", b"\x1a\xff\xff\xff\xff\x0f", b"\x08" * 3, bytes(range(256))):
            with pytest.raises(grpc.RpcError) as refused:
                list(raw(junk, timeout=10))
            assert refused.value.code() not in {grpc.StatusCode.UNAVAILABLE}
        with pytest.raises(grpc.RpcError):
            list(raw(b"", timeout=10))  # an empty request is a valid message with no input
    with grpc.insecure_channel(small_server.target) as channel:
        assert inference_pb2_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models


# ---- the gateway's OpenAPI description, fuzzed with schemathesis ----------------------------------------------


@pytest.fixture(scope="module")
def openapi_gateway(small_server: InProcessServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    launcher = Launcher(Path(tmp_path_factory.mktemp("openapi")))
    try:
        gateway = launcher.gateway(
            [small_server.target], "--max-tokens", "4", "--max-n", "2", "--request-timeout", "60"
        )
        yield gateway.url
    finally:
        launcher.close()


OPENAPI_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
                  response_schema_conformance, negative_data_rejection]  # fmt: skip


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_gateway_honours_the_openapi_description_it_serves(openapi_gateway: str, mode: GenerationMode) -> None:
    """Schemathesis cases for every operation: never a 5xx, statuses, content types and bodies as described,
    and bodies the description calls invalid are refused."""
    tally = Tally(f"openapi-{mode.value}")
    schema = schemathesis.openapi.from_url(f"{openapi_gateway}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # .ok() raises on an invalid operation
    assert len(operations) >= 9
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to get wrong in a GET without parameters

        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:  # noqa: ANN001 - a schemathesis Case
            tally.sent += 1
            response = case.call(timeout=60)
            tally.note(str(response.status_code))
            case.validate_response(response, checks=OPENAPI_CHECKS)

        check()
    tally.answered = sum(n for status, n in tally.other.items() if status.startswith("2"))
    tally.refused = sum(n for status, n in tally.other.items() if status.startswith("4"))
    tally.failed = sum(n for status, n in tally.other.items() if status.startswith("5"))
    tally.report()
    assert tally.failed == 0


def test_openapi_description_covers_every_route() -> None:
    from weir_gateway.app import ROUTES
    from weir_gateway.config import GatewayConfig
    from weir_gateway.openapi import build_openapi

    paths = build_openapi(GatewayConfig()).get("paths", {})
    for route in ROUTES:
        path = route.path.replace(":.+}", "}")  # aiohttp's regex suffix is not part of the OpenAPI path
        assert route.method.lower() in paths.get(path, {}), f"{route.method} {route.path} is not described"
