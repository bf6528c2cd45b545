"""`weir bench` option parsing: targets, lists and the errors users see."""

from __future__ import annotations

import pytest

from weir_bench.cli import LoadPoint, _validate, build_parser, load_points
from weir_bench.peers import TargetError
from weir_bench.targets import VocabBound


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


def test_request_rates_sweep_open_loop_with_an_optional_cap():
    args = parse(["--request-rate", "2,8,inf", "--max-concurrency", "16"])
    assert args.request_rate == [2.0, 8.0, float("inf")] and args.concurrency is None
    assert [(p.request_rate, p.concurrency) for p in load_points(args)] == [(2.0, 16), (8.0, 16), (float("inf"), 16)]
    assert load_points(parse(["--concurrency", "1,4"])) == [LoadPoint(1), LoadPoint(4)]


def test_openai_url_adds_the_openai_target_and_peer_adds_llama_server():
    args = parse(["--openai-url", "http://127.0.0.1:8000", "--peer", "llama-server"])
    assert args.target == ["grpc", "openai", "llama-server"]


def test_explicit_target_list_is_kept_in_order_without_duplicates():
    assert parse(["--target", "inprocess,grpc,inprocess"]).target == ["inprocess", "grpc"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--target", "openai"],  # no --openai-url
        ["--target", "nope"],
        ["--concurrency", "0"],
        ["--concurrency", "1,x"],
        ["--output-tokens", "0"],
        ["--target", "inprocess", "--start-server"],
        ["--request-rate", "0"],
        ["--request-rate", "x"],
        ["--request-rate", "2", "--concurrency", "4"],  # open and closed loop at once
        ["--max-concurrency", "4"],  # a cap without a rate
        ["--request-rate", "2", "--burstiness", "0"],
        ["--scenario", "prefix", "--request-rate", "2"],
    ],
)
def test_bad_options_exit_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


class _Reports:
    def __init__(self, name: str, vocab: int | None) -> None:
        self.name, self._vocab, self.asked = name, vocab, 0

    async def vocab_size(self) -> int | None:
        self.asked += 1
        return self._vocab


@pytest.mark.asyncio(loop_scope="session")
async def test_the_first_target_that_reports_its_vocabulary_bounds_every_targets_prompts():
    bound = VocabBound(None)
    assert await bound.resolve(_Reports("a", 500)) == 500
    assert await bound.resolve(_Reports("b", None)) == 500  # e.g. a gateway that does not say


@pytest.mark.asyncio(loop_scope="session")
async def test_an_unknown_vocabulary_without_vocab_size_is_a_target_error_and_a_given_one_is_not_asked():
    with pytest.raises(TargetError, match="--vocab-size"):
        await VocabBound(None).resolve(_Reports("gw", None))
    silent = _Reports("gw", None)
    assert await VocabBound(123).resolve(silent) == 123 and silent.asked == 0


def test_in_process_engine_takes_the_same_options_as_weir_serve():
    from weir_bench.inprocess import engine_config_from_server_args
    from weir_bench.targets import weir_server_args

    args = parse(["--server-args", "--kv-cache-memory-gb 0.5 --max-num-seqs 8"])
    assert weir_server_args(args)[-2:] == ["--embed-model", "none"]
    config = engine_config_from_server_args(weir_server_args(args))
    assert config.cache.kv_cache_memory_gb == 0.5 and config.scheduler.max_num_seqs == 8
    with pytest.raises(TargetError):
        engine_config_from_server_args(["--model", "none"])
