"""`weir generate`'s tool, constraint and logit-bias options, parsed and sent to a scripted server; its reasoning
on stderr and tool calls as JSON lines after the text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from weir.v1 import inference_pb2 as pb
from weir_client import cli, cli_generate

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _options(*argv: str) -> dict[str, object]:
    return cli_generate.keywords(cli.build_parser().parse_args(["generate", "Hi", *argv]))


def test_plain_generate_sends_the_prompt_and_max_tokens_only() -> None:
    assert _options() == {"prompt": "Hi", "model": "", "max_tokens": 128}


def test_tools_and_schema_are_read_inline_or_from_files(tmp_path: Path) -> None:
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    (tmp_path / "schema.json").write_text('{"type": "object"}')
    inline = _options("--chat", "--tools", json.dumps(TOOLS), "--json-schema", '{"type": "object"}')
    from_files = _options(
        "--chat", "--tools", str(tmp_path / "tools.json"), "--json-schema", str(tmp_path / "schema.json")
    )
    assert inline == from_files
    assert inline["tools"] == TOOLS and inline["json_schema"] == {"type": "object"}


def test_grammar_is_read_from_a_file_or_taken_as_text(tmp_path: Path) -> None:
    grammar = 'root ::= "yes" | "no"'
    (tmp_path / "g.gbnf").write_text(grammar)
    assert _options("--grammar", str(tmp_path / "g.gbnf"))["grammar"] == grammar
    assert _options("--grammar", grammar)["grammar"] == grammar


def test_choice_repeats_and_logit_bias_is_id_equals_bias() -> None:
    options = _options("--choice", "yes", "--choice", "no", "--logit-bias", "5=-100", "--logit-bias", "7=2.5")
    assert options["choice"] == ["yes", "no"]
    assert options["logit_bias"] == {5: -100.0, 7: 2.5}


def test_tool_choice_template_kwargs_regex_and_json_object() -> None:
    options = _options("--chat", "--tool-choice", "get_weather", "--chat-template-kwargs", '{"enable_thinking": false}')
    assert options["tool_choice"] == "get_weather" and options["chat_template_kwargs"] == {"enable_thinking": False}
    assert _options("--regex", "[0-9]+")["regex"] == "[0-9]+"
    assert _options("--json-object")["json_object"] is True


@pytest.mark.parametrize(
    "argv",
    [
        ["--regex", "a", "--choice", "a"],
        ["--json-object", "--json-schema", "{}"],
        ["--logit-bias", "5"],
        ["--logit-bias", "eos=1"],
        ["--tools", "{not json"],
        ["--tools", '{"name": "f"}'],
        ["--chat-template-kwargs", "[1]"],
    ],
)
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["generate", "Hi", *argv])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_tools_without_chat_are_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "Hi", "--tools", json.dumps(TOOLS), "--target", "127.0.0.1:1"]) == 2
    assert "--chat" in capsys.readouterr().err


def test_generate_prints_text_then_calls_and_reasoning_on_stderr(
    scripted_server: Any, tool_call_replies: list[pb.GenerateResponse], capsys: pytest.CaptureFixture[str]
) -> None:
    scripted_server.replies = tool_call_replies
    argv = ["generate", "Weather in Paris?", "--chat", "--tools", json.dumps(TOOLS), "--tool-choice", "auto"]
    assert cli.main([*argv, "--target", scripted_server.target, "-v"]) == 0
    out, err = capsys.readouterr()
    text, call = out.splitlines()
    assert text == "Checking."
    assert json.loads(call) == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert "reasoning: The user wants the weather.\n" in err and "[tool_calls;" in err
    request = scripted_server.requests[0]
    assert request.tools[0].name == "get_weather" and request.tool_choice.mode == pb.TOOL_CHOICE_MODE_AUTO


def test_generate_sends_the_constraint_and_logit_bias(scripted_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    scripted_server.replies = [pb.GenerateResponse(text="yes", finish_reason=pb.FINISH_REASON_STOP)]
    argv = ["generate", "Answer:", "--choice", "yes", "--choice", "no", "--logit-bias", "9=-100"]
    assert cli.main([*argv, "--target", scripted_server.target]) == 0
    assert capsys.readouterr().out == "yes\n"
    request = scripted_server.requests[0]
    assert list(request.choice.values) == ["yes", "no"] and dict(request.sampling_params.logit_bias) == {9: -100.0}
