"""The official OpenAI SDK against Weir's gateway: a chat completion, a streamed one, and a tool-calling loop.

    pip install openai
    python examples/openai_sdk.py   # WEIR_GATEWAY_URL=http://host:port/v1 for another gateway

WEIR_MODEL picks the model (default: the first generation model the gateway lists); WEIR_API_KEY is sent as the
bearer token when the gateway runs with --api-key.
"""

import json
import os
from typing import Any

from openai import OpenAI

BASE_URL = os.environ.get("WEIR_GATEWAY_URL", "http://localhost:8000/v1")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 32}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def get_weather(city: str) -> dict[str, Any]:
    """The tool itself: runs here, in the client; the model only asks for it."""
    return {"city": city, "temperature_c": 21, "sky": "clear"}


def generation_model(client: OpenAI) -> str:
    """WEIR_MODEL, else the first model the gateway lists for generation (Weir's model cards carry a `task`)."""
    if os.environ.get("WEIR_MODEL"):
        return os.environ["WEIR_MODEL"]
    return next(m.id for m in client.models.list() if (m.model_extra or {}).get("task", "generate") == "generate")


def chat(client: OpenAI, model: str) -> None:
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello in French."}],
        max_tokens=32,
        temperature=0,
    )
    print(f"chat: {answer.choices[0].message.content!r} ({answer.usage.total_tokens if answer.usage else 0} tokens)")


def stream(client: OpenAI, model: str) -> None:
    print("stream: ", end="")
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=32,
        temperature=0,
        stream=True,
    ):
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
    print()


def tools(client: OpenAI, model: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    # tool_choice "required" makes a small model call; "auto" (the default with tools) lets it choose.
    first = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=48, temperature=0
    )
    message = first.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls or []:
        arguments = json.loads(call.function.arguments)
        print(f"tools: the model calls {call.function.name}({arguments})")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(get_weather(**arguments))})
    final = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0)
    print(f"tools: {final.choices[0].message.content!r}")


def main() -> None:
    with OpenAI(base_url=BASE_URL, api_key=os.environ.get("WEIR_API_KEY", "unused"), timeout=120) as client:
        model = generation_model(client)
        chat(client, model)
        stream(client, model)
        tools(client, model)


if __name__ == "__main__":
    main()
