"""`weir bench`: run the same closed-loop load against each target and print one table; its subcommands
(`weir bench gpu|tp|kernels|host-profile|structured ...`) are the other harnesses."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from weir_bench.load import Driver, LoadSpec, make_prompts, run_closed_loop
from weir_bench.peers import TargetError, cpu_cores, peak_rss_bytes
from weir_bench.prefix import PrefixSpec, PromptPair, make_pairs, run_prefix_pairs
from weir_bench.report import (
    PrefixRow,
    Row,
    format_header,
    format_table,
    machine_info,
    sort_side_by_side,
    summarize,
    summarize_prefix,
    to_json,
)
from weir_bench.targets import TARGETS, VocabBound, plan_targets

logger = logging.getLogger("weir_bench")
# The other harnesses, each a module with `main(argv) -> int` (imported on use: most need torch and a GPU).
SUBCOMMANDS = {
    "gpu": ("weir_bench.gpu_cli", "GPU: Weir in-process and over gRPC vs Hugging Face transformers; greedy check"),
    "tp": ("weir_bench.tp", "GPUs of one host: tensor parallelism, greedy equality and decode speed"),
    "kernels": ("weir_bench.kernels", "GPU: the Triton kernels vs the torch paths they replace"),
    "host-profile": ("weir_bench.host_profile", "CPU: host time per engine step at a large decode batch"),
    "structured": ("weir_bench.structured", "JSON-schema-constrained streams beside free-text ones, over gRPC"),
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _targets(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    return list(dict.fromkeys(names))


def build_parser(prog: str = "weir bench") -> argparse.ArgumentParser:
    """The options of `weir bench`."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Closed-loop load on Weir (gRPC or in-process) and OpenAI-compatible peers; prints one table.",
        epilog="other harnesses (see `weir bench COMMAND --help`):\n"
        + "\n".join(f"  {name:<13} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t = p.add_argument_group("targets")
    t.add_argument(
        "--target",
        type=_targets,
        help="comma list of grpc, inprocess, openai, llama-server "
        "(default: grpc, plus openai when --openai-url is given); measured in this order",
    )
    t.add_argument("--address", default="127.0.0.1:50051", help="Weir gRPC server HOST:PORT (default %(default)s)")
    t.add_argument("--model", default="", help="model id sent to Weir (default: the server's default)")
    t.add_argument("--server-pid", type=int, help="pid of the Weir server, for its peak RSS")
    t.add_argument("--start-server", action="store_true", help="start `weir serve` on a free port for the run")
    t.add_argument(
        "--server-args",
        default="",
        help="extra `weir serve` options, also used by the in-process "
        'target (e.g. "--kv-cache-memory-gb 2"); --embed-model none is added unless given',
    )
    t.add_argument("--server-timeout", type=float, default=600.0, help="seconds a started server may take to load")
    t.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for an already running server "
        "(--address, --openai-url) to answer; it may still be loading (default %(default)s)",
    )
    t.add_argument("--openai-url", help="base URL of an OpenAI-compatible server (e.g. http://127.0.0.1:8000)")
    t.add_argument("--openai-model", help="model name to send (default: the first one /v1/models lists)")
    t.add_argument("--openai-pid", type=int, help="pid of the --openai-url server, for its peak RSS")
    t.add_argument("--api-key", help="bearer key for --openai-url")
    t.add_argument(
        "--peer",
        choices=("llama-server",),
        action="append",
        default=[],
        help="also start this peer on the same GGUF and load it the same way (adds it to --target)",
    )
    t.add_argument("--llama-server-bin", default="llama-server", help="llama-server executable (default: on PATH)")
    t.add_argument("--gguf", type=Path, help="GGUF file for llama-server (default: the packaged SmolLM2)")
    t.add_argument("--llama-server-args", default="", help="extra llama-server options")
    t.add_argument(
        "--threads",
        type=int,
        default=cpu_cores(),
        help="llama-server threads (default: %(default)s, this machine's cores)",
    )
    t.add_argument("--ctx", type=int, help="llama-server context per slot (default: what the requests need)")

    w = p.add_argument_group("load")
    w.add_argument("--scenario", choices=("throughput", "prefix"), default="throughput")
    w.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 8, 32],
        help="streams in flight; a comma list runs each level in turn (default 1,8,32)",
    )
    w.add_argument("--requests", type=int, help="measured requests per level (default: max(16, 4 x concurrency))")
    w.add_argument("--warmup", type=int, help="unmeasured requests before each level (default: the concurrency)")
    w.add_argument("--prompt-tokens", type=int, default=128, help="random token ids per prompt (default 128)")
    w.add_argument("--output-tokens", type=int, default=64, help="tokens generated per request, EOS ignored")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    w.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    w.add_argument("--vocab-size", type=int, help="draw prompt ids below this (default: asked of the target)")
    w.add_argument("--prefix-tokens", type=int, default=1000, help="prefix scenario: shared prompt tokens")
    w.add_argument("--suffix-tokens", type=int, default=8, help="prefix scenario: differing tokens after it")
    w.add_argument("--repeats", type=int, default=3, help="prefix scenario: (cold, cached) pairs, median reported")
    w.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")

    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    o.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("prompt_tokens", "output_tokens", "prefix_tokens", "suffix_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.requests is not None and args.requests < 1:
        p.error("--requests must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.target is None:
        args.target = ["grpc", "openai"] if args.openai_url else ["grpc"]
    args.target = list(dict.fromkeys([*args.target, *args.peer]))
    if "openai" in args.target and not args.openai_url:
        p.error("--target openai needs --openai-url")
    if args.start_server and "grpc" not in args.target:
        p.error("--start-server starts a gRPC target; add grpc to --target")


async def _measure_level(driver: Driver, args: argparse.Namespace, vocab: VocabBound, concurrency: int) -> Row:
    requests = args.requests or max(16, 4 * concurrency)
    warmup = concurrency if args.warmup is None else args.warmup
    spec = LoadSpec(concurrency, requests, args.prompt_tokens, args.output_tokens, warmup)
    # One prompt set per (seed, level), shared by every target; levels never repeat a prompt, so a prefix
    # cache cannot serve one level from the previous one.
    prompts = make_prompts(
        warmup + requests, args.prompt_tokens, await vocab.resolve(driver), seed=args.seed * 1_000_003 + concurrency
    )
    logger.info("%s: concurrency %d, %d requests (+%d warm-up)", driver.name, concurrency, requests, warmup)
    result = await run_closed_loop(driver, spec, prompts)
    return summarize(driver.name, result, peak_rss_bytes(driver.peak_rss_pid()))


async def _measure_prefix(
    driver: Driver,
    args: argparse.Namespace,
    vocab: VocabBound,
    spec: PrefixSpec,
    pairs: list[PromptPair] | None,
) -> tuple[PrefixRow, list[PromptPair]]:
    """Run the prefix pairs (made on first use: fresh each run, so a long-lived server has none cached)."""
    bound = await vocab.resolve(driver)
    pairs = pairs or make_pairs(spec, bound)
    warmup = make_prompts(1, args.prompt_tokens, bound, seed=args.seed)[0]
    logger.info(
        "%s: prefix scenario, %d pairs of %d + %d tokens",
        driver.name,
        spec.repeats,
        spec.prefix_tokens,
        spec.suffix_tokens,
    )
    timings = await run_prefix_pairs(driver, spec, pairs, warmup)
    row = summarize_prefix(
        driver.name, timings, spec.prefix_tokens, spec.suffix_tokens, peak_rss_bytes(driver.peak_rss_pid())
    )
    return row, pairs


async def run(args: argparse.Namespace) -> list[Row] | list[PrefixRow]:
    """Measure every target of `args` and return the rows (side by side per concurrency level)."""
    vocab = VocabBound(args.vocab_size)
    if args.scenario == "prefix":
        spec = PrefixSpec(args.prefix_tokens, args.suffix_tokens, args.output_tokens, args.repeats)
        ctx = args.ctx or _round_up(spec.prefix_tokens + spec.suffix_tokens + spec.output_tokens + 1, 256)
        prefix_rows: list[PrefixRow] = []
        pairs: list[PromptPair] | None = None
        for target in plan_targets(args, ctx):
            async with target.opener(1) as driver:
                row, pairs = await _measure_prefix(driver, args, vocab, spec, pairs)
                prefix_rows.append(row)
        return prefix_rows

    ctx = args.ctx or _round_up(args.prompt_tokens + args.output_tokens + 1, 256)
    rows: list[Row] = []
    for target in plan_targets(args, ctx):
        if target.restart_per_level:
            for level in args.concurrency:
                async with target.opener(level) as driver:
                    rows.append(await _measure_level(driver, args, vocab, level))
        else:
            async with target.opener(max(args.concurrency)) as driver:
                for level in args.concurrency:
                    rows.append(await _measure_level(driver, args, vocab, level))
    return sort_side_by_side(rows)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def main(argv: Sequence[str] | None = None) -> int:
    """Run `weir bench`; returns 0 when every request succeeded, 1 when some failed, 2 when a target failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        subcommand: int = importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
        return subcommand
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        rows = asyncio.run(run(args))
    except (TargetError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    machine = machine_info()
    if args.json:
        print(to_json(rows, argv, machine))
    else:
        print(format_header(argv, machine))
        print()
        print(format_table(rows))
        for row in rows:
            if isinstance(row, Row) and row.short_outputs:
                print(
                    f"note: {row.target} at concurrency {row.concurrency} returned fewer than "
                    f"{row.output_tokens} tokens for {row.short_outputs} requests (it does not honour ignore_eos)"
                )
    return 1 if any(row.errors for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
