"""Any output, well-formed or not, reads the same whether it arrives whole, in two pieces or a character at a
time, and every listed call equals its streamed pieces."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from parser_support import run_reasoning_parser, run_tool_parser

from weir_server.parsers import REASONING_PARSERS, TOOL_PARSERS

_ATOMS = [
    *"{}[]()\"',:;=\\` \n",
    "<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "<think>", "</think>", "```json\n",
    '"name": ', '"get_weather"', '"arguments": ', '"parameters": ', '{"city": "Paris"}', "get_time", "list_cities",
    "null", "1", "Paris",
]  # fmt: skip
outputs = st.lists(st.sampled_from(_ATOMS), max_size=16).map("".join)


@settings(max_examples=300, deadline=None)
@given(output=outputs, cut=st.integers(min_value=0), parser=st.sampled_from(sorted(TOOL_PARSERS)))
def test_any_output_reads_the_same_whole_split_or_char_by_char(output, cut, parser):
    def outcome(pieces: list[str]) -> tuple[object, ...]:
        run = run_tool_parser(TOOL_PARSERS[parser], pieces)
        assert all(run.arguments(call.index) == call.arguments for call in run.calls)
        return run.content, [(c.index, c.name, c.arguments) for c in run.calls]

    cut %= len(output) + 1
    whole = outcome([output])
    assert outcome([output[:cut], output[cut:]]) == whole
    assert outcome(list(output)) == whole


@settings(max_examples=200, deadline=None)
@given(output=outputs, cut=st.integers(min_value=0), parser=st.sampled_from(sorted(REASONING_PARSERS)))
def test_any_output_reasons_the_same_whole_split_or_char_by_char(output, cut, parser):
    cut %= len(output) + 1
    for prompt in ("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n", "<think>\n\n</think>\n\n"):
        whole = run_reasoning_parser(REASONING_PARSERS[parser], prompt, [output])
        assert run_reasoning_parser(REASONING_PARSERS[parser], prompt, [output[:cut], output[cut:]]) == whole
        assert run_reasoning_parser(REASONING_PARSERS[parser], prompt, list(output)) == whole
