"""The pythonic parser on Llama 3.2 / Llama 4 pythonic output, fed in every split."""

from __future__ import annotations

from parser_support import check_tool_output, run_tool_parser

from weir_server.parsers.pythonic_tool_parser import PythonicToolParser, parse_call


def test_pythonic_reads_calls_with_nested_literals_and_tricky_strings():
    check_tool_output(
        PythonicToolParser,
        "[get_weather(city=\"San Francisco, CA\", unit='fahrenheit'), "
        'search_docs(query=\'f(x) = [a, b]) \\\'quoted\\\'\', filters={"tags": ["news", "sports"], '
        '"range": (1, -2.5), "deep": {"x": [None, True]}}, exact=True, limit=None)]',
        "",
        [
            ("get_weather", {"city": "San Francisco, CA", "unit": "fahrenheit"}),
            (
                "search_docs",
                {
                    "query": "f(x) = [a, b]) 'quoted'",
                    "filters": {"tags": ["news", "sports"], "range": [1, -2.5], "deep": {"x": [None, True]}},
                    "exact": True,
                    "limit": None,
                },
            ),
        ],
    )


def test_pythonic_reads_llama_4_python_tags_and_triple_quoted_strings():
    check_tool_output(
        PythonicToolParser,
        '<|python_start|>[search_docs(query="""multi\nline "quote" ]"""), list_cities()]<|python_end|>',
        "",
        [("search_docs", {"query": 'multi\nline "quote" ]'}), ("list_cities", {})],
    )


def test_pythonic_accepts_json_spelled_constants():
    check_tool_output(
        PythonicToolParser,
        "[search_docs(query='x', exact=false, limit=null)]",
        "",
        [("search_docs", {"query": "x", "exact": False, "limit": None})],
    )


def test_pythonic_plain_answers_and_lists_that_are_not_calls_are_content():
    for text in ["I can't help with that.", "[1] Smith et al., 2020.", "[Note: see (a) and (b)]", "[f(1)]", "[x]"]:
        check_tool_output(PythonicToolParser, text, text, [])


def test_pythonic_call_of_an_unknown_function_is_content():
    run = run_tool_parser(PythonicToolParser, ['[launch(target="moon"), list_cities()]'])
    assert run.content == '[launch(target="moon")'
    assert [call.name for call in run.calls] == ["list_cities"]


def test_pythonic_never_evaluates_code():
    assert parse_call("search_docs(query=__import__('os').getcwd())") is None
    assert parse_call("search_docs(query=1 + 2)") is None
    assert parse_call("search_docs(**{'query': 'x'})") is None
    assert parse_call("search_docs(query={1, 2})") is None


def test_pythonic_matches_pythonic_templates():
    template = (
        "in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]"
    )
    assert PythonicToolParser.matches_template(template)
    assert not PythonicToolParser.matches_template('{"name": function name, "parameters": dictionary}')
