"""The Responses API end to end: the official openai SDK, the real gateway and a real Weir server with SmolLM2."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from gateway_fakes import BackgroundLoop
from gateway_support import RunningGateway, start_gateway

from weir_gateway.config import GatewayConfig

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": WEATHER_SCHEMA}  # fmt: skip


@pytest.fixture(scope="module")
def client(background: BackgroundLoop, weir_target: str) -> Iterator[openai.OpenAI]:
    running: RunningGateway = background.run(start_gateway(GatewayConfig(backends=(weir_target,), max_tokens=256)))
    with openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=300) as sdk:
        yield sdk
    background.run(running.runner.cleanup())


def test_text_answer(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, instructions="Answer in one sentence.", max_output_tokens=24,
                                       input="What is the capital of France?", temperature=0)  # fmt: skip
    assert response.status in ("completed", "incomplete") and response.model == MODEL
    assert response.output_text.strip()
    assert 0 < response.usage.output_tokens <= 24
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_streamed_events_accumulate_to_the_final_response(client: openai.OpenAI) -> None:
    # Compared with itself, not with a create() call: greedy output on SmolLM2 may differ by a token between a
    # prefill that hits the prefix cache and one that does not.
    with client.responses.stream(model=MODEL, input="Name three colors.", max_output_tokens=16, temperature=0) as s:
        events = list(s)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text and text == final.output_text
    assert client.responses.retrieve(final.id).output_text == text


def test_required_tool_choice_returns_a_valid_function_call(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                       tool_choice="required", max_output_tokens=48, temperature=0)  # fmt: skip
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) >= 1, response.output
    assert calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_SCHEMA)
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature_c": 21}'}
    answer = client.responses.create(model=MODEL, previous_response_id=response.id, input=[result], tools=[WEATHER],
                                     max_output_tokens=32, temperature=0)  # fmt: skip
    assert answer.status in ("completed", "incomplete") and answer.output
