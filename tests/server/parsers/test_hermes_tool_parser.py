"""The hermes parser on Qwen 2.5 / Qwen3 / Hermes output, fed in every split."""

from __future__ import annotations

import json

from parser_support import WEATHER, check_tool_output, run_tool_parser

from weir_server.parsers.hermes_tool_parser import HermesToolParser

TWO_CALLS = (
    "I'll check the weather in both cities for you.\n"
    "<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris, France", "unit": "celsius"}}\n'
    "</tool_call>\n"
    "<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "celsius"}}\n'
    "</tool_call>"
)


def test_hermes_reads_two_parallel_calls_and_the_text_before_them():
    check_tool_output(
        HermesToolParser,
        TWO_CALLS,
        "I'll check the weather in both cities for you.",
        [
            ("get_weather", {"city": "Paris, France", "unit": "celsius"}),
            ("get_weather", {"city": "Tokyo", "unit": "celsius"}),
        ],
    )


def test_hermes_keeps_text_after_the_calls_as_content():
    check_tool_output(
        HermesToolParser,
        'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Asia/Tokyo"}}\n</tool_call>\n'
        "I will report back.\n",
        "Checking.\nI will report back.\n",
        [("get_time", {"timezone": "Asia/Tokyo"})],
    )


def test_hermes_plain_answer_is_all_content():
    check_tool_output(
        HermesToolParser, "The capital of France is Paris.\n\n", "The capital of France is Paris.\n\n", []
    )


def test_hermes_text_that_only_looks_like_a_tag_is_content():
    text = "Wrap it in <tool> or <tool_calls> tags, e.g. a<b and x <tool_cal"
    check_tool_output(HermesToolParser, text, text, [])


def test_hermes_arguments_holding_the_end_tag_braces_and_escapes_stay_in_the_call():
    args = {"code": 'print("}</tool_call>{")', "note": "naïve \\ path", "nested": {"list": [1, {"a": None}]}}
    check_tool_output(
        HermesToolParser,
        '<tool_call>\n{"name": "search_docs", "arguments": ' + json.dumps(args, ensure_ascii=False) + "}\n</tool_call>",
        "",
        [("search_docs", args)],
    )


def test_hermes_streams_arguments_before_the_call_closes():
    parser = HermesToolParser([WEATHER])
    first = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert [(d.name, d.arguments) for d in first.tool_calls] == [("get_weather", '{"city": "Par')]
    second = parser.feed('is"}}\n</tool')
    assert [(d.id, d.arguments) for d in second.tool_calls] == [(None, 'is"}')]
    assert parser.finish().content == "" and parser.calls[0].arguments == '{"city": "Paris"}'


def test_hermes_holds_back_a_partial_tag_but_not_the_text_before_it():
    parser = HermesToolParser([WEATHER])
    assert parser.feed("Let me check.\n<tool_").content == "Let me check."
    assert parser.feed("call>\n").content == ""


def test_hermes_reads_arguments_written_before_the_name():
    check_tool_output(
        HermesToolParser,
        '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>',
        "",
        [("get_weather", {"city": "Oslo"})],
    )


def test_hermes_call_without_arguments_gets_an_empty_object():
    check_tool_output(HermesToolParser, '<tool_call>\n{"name": "list_cities"}\n</tool_call>', "", [("list_cities", {})])


def test_hermes_unwraps_arguments_written_as_a_json_string():
    check_tool_output(
        HermesToolParser,
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>',
        "",
        [("get_weather", {"city": "Rome"})],
    )


def test_hermes_call_of_an_unknown_function_is_content():
    call = '<tool_call>\n{"name": "launch_rocket", "arguments": {"target": "moon"}}\n</tool_call>'
    check_tool_output(HermesToolParser, "Sure.\n" + call, "Sure.\n" + call, [])


def test_hermes_call_that_is_not_json_is_content_and_later_calls_still_count():
    bad = "<tool_call>\nget_weather(city='Paris')\n</tool_call>"
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    check_tool_output(HermesToolParser, bad + "\n" + good, bad, [("get_weather", {"city": "Paris"})])


def test_hermes_output_cut_off_inside_a_streamed_call_is_neither_a_call_nor_content():
    cut = '<tool_call>\n{"name": "list_cities", "arguments": {"city": "Pa'
    run = run_tool_parser(HermesToolParser, [cut])
    assert run.calls == [] and run.content == ""  # its deltas were told; the finish reason says it was cut


def test_hermes_output_cut_off_before_the_name_is_content():
    cut = '<tool_call>\n{"name": "list_ci'
    run = run_tool_parser(HermesToolParser, [cut])
    assert run.calls == [] and run.content == cut


def test_hermes_call_object_without_its_end_tag_still_counts():
    check_tool_output(
        HermesToolParser,
        '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}',
        "",
        [("get_time", {"timezone": "UTC"})],
    )


def test_hermes_without_tools_gives_every_call_back_as_content():
    run = run_tool_parser(HermesToolParser, [TWO_CALLS], tools=())
    assert run.calls == [] and run.content == TWO_CALLS


def test_hermes_matches_qwen_templates():
    qwen = '{{- "For each function call, return a json object ...:\\n<tool_call>\\n{\\"name\\": <function-name>, ..."}}'
    assert HermesToolParser.matches_template(qwen)
    assert not HermesToolParser.matches_template("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")


def test_hermes_streamed_call_whose_arguments_turn_out_invalid_is_content_not_a_call():
    # Only unconstrained output can do this: the grammar keeps arguments to the schema.
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>'
    run = run_tool_parser(HermesToolParser, [text])
    assert run.calls == [] and run.content == text
    assert run.arguments(0) == '{"city": "Paris",}'


def test_hermes_drops_stray_braces_after_the_call_object():
    check_tool_output(
        HermesToolParser,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris"})],
    )
