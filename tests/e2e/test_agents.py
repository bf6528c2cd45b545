"""Agent clients against the real gateway and server: the OpenAI SDK's tool loop, LangChain's bind_tools loop and
the OpenAI Agents SDK's Runner, with the packaged SmolLM2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from weir.v1 import inference_pb2 as pb
from weir.v1.inference_pb2_grpc import InferenceServiceStub

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_SCHEMA},
    }
]


@pytest.fixture(scope="module")
def client(gateway_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway_url, api_key="unused", timeout=300, max_retries=0) as sdk:
        yield sdk


def test_openai_sdk_tool_loop(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=48,
        temperature=0,
    )
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER_SCHEMA)
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature_c": 21}'})
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=48, temperature=0)
    final = answer.choices[0]
    assert final.finish_reason in ("stop", "length", "tool_calls")
    assert final.message.content or final.message.tool_calls
    for call in final.message.tool_calls or []:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)


def test_openai_sdk_streams_with_tools_in_auto_mode(client: openai.OpenAI) -> None:
    arguments: dict[int, str] = {}
    names: dict[int, str] = {}
    finish = None
    text = ""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me the weather in Rome, please."}],
        tools=TOOLS,
        max_tokens=48,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names[call.index] = call.function.name
                arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
            finish = choice.finish_reason or finish
    assert finish in ("stop", "length", "tool_calls")
    assert text or names
    for index, name in names.items():
        assert name == "get_weather"
        jsonschema.validate(json.loads(arguments[index]), WEATHER_SCHEMA)


def test_openai_sdk_required_streaming_call_accumulates(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Lima?"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,  # the 135M model would otherwise repeat the call until max_tokens
        max_tokens=48,
        temperature=0,
    ) as stream:
        for _ in stream:
            pass
        completion = stream.get_final_completion()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls or []:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    assert choice.message.tool_calls


def test_logit_bias_bans_the_greedy_first_token(client: openai.OpenAI, weir_stub: InferenceServiceStub) -> None:
    question = "Name a primary colour."
    request = pb.GenerateRequest(sampling_params=pb.SamplingParams(max_tokens=1, temperature=0))
    request.messages.messages.add(role="user", content=question)
    first = list(weir_stub.Generate(request, timeout=120))[0].token_ids[0]
    messages: list[Any] = [{"role": "user", "content": question}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    banned = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    assert plain.choices[0].message.content != banned.choices[0].message.content


def test_langchain_bind_tools_two_turn_loop(gateway_url: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"It is sunny in {city}."

    llm = ChatOpenAI(model=MODEL, base_url=gateway_url, api_key="unused", temperature=0, max_tokens=48, max_retries=0)
    messages: list[Any] = [HumanMessage("What is the weather in Paris?")]
    reply = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    assert isinstance(reply.tool_calls[0]["args"].get("city"), str)
    messages.append(reply)
    for call in reply.tool_calls:
        messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    answer = llm.bind_tools([get_weather]).invoke(messages)
    assert answer.content or answer.tool_calls


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_openai_agents_runner_with_a_function_tool(gateway_url: str, api: str) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    called: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        called.append(city)
        return f"It is sunny in {city}."

    sdk = openai.AsyncOpenAI(base_url=gateway_url, api_key="unused", max_retries=0)
    model_class = OpenAIChatCompletionsModel if api == "chat_completions" else OpenAIResponsesModel
    agent = Agent(
        name="weather",
        instructions="Answer questions about the weather using the tool.",
        tools=[get_weather],
        model=model_class(model=MODEL, openai_client=sdk),
        model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=48),
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=6)
    assert called  # the tool ran
    assert isinstance(result.final_output, str)
