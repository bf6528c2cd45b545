"""The llama3_json parser on Llama 3.1 / 3.2 output, fed in every split."""

from __future__ import annotations

from parser_support import WEATHER, check_tool_output, run_tool_parser

from weir_server.parsers.llama_tool_parser import Llama3JsonToolParser


def test_llama_reads_a_call_after_the_python_tag():
    check_tool_output(
        Llama3JsonToolParser,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "San Francisco, CA", "unit": "fahrenheit"}}',
        "",
        [("get_weather", {"city": "San Francisco, CA", "unit": "fahrenheit"})],
    )


def test_llama_reads_bare_calls_separated_by_semicolons():
    check_tool_output(
        Llama3JsonToolParser,
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}',
        "",
        [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})],
    )


def test_llama_reads_arguments_as_parameters():
    check_tool_output(
        Llama3JsonToolParser,
        '{"name": "get_time", "arguments": {"timezone": "UTC"}}',
        "",
        [("get_time", {"timezone": "UTC"})],
    )


def test_llama_plain_answer_is_all_content():
    text = "The weather in Paris is sunny, 24°C. {Enjoy} your day!"
    check_tool_output(Llama3JsonToolParser, text, text, [])


def test_llama_json_that_is_not_a_call_is_content():
    text = '{"answer": 42, "unit": "none"}'
    check_tool_output(Llama3JsonToolParser, text, text, [])


def test_llama_text_after_the_calls_is_content():
    check_tool_output(
        Llama3JsonToolParser,
        '{"name": "list_cities", "parameters": {}}\n\nThat lists them.',
        "\n\nThat lists them.",
        [("list_cities", {})],
    )


def test_llama_streams_arguments_before_the_call_closes():
    parser = Llama3JsonToolParser([WEATHER])
    delta = parser.feed('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Li')
    assert [(d.name, d.arguments) for d in delta.tool_calls] == [("get_weather", '{"city": "Li')]


def test_llama_call_of_an_unknown_function_is_content():
    text = '<|python_tag|>{"name": "brave_search", "parameters": {"query": "weather"}}'
    run = run_tool_parser(Llama3JsonToolParser, [text])
    assert run.calls == [] and run.content == text


def test_llama_matches_llama_3_1_templates_only():
    llama31 = (
        '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
        "value}.' }}{{- '<|python_tag|>' + tool_call.name + '.call(' }}"
    )
    assert Llama3JsonToolParser.matches_template(llama31)
    assert not Llama3JsonToolParser.matches_template('<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\"')
