"""The deepseek_r1 and qwen3 reasoning parsers, with prompts that do and do not open <think>, in every split."""

from __future__ import annotations

import pytest
from parser_support import check_reasoning_output

from weir_server.parsers import REASONING_PARSERS, get_reasoning_parser
from weir_server.parsers.deepseek_r1_reasoning_parser import DeepSeekR1ReasoningParser
from weir_server.parsers.qwen3_reasoning_parser import Qwen3ReasoningParser

QWEN_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
QWEN_THINK_OPEN = QWEN_PROMPT + "<think>\n"
QWEN_NO_THINKING = QWEN_PROMPT + "<think>\n\n</think>\n\n"
R1_PROMPT = "<｜begin▁of▁sentence｜><｜User｜>What is 6 times 7?<｜Assistant｜><think>\n"
R1_OLD_PROMPT = "<｜begin▁of▁sentence｜><｜User｜>What is 6 times 7?<｜Assistant｜>"

THOUGHT = "The user asks for the capital of France.\nThat is Paris; no <tools> needed."


def test_qwen3_splits_a_think_block_the_output_opens():
    check_reasoning_output(
        Qwen3ReasoningParser,
        QWEN_PROMPT,
        f"<think>\n{THOUGHT}\n</think>\n\nThe capital is Paris.",
        THOUGHT,
        "The capital is Paris.",
    )


def test_qwen3_splits_a_think_block_the_prompt_opened():
    check_reasoning_output(
        Qwen3ReasoningParser,
        QWEN_THINK_OPEN,
        f"{THOUGHT}\n</think>\n\nParis.\n\nIt is on the Seine.",
        THOUGHT,
        "Paris.\n\nIt is on the Seine.",
    )


def test_qwen3_output_without_think_is_all_content():
    check_reasoning_output(Qwen3ReasoningParser, QWEN_PROMPT, "\nParis, of course.", "", "\nParis, of course.")
    check_reasoning_output(Qwen3ReasoningParser, QWEN_PROMPT, "I <think> it is Paris.", "", "I <think> it is Paris.")


def test_qwen3_with_thinking_off_is_all_content():
    check_reasoning_output(Qwen3ReasoningParser, QWEN_NO_THINKING, "Paris.", "", "Paris.")
    assert Qwen3ReasoningParser(QWEN_NO_THINKING).structural_prefix() is None


def test_qwen3_unclosed_think_block_was_all_reasoning():
    check_reasoning_output(
        Qwen3ReasoningParser, QWEN_PROMPT, "<think>\nHmm, Paris or Lyon?\n", "Hmm, Paris or Lyon?\n", ""
    )


def test_deepseek_r1_output_is_reasoning_until_the_end_tag():
    check_reasoning_output(
        DeepSeekR1ReasoningParser,
        R1_PROMPT,
        "Okay, 6 times 7 is 42.\n</think>\n\nThe answer is **42**.",
        "Okay, 6 times 7 is 42.",
        "The answer is **42**.",
    )


def test_deepseek_r1_drops_a_think_tag_the_model_writes():
    check_reasoning_output(
        DeepSeekR1ReasoningParser, R1_OLD_PROMPT, "<think>\nOkay, 42.\n</think>\n\n42", "Okay, 42.", "42"
    )


def test_deepseek_r1_without_the_end_tag_was_all_reasoning():
    check_reasoning_output(DeepSeekR1ReasoningParser, R1_PROMPT, "Okay, let me think", "Okay, let me think", "")


def test_reasoning_parsers_hold_back_a_partial_end_tag():
    parser = DeepSeekR1ReasoningParser(R1_PROMPT)
    first = parser.feed("So 42.</thi")
    assert (first.reasoning, first.content) == ("So 42.", "")
    second = parser.feed("nk>\n\n42")
    assert (second.reasoning, second.content) == ("", "42")


def test_structural_prefix_follows_the_prompt():
    opened = DeepSeekR1ReasoningParser(R1_PROMPT).structural_prefix()
    assert opened is not None and opened["elements"][0]["begin"] == ""
    may_think = Qwen3ReasoningParser(QWEN_PROMPT).structural_prefix()
    assert may_think is not None and may_think["type"] == "optional"
    assert may_think["content"]["elements"][0]["begin"] == "<think>"


def test_reasoning_parsers_are_registered_by_name():
    assert REASONING_PARSERS == {"deepseek_r1": DeepSeekR1ReasoningParser, "qwen3": Qwen3ReasoningParser}
    assert get_reasoning_parser("qwen3") is Qwen3ReasoningParser
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("o1")
