"""Chat templates with tools: the model's own template when it knows tools, Weir's generic rendering when it does
not, template variables, and the checks on a conversation that carries calls."""

from __future__ import annotations

from typing import Any

import pytest

from weir_server.chat.messages import ChatMessage, ToolCallRef, check_conversation
from weir_server.chat.template import ChatTemplate, template_kwargs
from weir_server.errors import InvalidRequestError
from weir_server.parsers.tool_parser import ToolSpec

# A compact template in Qwen 2.5's style: tools in the system turn, calls in <tool_call> tags, results as user turns.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are helpful.' }}
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}<|im_start|>\
{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""

WEATHER = ToolSpec("get_weather", "Weather in a city", {"type": "object", "properties": {"city": {"type": "string"}}})
CALL = ToolCallRef("call_1", "get_weather", '{"city": "Oslo"}')
LOOP = [
    ChatMessage("user", "Weather in Oslo?"),
    ChatMessage("assistant", "", (CALL,)),
    ChatMessage("tool", "cold", tool_call_id="call_1"),
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer: Any) -> Any:
    return smollm2_tokenizer


def test_a_template_that_reads_tools_knows_them(tokenizer: Any) -> None:
    assert ChatTemplate(tokenizer, HERMES_TEMPLATE).knows_tools
    assert not ChatTemplate(tokenizer).knows_tools  # SmolLM2's own


def test_template_that_knows_tools_renders_them_and_the_calls(tokenizer: Any) -> None:
    prompt = ChatTemplate(tokenizer, HERMES_TEMPLATE).render(LOOP, [WEATHER])
    assert '"name": "get_weather"' in prompt.split("</tools>")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt
    assert "<tool_response>\ncold\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_template_without_tools_gets_them_in_the_system_turn(tokenizer: Any) -> None:
    messages = [ChatMessage("system", "Be brief."), *LOOP]
    prompt = ChatTemplate(tokenizer).render(messages, [WEATHER])
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.") and "<tools>" in system and "get_weather" in system
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' in prompt
    assert "<|im_start|>user\n<tool_response>\ncold\n</tool_response><|im_end|>" in prompt


def test_results_of_parallel_calls_share_one_turn_in_the_generic_rendering(tokenizer: Any) -> None:
    second = ToolCallRef("call_2", "get_weather", '{"city": "Rome"}')
    messages = [
        ChatMessage("user", "Oslo and Rome?"),
        ChatMessage("assistant", "", (CALL, second)),
        ChatMessage("tool", "cold", tool_call_id="call_1"),
        ChatMessage("tool", "warm", tool_call_id="call_2"),
    ]
    prompt = ChatTemplate(tokenizer).render(messages, [WEATHER])
    assert "<tool_response>\ncold\n</tool_response>\n<tool_response>\nwarm\n</tool_response><|im_end|>" in prompt


def test_chat_template_kwargs_reach_the_template(tokenizer: Any) -> None:
    template = ChatTemplate(tokenizer, HERMES_TEMPLATE)
    messages = [ChatMessage("user", "hi")]
    assert "<think>" not in template.render(messages)
    off = template.render(messages, kwargs=template_kwargs('{"enable_thinking": false}'))
    assert off.endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize("text", ["[1]", "{bad", '{"chat_template": "{{ 1 }}"}', '{"tools": []}'])
def test_chat_template_kwargs_must_be_an_object_of_template_variables(text: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        template_kwargs(text)
    assert refused.value.field == "chat_template_kwargs"


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([ChatMessage("user", "x"), ChatMessage("tool", "1", tool_call_id="nope")], "messages[1].tool_call_id"),
        ([ChatMessage("tool", "1")], "messages[0].tool_call_id"),
        ([ChatMessage("assistant", "", (ToolCallRef("c", "f", "{x"),))], "messages[0].tool_calls[0].arguments"),
        ([ChatMessage("assistant", "", (ToolCallRef("c", "f", "[1]"),))], "messages[0].tool_calls[0].arguments"),
        ([ChatMessage("user", "", (CALL,))], "messages[0].tool_calls"),
        ([ChatMessage("robot", "x")], "messages[0].role"),
    ],
)
def test_bad_conversations_name_the_field(messages: list[ChatMessage], field: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_conversation(messages)
    assert refused.value.field == field


def test_a_template_override_replaces_the_models(tokenizer: Any) -> None:
    prompt = ChatTemplate(tokenizer, "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}").render(
        [ChatMessage("user", "hi")]
    )
    assert prompt == "[user] hi\n"
