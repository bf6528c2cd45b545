"""`weir bench` option parsing: targets, lists and the errors users see."""

from __future__ import annotations

import pytest
from weir_bench.cli import _validate, build_parser


def parse(argv: list[str]):
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    return args


def test_defaults_measure_the_grpc_server_at_the_issue_levels():
    args = parse([])
    assert args.target == ["grpc"]
    assert args.concurrency == [1, 8, 32]
    assert (args.prompt_tokens, args.output_tokens) == (128, 64)


def test_openai_url_adds_the_openai_target_and_peer_adds_llama_server():
    args = parse(["--openai-url", "http://127.0.0.1:8000", "--peer", "llama-server"])
    assert args.target == ["grpc", "openai", "llama-server"]


def test_explicit_target_list_is_kept_in_order_without_duplicates():
    assert parse(["--target", "inprocess,grpc,inprocess"]).target == ["inprocess", "grpc"]


@pytest.mark.parametrize("argv", [
    ["--target", "openai"],  # no --openai-url
    ["--target", "nope"],
    ["--concurrency", "0"],
    ["--concurrency", "1,x"],
    ["--output-tokens", "0"],
    ["--target", "inprocess", "--start-server"],
])
def test_bad_options_exit_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
