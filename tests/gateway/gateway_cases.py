"""Malformed requests every gateway must refuse with a 4xx OpenAI error (shared by fake and real-server tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

COMPLETIONS, CHAT, EMBEDDINGS = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"


@dataclass(frozen=True)
class Bad:
    """One malformed request: where it goes, its body, and the status (and `param`) it must get."""

    name: str
    path: str
    body: bytes
    status: int = 400
    param: str | None = None
    method: str = "POST"


def completion(model: str, **fields: Any) -> bytes:
    return json.dumps({"model": model, "prompt": "hello", "max_tokens": 2} | fields).encode()


def chat(model: str, **fields: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return json.dumps(body | fields).encode()


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def tool(name: str, parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def called(call_id: str, arguments: str = "{}") -> dict[str, Any]:
    """An assistant turn that called `weather`."""
    call = {"id": call_id, "type": "function", "function": {"name": "weather", "arguments": arguments}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def answer(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "sunny"}


def malformed_requests(gen_model: str, embed_model: str, max_body_bytes: int) -> list[Bad]:
    """The cases, built for the models a gateway serves."""
    c = lambda **f: completion(gen_model, **f)  # noqa: E731 - a table reads best with short builders
    m = lambda *msgs, **f: chat(gen_model, messages=list(msgs), **f)  # noqa: E731
    e = lambda **f: json.dumps({"model": embed_model} | f).encode()  # noqa: E731
    user = {"role": "user", "content": "hi"}
    return [
        Bad("invalid json", COMPLETIONS, b'{"model": "x", "prompt": '),
        Bad("bad utf-8", COMPLETIONS, b'{"model": "x", "prompt": "\xff\xfe"}'),
        Bad("body is an array", COMPLETIONS, b"[1, 2, 3]"),
        Bad("body is a string", COMPLETIONS, b'"hello"'),
        Bad("empty body", COMPLETIONS, b""),
        Bad("NaN literal", COMPLETIONS, b'{"prompt": "x", "temperature": NaN}'),
        Bad("infinite number", COMPLETIONS, b'{"prompt": "x", "temperature": 1e999}', param="temperature"),
        Bad("5000-digit integer", COMPLETIONS, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),
        Bad("deep nesting", COMPLETIONS, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        Bad("prompt missing", COMPLETIONS, json.dumps({"model": gen_model}).encode(), param="prompt"),
        Bad("prompt is a number", COMPLETIONS, c(prompt=5), param="prompt"),
        Bad("prompt is an empty list", COMPLETIONS, c(prompt=[]), param="prompt"),
        Bad("prompt mixes types", COMPLETIONS, c(prompt=["a", 1]), param="prompt"),
        Bad("negative token id", COMPLETIONS, c(prompt=[-1, 2]), param="prompt"),
        Bad("token id beyond int32", COMPLETIONS, c(prompt=[2**40]), param="prompt"),
        Bad("empty prompt string", COMPLETIONS, c(prompt=""), param="prompt"),
        Bad("empty token list in list", COMPLETIONS, c(prompt=[[1, 2], []]), param="prompt"),
        Bad("negative max_tokens", COMPLETIONS, c(max_tokens=-5), param="max_tokens"),
        Bad("huge max_tokens", COMPLETIONS, c(max_tokens=10**12), param="max_tokens"),
        Bad("max_tokens as string", COMPLETIONS, c(max_tokens="10"), param="max_tokens"),
        Bad("fractional max_tokens", COMPLETIONS, c(max_tokens=2.5), param="max_tokens"),
        Bad("max_tokens as boolean", COMPLETIONS, c(max_tokens=True), param="max_tokens"),
        Bad("negative temperature", COMPLETIONS, c(temperature=-1), param="temperature"),
        Bad("top_p of zero", COMPLETIONS, c(top_p=0), param="top_p"),
        Bad("top_p above one", COMPLETIONS, c(top_p=1.5), param="top_p"),
        Bad("n of zero", COMPLETIONS, c(n=0), param="n"),
        Bad("huge n", COMPLETIONS, c(n=1000), param="n"),
        Bad("stop of numbers", COMPLETIONS, c(stop=[1]), param="stop"),
        Bad("empty stop string", COMPLETIONS, c(stop=""), param="stop"),
        Bad("too many stops", COMPLETIONS, c(stop=[f"s{i}" for i in range(40)]), param="stop"),
        Bad("too many logprobs", COMPLETIONS, c(logprobs=100), param="logprobs"),
        Bad("seed beyond int64", COMPLETIONS, c(seed=2**70), param="seed"),
        Bad("logit_bias above 100", COMPLETIONS, c(logit_bias={"1": 101}), param="logit_bias"),
        Bad("logit_bias key not a token id", COMPLETIONS, c(logit_bias={"abc": 1}), param="logit_bias"),
        Bad("logit_bias negative key", COMPLETIONS, c(logit_bias={"-1": 1}), param="logit_bias"),
        Bad("logit_bias as a list", COMPLETIONS, c(logit_bias=[1, 2]), param="logit_bias"),
        Bad("tools on completions", COMPLETIONS, c(tools=[WEATHER]), param="tools"),
        Bad("suffix unsupported", COMPLETIONS, c(suffix="x"), param="suffix"),
        Bad("stream as string", COMPLETIONS, c(stream="yes"), param="stream"),
        Bad("stream_options without stream", COMPLETIONS, c(stream_options={"include_usage": True}),
            param="stream_options"),
        Bad("presence_penalty out of range", COMPLETIONS, c(presence_penalty=5), param="presence_penalty"),
        Bad("top_k as string", COMPLETIONS, c(top_k="many"), param="top_k"),
        Bad("negative stop token id", COMPLETIONS, c(stop_token_ids=[-3]), param="stop_token_ids"),
        Bad("best_of above n", COMPLETIONS, c(best_of=3), param="best_of"),
        Bad("echo as string", COMPLETIONS, c(echo="true"), param="echo"),
        Bad("min_tokens above max_tokens", COMPLETIONS, c(min_tokens=5, max_tokens=2), param="min_tokens"),
        Bad("unknown model", COMPLETIONS, completion("no-such-model"), status=404, param="model"),
        Bad("embedding model for completions", COMPLETIONS, completion(embed_model), param="model"),
        Bad("model is a number", COMPLETIONS, json.dumps({"model": 7, "prompt": "x"}).encode(), param="model"),
        Bad("lone surrogate escape", COMPLETIONS, b'{"prompt": "\\ud800 x", "max_tokens": 2}'),
        Bad("messages missing", CHAT, json.dumps({"model": gen_model}).encode(), param="messages"),
        Bad("messages empty", CHAT, m(), param="messages"),
        Bad("messages is a string", CHAT, chat(gen_model, messages="hi"), param="messages"),
        Bad("message is a string", CHAT, m("hi"), param="messages[0]"),
        Bad("unknown role", CHAT, m({"role": "wizard", "content": "hi"}), param="messages[0].role"),
        Bad("role missing", CHAT, m({"content": "hi"}), param="messages[0].role"),
        Bad("content is a number", CHAT, m({"role": "user", "content": 42}), param="messages[0].content"),
        Bad("content null for user", CHAT, m({"role": "user", "content": None}), param="messages[0].content"),
        Bad("image content part", CHAT, m({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}),
            param="messages[0].content[0].type"),
        Bad("text part without text", CHAT, m({"role": "user", "content": [{"type": "text"}]}),
            param="messages[0].content[0].text"),
        Bad("tool_call_id answering no call", CHAT, m(user, {"role": "tool", "content": "x", "tool_call_id": "1"}),
            param="messages[1].tool_call_id"),
        Bad("tool turn without tool_call_id", CHAT, m(user, called("1"), {"role": "tool", "content": "x"}),
            param="messages[2].tool_call_id"),
        Bad("history arguments not JSON", CHAT, m(user, called("1", "{not json"), answer("1")),
            param="messages[1].tool_calls[0].function.arguments"),
        Bad("history arguments not an object", CHAT, m(user, called("1", "[1, 2]"), answer("1")),
            param="messages[1].tool_calls[0].function.arguments"),
        Bad("tool_calls on a user turn", CHAT, m(user | {"tool_calls": called("1")["tool_calls"]}),
            param="messages[0].tool_calls"),
        Bad("legacy function role", CHAT, m(user, {"role": "function", "name": "f", "content": "x"}),
            param="messages[1].role"),
        Bad("legacy functions", CHAT, m(user, functions=[{"name": "f"}]), param="functions"),
        Bad("audio content part", CHAT, m({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
            param="messages[0].content[0].type"),
        Bad("audio output", CHAT, m(user, audio={"voice": "alloy", "format": "wav"}), param="audio"),
        Bad("audio modality", CHAT, m(user, modalities=["text", "audio"]), param="modalities"),
        Bad("tool without function", CHAT, m(user, tools=[{"type": "function"}]), param="tools[0].function"),
        Bad("tool parameters not a schema", CHAT, m(user, tools=[tool("f", {"type": 12})]),
            param="tools[0].function.parameters"),
        Bad("tool parameters not an object", CHAT, m(user, tools=[tool("f", [1])]),
            param="tools[0].function.parameters"),
        Bad("tool of another type", CHAT, m(user, tools=[{"type": "custom", "custom": {"name": "f"}}]),
            param="tools[0].type"),
        Bad("duplicate tool names", CHAT, m(user, tools=[WEATHER, WEATHER]), param="tools"),
        Bad("tool_choice naming an unknown tool", CHAT,
            m(user, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
            param="tool_choice"),
        Bad("tool_choice required without tools", CHAT, m(user, tool_choice="required"), param="tool_choice"),
        Bad("tool_choice of another shape", CHAT, m(user, tools=[WEATHER], tool_choice="sometimes"),
            param="tool_choice"),
        Bad("chat logit_bias below -100", CHAT, m(user, logit_bias={"5": -100.5}), param="logit_bias"),
        Bad("chat_template_kwargs not an object", CHAT, m(user, chat_template_kwargs="x"),
            param="chat_template_kwargs"),
        Bad("ignored field of the wrong type", CHAT, m(user, store="yes"), param="store"),
        Bad("metadata values not strings", CHAT, m(user, metadata={"a": 1}), param="metadata"),
        Bad("unknown response_format type", CHAT, m(user, response_format={"type": "yaml"}),
            param="response_format.type"),
        Bad("top_logprobs without logprobs", CHAT, m(user, top_logprobs=2), param="top_logprobs"),
        Bad("chat logprobs as integer", CHAT, m(user, logprobs=5), param="logprobs"),
        Bad("input missing", EMBEDDINGS, e(), param="input"),
        Bad("input empty list", EMBEDDINGS, e(input=[]), param="input"),
        Bad("input is a number", EMBEDDINGS, e(input=3), param="input"),
        Bad("empty token list input", EMBEDDINGS, e(input=[[]]), param="input"),
        Bad("unknown encoding_format", EMBEDDINGS, e(input="x", encoding_format="hex"), param="encoding_format"),
        Bad("zero dimensions", EMBEDDINGS, e(input="x", dimensions=0), param="dimensions"),
        Bad("tokenize without prompt", "/tokenize", json.dumps({"model": gen_model}).encode(), param="prompt"),
        Bad("detokenize strings", "/detokenize", json.dumps({"model": gen_model, "tokens": ["a"]}).encode(),
            param="tokens"),
        Bad("oversize body", COMPLETIONS, c(prompt="x" * (max_body_bytes + 10)), status=413),
        Bad("wrong method", COMPLETIONS, b"", status=405, method="GET"),
        Bad("unknown path", "/v1/nothing", b"{}", status=404),
    ]  # fmt: skip
