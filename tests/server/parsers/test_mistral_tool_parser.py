"""The mistral parser on both of Mistral's call forms, fed in every split."""

from __future__ import annotations

from parser_support import WEATHER, check_tool_output, run_tool_parser

from weir_server.parsers.mistral_tool_parser import MistralToolParser

PARIS = ("get_weather", {"city": "Paris", "unit": "celsius"})
PARIS_TIME = ("get_time", {"timezone": "Europe/Paris"})


def test_mistral_reads_the_json_list_form():
    check_tool_output(
        MistralToolParser,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]',
        "",
        [PARIS, PARIS_TIME],
    )


def test_mistral_reads_the_v11_name_args_form_with_parallel_calls():
    check_tool_output(
        MistralToolParser,
        'Let me look.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
        '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}',
        "Let me look.",
        [PARIS, PARIS_TIME],
    )


def test_mistral_skips_a_call_id_before_the_arguments():
    check_tool_output(
        MistralToolParser,
        '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{"timezone": "Europe/Paris"}',
        "",
        [PARIS_TIME],
    )


def test_mistral_plain_answer_is_all_content():
    text = "Use the [TOOLS] list, or [TOOL_CALL] by hand [sic]."
    check_tool_output(MistralToolParser, text, text, [])


def test_mistral_streams_v11_arguments_before_the_call_closes():
    parser = MistralToolParser([WEATHER])
    delta = parser.feed('[TOOL_CALLS]get_weather[ARGS]{"city": "Ly')
    assert [(d.name, d.arguments) for d in delta.tool_calls] == [("get_weather", '{"city": "Ly')]


def test_mistral_unknown_function_in_a_list_is_content_and_the_others_count():
    unknown = '{"name": "launch_rocket", "arguments": {}}'
    check_tool_output(
        MistralToolParser,
        "[TOOL_CALLS][" + unknown + ', {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]',
        "[TOOL_CALLS][" + unknown,
        [PARIS_TIME],
    )


def test_mistral_v11_call_with_arguments_that_are_not_an_object_is_content():
    text = "[TOOL_CALLS]get_weather[ARGS]Paris"
    run = run_tool_parser(MistralToolParser, [text])
    assert run.calls == [] and run.content == text


def test_mistral_matches_mistral_templates():
    assert MistralToolParser.matches_template('{{- "[TOOL_CALLS][" }}{%- for tool in message.tool_calls %}')
    assert not MistralToolParser.matches_template("<tool_call>")
