"""The tool-parser registry: lookup by name and detection from chat templates."""

from __future__ import annotations

import pytest

from weir_server.parsers import TOOL_PARSERS, detect_tool_parser, get_tool_parser
from weir_server.parsers.hermes_tool_parser import HermesToolParser

QWEN25 = (
    '{%- if tools %}{{- "\\n\\n# Tools\\n\\nYou may call one or more functions ...\\n<tools>" }}'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}{%- endif %}'
)
LLAMA31 = (
    "{{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments "
    'that best answers the given prompt.\\n\\nRespond in the format {"name": function name, "parameters": '
    "dictionary of argument name and its value}.Do not use variables.\\n\\n' }}"
    "{%- if builtin_tools is defined %}{{- '<|python_tag|>' + tool_call.name + '.call(' }}{%- endif %}"
)
MISTRAL = '{%- if message.tool_calls %}{{- "[TOOL_CALLS][" }}{%- for tool_call in message.tool_calls %}'
PYTHONIC = (
    "If you decide to invoke any of the function(s), you MUST put it in the format of "
    "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\\n"
)
PLAIN = "{% for message in messages %}<|im_start|>{{ message.role }}\\n{{ message.content }}<|im_end|>{% endfor %}"


def test_every_format_is_registered_by_name():
    assert sorted(TOOL_PARSERS) == ["hermes", "json", "llama3_json", "mistral", "pythonic"]
    assert all(cls.name == name for name, cls in TOOL_PARSERS.items())
    assert get_tool_parser("hermes") is HermesToolParser


def test_unknown_tool_parser_names_the_choices():
    with pytest.raises(ValueError, match="hermes, json, llama3_json, mistral, pythonic"):
        get_tool_parser("granite")


@pytest.mark.parametrize(
    ("template", "expected"),
    [(QWEN25, "hermes"), (LLAMA31, "llama3_json"), (MISTRAL, "mistral"), (PYTHONIC, "pythonic"), (PLAIN, None)],
)
def test_detect_tool_parser_from_a_chat_template(template, expected):
    assert detect_tool_parser(template) == expected


def test_detect_tool_parser_is_none_without_a_template_or_when_ambiguous():
    assert detect_tool_parser(None) is None
    assert detect_tool_parser("") is None
    assert detect_tool_parser(QWEN25 + MISTRAL) is None
