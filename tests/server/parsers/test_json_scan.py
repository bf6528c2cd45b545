"""The incremental readers of the JSON a model writes for a call."""

from __future__ import annotations

from weir_server.parsers.json_scan import CallObjectReader, JsonValueScanner


def test_scanner_ends_a_value_after_its_last_character():
    for value, after in [('"a\\"}b"', ", x"), ('{"a": ["}", {"b": "\\\\"}]}', "}"), ("[1, [2]]", "]"), ("-1.5e3", "}")]:
        scanner = JsonValueScanner()
        assert scanner.feed(value + after) == len(value) and scanner.done


def test_reader_skips_other_keys_and_stops_at_the_closing_brace():
    reader = CallObjectReader()
    text = '{"type": "function", "id": 7, "name": "f", "parameters": {"x": [1, "}"]}, "extra": null} tail'
    assert reader.feed(text) == len(text) - len(" tail")
    assert reader.done and reader.name == "f" and reader.arguments() == '{"x": [1, "}"]}'


def test_reader_hands_out_argument_text_as_it_grows():
    reader = CallObjectReader()
    reader.feed('{"name": "f", "arguments": {"x": "ab')
    assert reader.name == "f" and reader.take_arguments() == '{"x": "ab'
    reader.feed('c"}}')
    assert reader.take_arguments() == 'c"}' and reader.arguments() == '{"x": "abc"}'


def test_reader_fails_on_what_is_not_an_object():
    for text in ["get_weather()", '{"name" "f"}', '{"name": "f",, }', "{name: 'f'}"]:
        reader = CallObjectReader()
        reader.feed(text)
        assert reader.failed and reader.arguments() is None


def test_arguments_that_are_not_an_object_make_no_call():
    for value in ["[1, 2]", '"text"', "42", '{"a": 1,}']:
        reader = CallObjectReader()
        reader.feed('{"name": "f", "arguments": ' + value + "}")
        assert reader.done and reader.arguments() is None
