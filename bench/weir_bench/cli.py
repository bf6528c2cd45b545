"""`weir bench`: run the same load (closed loop at some concurrencies, or open loop at some request rates) against
each target, print one table, and optionally save the result as JSON and plot it; its subcommands
(`weir bench gpu|tp|kernels|host-profile|cpu-steps|gguf|structured|plot ...`) are the other harnesses."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weir_bench import lora, multitenant
from weir_bench.dataset import DATASETS, DatasetError, DatasetPrompts, load_sharegpt, sample
from weir_bench.load import Driver, LoadSpec, make_prompts, run_load
from weir_bench.peers import TargetError, cpu_cores, peak_rss_bytes
from weir_bench.prefix import PrefixSpec, PromptPair, make_pairs, run_prefix_pairs
from weir_bench.progress import Progress
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
from weir_bench.result import result_document, save_result
from weir_bench.targets import TARGETS, VocabBound, plan_targets

logger = logging.getLogger("weir_bench")
# The other harnesses, each a module with `main(argv) -> int` (imported on use: most need torch and a GPU).
SUBCOMMANDS = {
    "gpu": ("weir_bench.gpu_cli", "GPU: Weir in-process and over gRPC vs Hugging Face transformers; greedy check"),
    "tp": ("weir_bench.tp", "GPUs of one host: tensor parallelism, greedy equality and decode speed"),
    "kernels": ("weir_bench.kernels", "GPU: the Triton kernels vs the torch paths they replace"),
    "host-profile": ("weir_bench.host_profile", "CPU: host time per engine step at a large decode batch"),
    "cpu-steps": ("weir_bench.cpu_steps", "CPU: step time of many streams as their contexts grow; attention alone"),
    "gguf": ("weir_bench.gguf", "GGUF weights kept packed vs dequantized at load: CPU memory and speed, GPU kernels"),
    "structured": ("weir_bench.structured", "JSON-schema-constrained streams beside free-text ones, over gRPC"),
    "plot": ("weir_bench.plot", "plot a --save-result JSON file: throughput, TTFT and ITL against the load"),
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _rate_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated request rates (or inf), got {text!r}") from exc
    if not values or any(math.isnan(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive request rates (or inf), got {text!r}")
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
        description="Closed- or open-loop load on Weir (gRPC or in-process) and OpenAI-compatible peers; "
        "prints one table (and saves JSON or a plot on request).",
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
    t.add_argument(
        "--model",
        default="",
        help="model id sent to Weir (default: the server's default); --scenario lora: the model it serves "
        "(as `weir serve` takes it, default smollm2-135m-instruct)",
    )
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
    w.add_argument("--scenario", choices=("throughput", "prefix", "multi-tenant", "lora"), default="throughput")
    w.add_argument(
        "--concurrency",
        type=_int_list,
        help="closed loop: streams in flight; a comma list runs each level in turn (default 1,8,32)",
    )
    w.add_argument(
        "--request-rate",
        type=_rate_list,
        help="open loop instead: mean requests per second, Poisson arrivals from --seed (inf: all at once); "
        "a comma list runs each rate in turn",
    )
    w.add_argument(
        "--max-concurrency",
        type=int,
        help="open loop: cap on requests in flight; later arrivals wait for a slot (default: no cap)",
    )
    w.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="open loop: gamma shape of the gaps between arrivals; 1 is Poisson, lower is burstier",
    )
    w.add_argument(
        "--requests",
        type=int,
        help="measured requests per point (default: max(16, 4 x concurrency), or max(16, 4 x rate) open loop)",
    )
    w.add_argument(
        "--warmup", type=int, help="unmeasured requests before each point (default: the concurrency, or its cap)"
    )
    w.add_argument(
        "--dataset-name",
        choices=DATASETS,
        default="random",
        help="prompts: random ids, a ShareGPT file, or rewrite: passages and code to copy with edits (input-grounded)",
    )
    w.add_argument("--dataset-path", type=Path, help="ShareGPT-style JSON file for --dataset-name sharegpt")
    w.add_argument("--prompt-tokens", type=int, default=128, help="random dataset: token ids per prompt (default 128)")
    w.add_argument(
        "--output-tokens",
        "--output-len",
        type=int,
        help="tokens generated per request, EOS ignored (default 64; sharegpt: each answer's own length)",
    )
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    w.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    w.add_argument("--vocab-size", type=int, help="draw prompt ids below this (default: asked of the target)")
    w.add_argument("--prefix-tokens", type=int, default=1000, help="prefix scenario: shared prompt tokens")
    w.add_argument("--suffix-tokens", type=int, default=8, help="prefix scenario: differing tokens after it")
    w.add_argument("--repeats", type=int, default=3, help="prefix scenario: (cold, cached) pairs, median reported")
    w.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")

    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    o.add_argument("--save-result", type=Path, help="also write the run (config, metrics, versions) as JSON here")
    o.add_argument("--plot", type=Path, help="also plot throughput, TTFT and ITL against the load into this PNG")
    o.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it shows only when stderr is a terminal)"
    )
    o.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    multitenant.add_arguments(p)
    lora.add_arguments(p)
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.output_tokens is None and args.dataset_name == "random":
        args.output_tokens = 64
    for name in ("prompt_tokens", "output_tokens", "prefix_tokens", "suffix_tokens", "repeats", "max_concurrency"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    _validate_load(p, args)
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


def _validate_load(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The load shape, dataset and outputs; the dataset file is read here so a bad one fails before any load."""
    if args.request_rate is not None and args.concurrency is not None:
        p.error("--request-rate is open loop and --concurrency closed loop; cap open loop with --max-concurrency")
    if args.request_rate is None and args.max_concurrency is not None:
        p.error("--max-concurrency caps open-loop load; give --request-rate too (or use --concurrency)")
    if not args.burstiness > 0:
        p.error("--burstiness must be positive")
    if args.request_rate is None and args.concurrency is None:
        args.concurrency = [1, 8, 32]
    if args.scenario == "prefix" and (args.request_rate or args.dataset_name != "random"):
        p.error("--scenario prefix makes its own prompts, closed loop; drop --request-rate and --dataset-name")
    if args.scenario == "prefix" and (args.save_result or args.plot):
        p.error("--save-result and --plot cover the throughput scenario only")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib (pip install matplotlib)")
    args.dataset = None
    if args.dataset_name == "sharegpt":
        if args.dataset_path is None:
            p.error("--dataset-name sharegpt needs --dataset-path FILE")
        try:
            args.dataset = load_sharegpt(args.dataset_path)
        except DatasetError as exc:
            p.error(str(exc))
    elif args.dataset_path is not None:
        p.error("--dataset-path needs --dataset-name sharegpt")
    elif args.dataset_name == "rewrite":
        from weir_bench.rewrite import rewrite_conversations

        args.dataset = rewrite_conversations()


@dataclass(frozen=True)
class LoadPoint:
    """One point of a sweep: closed loop at `concurrency`, or open loop at `request_rate` capped at `concurrency`."""

    concurrency: int  # open loop: the cap (0: none)
    request_rate: float | None = None

    @property
    def label(self) -> str:
        if self.request_rate is None:
            return f"concurrency {self.concurrency}"
        cap = f", max concurrency {self.concurrency}" if self.concurrency else ""
        return f"rate {self.request_rate:g} req/s{cap}"


def load_points(args: argparse.Namespace) -> list[LoadPoint]:
    """The sweep `args` asks for, in the order given."""
    if args.request_rate is not None:
        return [LoadPoint(args.max_concurrency or 0, rate) for rate in args.request_rate]
    return [LoadPoint(level) for level in args.concurrency]


def _default_requests(point: LoadPoint) -> int:
    if point.request_rate is None:
        return max(16, 4 * point.concurrency)
    if math.isinf(point.request_rate):
        return max(16, 4 * point.concurrency)
    return max(16, math.ceil(4 * point.request_rate))


async def _measure_point(
    driver: Driver,
    args: argparse.Namespace,
    vocab: VocabBound,
    dataset: DatasetPrompts | None,
    index: int,
    point: LoadPoint,
) -> Row:
    requests = args.requests or _default_requests(point)
    warmup = (point.concurrency or 4) if args.warmup is None else args.warmup
    # One prompt set per (seed, point), shared by every target; points never repeat a random prompt, so a
    # prefix cache cannot serve one point from the previous one (closed-loop seeds are the pre-sweep ones).
    seed = args.seed * 1_000_003 + (point.concurrency if point.request_rate is None else 100_000 + index)
    lens: list[int] | None = None
    if dataset is None:
        prompts = make_prompts(warmup + requests, args.prompt_tokens, await vocab.resolve(driver), seed=seed)
    else:
        drawn = sample(await dataset.resolve(driver), warmup + requests, seed)
        prompts, lens = [r.prompt for r in drawn], [r.output_tokens for r in drawn]
    measured = prompts[warmup:]
    mean_output = round(sum(lens[warmup:]) / requests) if lens is not None else args.output_tokens
    spec = LoadSpec(
        point.concurrency,
        requests,
        round(sum(map(len, measured)) / requests),
        mean_output,
        warmup,
        request_rate=point.request_rate,
        burstiness=args.burstiness,
        seed=seed,
    )
    logger.info("%s: %s, %d requests (+%d warm-up)", driver.name, point.label, requests, warmup)
    with Progress(f"{driver.name} {point.label}", requests, enabled=not args.no_progress) as progress:
        result = await run_load(driver, spec, prompts, lens, on_done=progress.update)
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

    # A dataset's pairs stay within 2048 tokens (vLLM's filter); random prompts need what they ask for.
    longest = 2048 if args.dataset is not None else args.prompt_tokens + args.output_tokens
    ctx = args.ctx or _round_up(longest + 1, 256)
    dataset = DatasetPrompts(args.dataset, args.output_tokens) if args.dataset is not None else None
    points = load_points(args)
    rows: list[Row] = []
    for target in plan_targets(args, ctx):
        if target.restart_per_level:
            for i, point in enumerate(points):
                async with target.opener(_slots(point)) as driver:
                    rows.append(await _measure_point(driver, args, vocab, dataset, i, point))
        else:
            async with target.opener(max(map(_slots, points))) as driver:
                for i, point in enumerate(points):
                    rows.append(await _measure_point(driver, args, vocab, dataset, i, point))
    return sort_side_by_side(rows)


def _slots(point: LoadPoint) -> int:
    """Streams a peer sized by slots (llama-server) must hold at this point; open loop without a cap: 32."""
    return point.concurrency or 32


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
    if args.scenario == "multi-tenant":  # replicas behind a gateway: a harness of its own (weir_bench.multitenant)
        return multitenant.main(parser, args)
    if args.scenario == "lora":  # N adapters on one server, one row per adapter count (weir_bench.lora)
        return lora.main(parser, args)
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
    throughput_rows = [row for row in rows if isinstance(row, Row)]
    if args.save_result:
        save_result(args.save_result, result_document(throughput_rows, run_config(args), argv, machine))
        logger.info("saved the result to %s", args.save_result)
    if args.plot:
        from weir_bench.plot import plot_rows, title_of

        config = run_config(args)
        plot_rows(throughput_rows, args.plot, title_of(config, config["mode"]))
        logger.info("plotted the result into %s", args.plot)
    if args.json:
        print(to_json(rows, argv, machine))
    else:
        print(format_header(argv, machine))
        if args.scenario == "throughput":
            print(f"load: {describe_load(args)}")
        print()
        print(format_table(rows))
        for row in rows:
            if isinstance(row, Row) and row.short_outputs:
                print(
                    f"note: {row.target} at concurrency {row.concurrency} returned fewer than "
                    f"{row.output_tokens} tokens for {row.short_outputs} requests (it does not honour ignore_eos)"
                )
    return 1 if any(row.errors for row in rows) else 0


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """What the run asked for, for --save-result: the options (no API key, no dataset text) and the mode."""
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "dataset", "log_level", "json")}
    config["mode"] = "open" if args.request_rate is not None else "closed"
    return config


def describe_load(args: argparse.Namespace) -> str:
    """One line saying the loop shape and the prompts, printed above the table."""
    if args.dataset is not None:
        out = f"{args.output_tokens} tokens" if args.output_tokens else "each answer's length"
        source = f" from {args.dataset_path}" if args.dataset_path else ""
        prompts = f"{args.dataset_name} prompts{source}, output {out}"
    else:
        prompts = f"random prompts of {args.prompt_tokens} tokens, output {args.output_tokens} tokens"
    if args.request_rate is None:
        return f"closed loop at concurrency {','.join(map(str, args.concurrency))}; {prompts}"
    cap = f", at most {args.max_concurrency} in flight" if args.max_concurrency else ""
    if all(math.isinf(r) for r in args.request_rate):
        return f"open loop, every request sent at once{cap}; {prompts}"
    shape = "Poisson" if args.burstiness == 1 else f"gamma (burstiness {args.burstiness:g})"
    rates = ",".join(f"{r:g}" for r in args.request_rate)
    at_once = " (inf: all at once)" if any(math.isinf(r) for r in args.request_rate) else ""
    return f"open loop, {shape} arrivals at {rates} req/s{at_once}{cap}; {prompts}"


if __name__ == "__main__":
    sys.exit(main())
