"""`weir bench --dataset-name rewrite`: built-in passages and code whose answers copy the prompt's text."""

from __future__ import annotations

from weir_bench.cli import _validate, build_parser, describe_load


def test_rewrite_prompts_hold_their_answers_and_leave_the_output_length_to_them():
    parser = build_parser()
    args = parser.parse_args(["--dataset-name", "rewrite", "--concurrency", "1"])
    _validate(parser, args)
    assert args.output_tokens is None and len(args.dataset) >= 4
    assert all(c.completion in c.prompt for c in args.dataset)
    assert any(c.completion.startswith(("def ", "class ")) for c in args.dataset)
    assert "rewrite prompts, output each answer's length" in describe_load(args)
