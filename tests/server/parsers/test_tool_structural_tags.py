"""The parsers' structural tags compile with xgrammar over the packaged SmolLM2 tokenizer, accept the calls
their parsers read, and reject calls of unknown functions, arguments off the schema, and text where calls are
required."""

from __future__ import annotations

from typing import Any

import pytest
from parser_support import TOOLS, WEATHER, run_tool_parser

from weir_server.parsers import TOOL_PARSERS, get_tool_parser
from weir_server.parsers.hermes_tool_parser import HermesToolParser
from weir_server.parsers.qwen3_reasoning_parser import Qwen3ReasoningParser

xgr = pytest.importorskip("xgrammar")

pytestmark = pytest.mark.timeout(120)

SMOLLM2_VOCAB_SIZE = 49152
SMOLLM2_EOS = 2

HERMES_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
HERMES_TIME = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'

# (parser, output its tag accepts in auto mode, the calls the parser reads from it)
ACCEPTED: list[tuple[str, str, list[str]]] = [
    ("hermes", "Let me check.\n" + HERMES_PARIS + "\n" + HERMES_TIME, ["get_weather", "get_time"]),
    ("hermes", "Paris is sunny today.", []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "list_cities", "parameters": {}}',
        ["get_weather", "list_cities"],
    ),
    ("llama3_json", "It is sunny in Paris.", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', ["get_weather"]),
    (
        "mistral",
        'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]list_cities[ARGS]{}',
        ["get_weather", "list_cities"],
    ),
    (
        "json",
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "list_cities", "arguments": {}}]',
        ["get_weather", "list_cities"],
    ),
    ("json", '{"name": "get_time", "arguments": {"timezone": "UTC"}}', ["get_time"]),
    ("json", "Paris, probably.", []),
]

# (parser, output its auto-mode tag rejects)
REJECTED: list[tuple[str, str]] = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": 75}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}\n</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": ["Paris"]}}'),
    ("llama3_json", '{"answer": "Paris"}'),
    ("llama3_json", 'Text, then <|python_tag|>{"name": "launch_rocket", "parameters": {}}'),
    ("mistral", "[TOOL_CALLS]launch_rocket[ARGS]{}"),
    ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]'),
    ("json", '{"name": "launch_rocket", "arguments": {}}'),
    ("json", '```json\n{"name": "get_weather", "arguments": {"city": 1}}\n```'),
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer: Any) -> Any:
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> Any:
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=SMOLLM2_VOCAB_SIZE, stop_token_ids=[SMOLLM2_EOS])
    return xgr.GrammarCompiler(info)


@pytest.fixture(scope="module")
def accepts(compiler: Any, tokenizer: Any) -> Any:
    def accepts(tag: dict[str, Any], text: str) -> bool:
        """Whether the grammar takes the text's tokens and then the end of the output."""
        matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(tag))
        tokens = tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.accept_token(token) for token in tokens) and matcher.accept_token(SMOLLM2_EOS)

    return accepts


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
@pytest.mark.parametrize(("mode", "forced"), [("auto", None), ("required", None), ("required", "get_weather")])
def test_every_tag_compiles_with_and_without_a_reasoning_prefix(compiler, name, mode, forced):
    prefix = Qwen3ReasoningParser("<|im_start|>assistant\n").structural_prefix()
    for reasoning_prefix in (None, prefix):
        tag = get_tool_parser(name).structural_tag(TOOLS, mode, forced, reasoning_prefix)
        if name == "pythonic":
            assert tag is None  # arguments of Python calls are not schema-constrained
            continue
        assert tag is not None and tag["type"] == "structural_tag"
        compiler.compile_structural_tag(tag)


@pytest.mark.parametrize(("name", "output", "calls"), ACCEPTED)
def test_auto_tag_accepts_what_its_parser_reads_as_calls_or_text(accepts, name, output, calls):
    parser_cls = get_tool_parser(name)
    assert accepts(parser_cls.structural_tag(TOOLS, "auto"), output)
    run = run_tool_parser(parser_cls, [output])
    assert [call.name for call in run.calls] == calls


@pytest.mark.parametrize(("name", "output"), REJECTED)
def test_auto_tag_rejects_unknown_functions_and_arguments_off_the_schema(accepts, name, output):
    assert not accepts(get_tool_parser(name).structural_tag(TOOLS, "auto"), output)


def test_hermes_required_tag_takes_calls_only(accepts):
    tag = HermesToolParser.structural_tag(TOOLS, "required")
    assert accepts(tag, HERMES_PARIS + "\n" + HERMES_TIME)
    assert not accepts(tag, "Paris is sunny today.")
    assert not accepts(tag, "Let me check.\n" + HERMES_PARIS)
    assert not accepts(tag, "")


def test_hermes_forced_tag_takes_exactly_one_call_of_that_function(accepts):
    tag = HermesToolParser.structural_tag(TOOLS, "required", forced="get_weather")
    assert accepts(tag, HERMES_PARIS)
    assert not accepts(tag, HERMES_TIME)
    assert not accepts(tag, HERMES_PARIS + "\n" + HERMES_PARIS)


def test_hermes_tag_after_a_qwen3_reasoning_prefix(accepts):
    open_think = Qwen3ReasoningParser("<|im_start|>assistant\n<think>\n").structural_prefix()
    tag = HermesToolParser.structural_tag(TOOLS, "required", reasoning_prefix=open_think)
    assert accepts(tag, "The user wants Paris weather.\n</think>\n\n" + HERMES_PARIS)
    assert not accepts(tag, HERMES_PARIS)


def test_required_tags_reject_free_text(accepts):
    for name in ("llama3_json", "mistral", "json"):
        assert not accepts(get_tool_parser(name).structural_tag(TOOLS, "required"), "Paris is sunny today.")


def test_tags_need_a_known_mode_and_forced_tool():
    with pytest.raises(ValueError, match="mode"):
        HermesToolParser.structural_tag(TOOLS, "sometimes")
    with pytest.raises(ValueError, match="launch_rocket"):
        HermesToolParser.structural_tag(TOOLS, "required", forced="launch_rocket")
    with pytest.raises(ValueError, match="at least one tool"):
        HermesToolParser.structural_tag((), "required")
    assert HermesToolParser.structural_tag((), "auto") is None
    assert HermesToolParser.structural_tag([WEATHER], "auto") is not None
