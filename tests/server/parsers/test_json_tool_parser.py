"""The generic json parser: a call object, or a list of them, bare or fenced, fed in every split."""

from __future__ import annotations

from parser_support import check_tool_output

from weir_server.parsers.json_tool_parser import JsonToolParser


def test_json_reads_a_fenced_list_of_calls():
    check_tool_output(
        JsonToolParser,
        '```json\n[{"name": "get_weather", "arguments": {"city": "Berlin"}}, '
        '{"name": "get_time", "parameters": {"timezone": "Europe/Berlin"}}]\n```\n',
        "",
        [("get_weather", {"city": "Berlin"}), ("get_time", {"timezone": "Europe/Berlin"})],
    )


def test_json_reads_one_bare_call_object():
    check_tool_output(
        JsonToolParser,
        '  {"name": "get_time", "arguments": {"timezone": "UTC"}}',
        "",
        [("get_time", {"timezone": "UTC"})],
    )


def test_json_text_after_the_call_is_content():
    check_tool_output(
        JsonToolParser,
        '```\n{"name": "list_cities", "arguments": {}}\n```\nDone.',
        "\nDone.",
        [("list_cities", {})],
    )


def test_json_plain_answer_and_other_fences_are_content():
    for text in ["Berlin is the capital of Germany.", "```python\nprint('hi')\n```", "[1, 2, 3] are numbers."]:
        check_tool_output(JsonToolParser, text, text, [])


def test_json_object_that_is_not_a_call_is_content():
    text = '{"answer": "Berlin", "confidence": 0.9}'
    check_tool_output(JsonToolParser, text, text, [])


def test_json_never_matches_a_template():
    assert not JsonToolParser.matches_template('<tool_call> [TOOL_CALLS] {"name": "f", "parameters": {}}')
