"""The core pipe's messages: outputs survive their tuple packing, and every message survives pickling."""

from __future__ import annotations

import pickle

import pytest

from weir_server.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from weir_server.engine.stats import EngineStats
from weir_server.engine.types import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    RequestTiming,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from weir_server.engine.wire import (
    AbortRequest,
    AddRequest,
    CoreFailed,
    CoreInfo,
    CoreOutputs,
    CoreReady,
    StopCore,
    decode_kv_events,
    decode_outputs,
    encode_kv_events,
    encode_outputs,
)

STATS = EngineStats(1, 2, 3, 4, 16, 5, 6, 7, 8, 9)


def _outputs() -> list[GenerationOutput]:
    logprob = TokenLogprob(7, -0.5, (TopLogprob(7, -0.5), TopLogprob(9, -1.25)))
    return [
        GenerationOutput("a", 0, "hello", [7, 8]),
        GenerationOutput("a", 1, "", [9], logprobs=[logprob], prompt_logprobs=[TokenLogprob(3, None)]),
        GenerationOutput(
            "b",
            0,
            " end",
            [2],
            finish_reason=FinishReason.STOP_SEQUENCE,
            stop_reason=" end",
            usage=Usage(5, 3, 4),
            timing=RequestTiming(1.0, 1.5, 2.0, 3.0),
        ),
        GenerationOutput("c", 0, "", [], finish_reason=FinishReason.ERROR, error="RuntimeError: boom"),
    ]


def test_outputs_round_trip_through_their_packing_and_the_pipe():
    outputs = _outputs()
    message = pickle.loads(pickle.dumps(CoreOutputs(encode_outputs(outputs), STATS)))
    assert isinstance(message, CoreOutputs) and message.stats == STATS
    assert decode_outputs(message.packed) == outputs


def test_outputs_are_packed_as_plain_tuples():
    assert all(type(packed) is tuple for packed in encode_outputs(_outputs()))


def test_kv_events_round_trip_through_their_packing_and_the_pipe():
    events = [BlockStored((11, 12), None, 32), BlockStored((13,), 12, 16), BlockRemoved((11,)), AllBlocksCleared()]
    message = pickle.loads(pickle.dumps(CoreOutputs([], STATS, encode_kv_events(events))))
    assert decode_kv_events(message.kv_events) == events


def test_kv_events_are_packed_as_plain_tuples():
    packed = encode_kv_events([BlockStored((1,), None, 16), BlockRemoved((1,)), AllBlocksCleared()])
    assert all(type(fields) is tuple for fields in packed)


@pytest.mark.parametrize(
    "message",
    [
        AddRequest(GenerationRequest("r", [1, 2, 3], SamplingParams(max_tokens=4, stop=("x",)))),
        AbortRequest("r"),
        StopCore(),
        CoreReady(CoreInfo(256, STATS)),
        CoreFailed("ModelLoadError: no such model"),
    ],
)
def test_every_message_survives_pickling(message):
    assert pickle.loads(pickle.dumps(message)) == message
