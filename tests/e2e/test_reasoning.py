"""A server run with a reasoning parser splits the reasoning from the answer, over gRPC and through the gateway."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from weir.v1 import inference_pb2 as pb
from weir.v1.inference_pb2_grpc import InferenceServiceStub

pytestmark = pytest.mark.slow

# The packaged model does not think; a regex makes it write a think block so the split can be checked exactly.
THINKING = r"<think>\nfirst [a-z]{3,6}\n</think>\n\nThe answer is [a-z]{3,6}\."


@pytest.fixture(scope="module")
def reasoning_server(start_server: Callable[[Any], Any]) -> Any:
    from weir_server.config import CacheConfig, ChatConfig, EngineConfig, ModelConfig, ServerConfig

    generate = EngineConfig(ModelConfig("smollm2-135m-instruct", max_model_len=512), CacheConfig(num_blocks=64))
    config = ServerConfig(
        host="127.0.0.1", port=0, generate=generate, embed=None, chat=ChatConfig(reasoning_parser="qwen3")
    )
    return start_server(config)


def ask(stub: InferenceServiceStub, **fields: Any) -> tuple[str, str, list[pb.GenerateResponse]]:
    request = pb.GenerateRequest(sampling_params=pb.SamplingParams(max_tokens=48, temperature=0), **fields)
    request.messages.messages.add(role="user", content="What is the colour of the sky?")
    messages = list(stub.Generate(request, timeout=120))
    return "".join(m.reasoning_text for m in messages), "".join(m.text for m in messages), messages


def test_reasoning_is_split_from_the_answer_over_grpc(reasoning_server: Any) -> None:
    with grpc.insecure_channel(reasoning_server.target) as channel:
        reasoning, answer, messages = ask(InferenceServiceStub(channel), regex=THINKING)
    assert reasoning.startswith("first ") and "<think>" not in reasoning and "</think>" not in reasoning
    assert answer.startswith("The answer is ") and "think>" not in answer
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP


def test_output_without_a_think_block_is_all_answer(reasoning_server: Any) -> None:
    with grpc.insecure_channel(reasoning_server.target) as channel:
        reasoning, answer, _ = ask(InferenceServiceStub(channel))
    assert reasoning == "" and answer


def test_reasoning_content_through_the_gateway(reasoning_server: Any) -> None:
    import openai
    from aiohttp import web

    from weir_gateway.app import create_app
    from weir_gateway.config import GatewayConfig

    async def start() -> web.AppRunner:
        runner = web.AppRunner(create_app(GatewayConfig(backends=(reasoning_server.target,))))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = reasoning_server.run(start())
    host, port = runner.addresses[0][:2]
    try:
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        body = {"messages": [{"role": "user", "content": "What is the colour of the sky?"}], "max_tokens": 48}
        extra = {"guided_regex": THINKING}
        reply = client.chat.completions.create(model="", temperature=0, extra_body=extra, **body)
        message = reply.choices[0].message
        assert getattr(message, "reasoning_content", "").startswith("first ")
        assert (message.content or "").startswith("The answer is ")
        streamed_reasoning, streamed_answer = "", ""
        for chunk in client.chat.completions.create(model="", temperature=0, stream=True, extra_body=extra, **body):
            for choice in chunk.choices:
                streamed_reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                streamed_answer += choice.delta.content or ""
        assert (streamed_reasoning, streamed_answer) == (message.reasoning_content, message.content)
    finally:
        reasoning_server.run(runner.cleanup())
