"""The LoRA scenario (issue 17): one `weir serve --enable-lora` holding N random PEFT adapters, loaded with the same
closed-loop work once per adapter count, request i naming adapter i % count (0: the base model alone), so every
step's batch mixes adapters; each row's throughput is reported against the base model's. With `--lora-rounds N` the
counts run N times in turn and each row is the median round: a row of 256 requests lasts about a second on a GPU,
where one run's ratios moved by 20 points between runs of the same tree.

The adapters are written here with numpy and safetensors in PEFT's layout (adapter_config.json and
adapter_model.safetensors, tensors named `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in]
and `...lora_B.weight` [out, r]) for the served model's shape, read from its config: no peft, no torch."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from weir_bench.load import LoadSpec, RequestTiming, make_prompts, run_load
from weir_bench.peers import TargetError, start_weir_server
from weir_bench.report import percentile

logger = logging.getLogger(__name__)

# Each projection's parent module in a Llama-style decoder layer, as PEFT names the tensors.
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_COUNTS = (0, 1, 4, 16)
DEFAULT_MODEL = "smollm2-135m-instruct"
# The target on the GPU: 16 distinct adapters at this share or more of the base model's throughput.
TARGET_ADAPTERS, TARGET_SHARE = 16, 0.8


@dataclass(frozen=True)
class ModelShape:
    """What an adapter's matrices must fit: the decoder's layers and each projection's widths."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    q_size: int  # attention heads x head dim
    kv_size: int  # KV heads x head dim

    def projection(self, module: str) -> tuple[int, int]:
        """(in features, out features) of one projection of a layer."""
        h, inter = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
                "o_proj": (self.q_size, h), "gate_proj": (h, inter), "up_proj": (h, inter),
                "down_proj": (inter, h)}[module]  # fmt: skip


def shape_of(config: Any) -> ModelShape:
    """The shape a transformers config (or anything with its attributes) describes."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return ModelShape(int(config.num_hidden_layers), int(config.hidden_size), int(config.intermediate_size),
                      heads * head_dim, kv_heads * head_dim)  # fmt: skip


def read_model_shape(model: str) -> ModelShape:
    """The shape of the model `weir serve` would load for `model` (packaged short name, directory, .gguf or hub id),
    from its config alone (imports the server lazily, as the in-process target does)."""
    from transformers import AutoConfig

    from weir_server.errors import ModelLoadError
    from weir_server.models.registry import resolve_source

    try:
        source = resolve_source(model)
        config = AutoConfig.from_pretrained(str(source.directory), gguf_file=source.gguf_file)
    except (ModelLoadError, OSError, ValueError, KeyError) as exc:
        raise TargetError(f"model {model!r}: cannot read its config: {' '.join(str(exc).split())}") from exc
    return shape_of(config)


def adapter_tensors(
    shape: ModelShape, rank: int, targets: Sequence[str], seed: int
) -> dict[str, Any]:  # name -> float32 numpy array
    """Random LoRA matrices in PEFT's names for every layer and target: A as PEFT initialises it (uniform within
    1/sqrt(in)), B random and non-zero (PEFT starts it at zero, which would change nothing)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for module in targets:
            fan_in, fan_out = shape.projection(module)
            prefix = f"base_model.model.model.layers.{layer}.{PROJECTIONS[module]}.{module}"
            bound = 1 / math.sqrt(fan_in)
            tensors[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * 0.02).astype(np.float32)
    return tensors


def write_adapter(
    out: Path, shape: ModelShape, rank: int, targets: Sequence[str], seed: int, base_model: str = ""
) -> Path:
    """An adapter folder as PEFT's `save_pretrained` writes it (lora_alpha = 2 x rank, a common choice)."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(adapter_tensors(shape, rank, targets, seed), str(out / "adapter_model.safetensors"))
    return out


def adapter_names(count: int) -> list[str]:
    """The names the scenario serves its adapters under: a0, a1, ..."""
    return [f"a{i}" for i in range(count)]


@dataclass(frozen=True)
class LoRASpec:
    """The run: adapters of `rank` on `targets`, one row per count of `counts`, each `requests` requests (after
    `warmup` unmeasured ones) at `concurrency`, prompts of `prompt_tokens`, `output_tokens` generated (EOS ignored)."""

    model: str = DEFAULT_MODEL
    counts: tuple[int, ...] = DEFAULT_COUNTS
    rank: int = 8
    targets: tuple[str, ...] = DEFAULT_TARGETS
    requests: int = 256
    concurrency: int = 256
    warmup: int = 256
    prompt_tokens: int = 128
    output_tokens: int = 64
    rounds: int = 1


@dataclass(frozen=True)
class LoRARow:
    """One adapter count's result; `relative` is its output throughput over the base model's row (NaN without one).
    Over several rounds: the median round's numbers, `relative` the median of each round's ratio to that round's
    base row, `relative_low`/`relative_high` their range, and the requests and errors of every round."""

    adapters: int
    requests: int = 0
    errors: int = 0
    output_tok_per_s: float = math.nan
    ttft_p50_ms: float = math.nan
    itl_p50_ms: float = math.nan
    relative: float = math.nan
    relative_low: float = math.nan
    relative_high: float = math.nan


def summarize_count(adapters: int, timings: Sequence[RequestTiming], duration_s: float) -> LoRARow:
    """A row from one count's measured requests (`relative` is filled in by `with_relative`)."""
    ok = [t for t in timings if t.ok]
    ttfts = [t.ttft * 1e3 for t in ok if t.ttft is not None]
    itls = [gap * 1e3 for t in ok for gap in t.inter_token_latencies()]
    return LoRARow(
        adapters=adapters,
        requests=len(timings),
        errors=len(timings) - len(ok),
        output_tok_per_s=sum(t.num_output_tokens for t in ok) / duration_s if duration_s > 0 else math.nan,
        ttft_p50_ms=percentile(ttfts, 50),
        itl_p50_ms=percentile(itls, 50),
    )


def with_relative(rows: Sequence[LoRARow]) -> list[LoRARow]:
    """The rows with each one's throughput relative to the base model's (the row with 0 adapters)."""
    base = next((r.output_tok_per_s for r in rows if r.adapters == 0), math.nan)
    return [replace(r, relative=r.output_tok_per_s / base if base > 0 else math.nan) for r in rows]


def combine_rounds(rounds: Sequence[Sequence[LoRARow]]) -> list[LoRARow]:
    """One row per count from several rounds of `with_relative` rows (the same counts in each): the round with the
    median throughput, the median of the rounds' ratios and their range, every round's requests and errors."""
    if len(rounds) == 1:
        return list(rounds[0])
    combined = []
    for per_round in zip(*rounds, strict=True):
        by_speed = sorted(per_round, key=lambda r: r.output_tok_per_s)
        ratios = sorted(r.relative for r in per_round if not math.isnan(r.relative))
        middle = by_speed[(len(by_speed) - 1) // 2]
        combined.append(replace(
            middle, requests=sum(r.requests for r in per_round), errors=sum(r.errors for r in per_round),
            relative=_median(ratios), relative_low=ratios[0] if ratios else math.nan,
            relative_high=ratios[-1] if ratios else math.nan,
        ))  # fmt: skip
    return combined


def _median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


COLUMNS = ("adapters", "requests", "errors", "out tok/s", "TTFT p50 ms", "ITL p50 ms", "vs base")
RANGE_COLUMN = "vs base, rounds"


def format_lora_table(rows: Sequence[LoRARow]) -> str:
    """One line per adapter count (0 reads "base"), columns aligned, as a Markdown table; rows of several rounds
    add the range of the rounds' ratios."""
    ranged = any(not math.isnan(r.relative_low) for r in rows)
    columns = (*COLUMNS, RANGE_COLUMN) if ranged else COLUMNS
    lines = [columns, tuple("-" * len(c) for c in columns)]
    for r in rows:
        line = (
            str(r.adapters) if r.adapters else "0 (base)", str(r.requests), str(r.errors),
            _num(r.output_tok_per_s, ".1f"), _num(r.ttft_p50_ms, ".0f"), _num(r.itl_p50_ms, ".1f"),
            _num(r.relative, ".0%"),
        )  # fmt: skip
        if ranged:
            line = (*line, f"{_num(r.relative_low, '.0%')}-{_num(r.relative_high, '.0%')}")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("| " + " | ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) + " |" for line in lines)


def target_verdict(rows: Sequence[LoRARow]) -> str:
    """The issue's GPU target as measured (16 adapters at >= 80% of the base model's throughput); empty when either
    row is missing."""
    row = next((r for r in rows if r.adapters == TARGET_ADAPTERS), None)
    if row is None or math.isnan(row.relative):
        return ""
    verdict = "met" if row.relative >= TARGET_SHARE and not row.errors else "missed"
    errors = f", {row.errors} failed requests" if row.errors else ""
    spread = "" if math.isnan(row.relative_low) else f", rounds {row.relative_low:.0%}-{row.relative_high:.0%}"
    return (
        f"GPU target (issue 17): {verdict}: {TARGET_ADAPTERS} adapters at {row.relative:.0%} of the base model's "
        f"output throughput (target >= {TARGET_SHARE:.0%}{spread}){errors}"
    )


def _num(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else format(value, fmt)


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated adapter counts, got {text!r}") from exc
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct counts >= 0 (0: the base model alone), got {text!r}")
    return values


def _targets(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    names = [n if n.endswith("_proj") else f"{n}_proj" for n in names]  # q,k,v,o,gate,up,down are accepted too
    unknown = sorted(set(names) - set(PROJECTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown target module(s) {unknown}; choose from {', '.join(PROJECTIONS)}")
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only --scenario lora reads. It also reads --model (the served model, as `weir serve` takes it;
    default smollm2-135m-instruct), --requests and one --concurrency (default 256 each), --warmup (default: the
    concurrency), --prompt-tokens, --output-tokens, --server-args, --server-timeout, --seed and --vocab-size."""
    g = parser.add_argument_group("lora scenario")
    g.add_argument(
        "--lora-counts",
        type=_counts,
        default=list(DEFAULT_COUNTS),
        help="distinct adapters per row, each run in turn; 0 is the base model alone (default 0,1,4,16)",
    )
    g.add_argument("--lora-rank", type=int, default=8, help="rank of the random adapters (default 8)")
    g.add_argument(
        "--lora-rounds",
        type=int,
        default=1,
        help="run the counts this many times in turn and report each count's median round (default 1)",
    )
    g.add_argument(
        "--lora-targets",
        type=_targets,
        default=list(DEFAULT_TARGETS),
        help="comma list of the projections the adapters change, among q,k,v,o,gate,up,down (default q,k,v,o)",
    )


def spec_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> LoRASpec:
    """The run `args` ask for; a bad value is a usage error (exit 2) before anything starts."""
    concurrency = args.concurrency or [256]
    if len(concurrency) != 1:
        parser.error("--scenario lora runs at one --concurrency")
    if args.request_rate is not None or args.dataset_name != "random":
        parser.error("--scenario lora makes its own prompts, closed loop; drop --request-rate/--dataset-name")
    if args.lora_rank < 1:
        parser.error("--lora-rank must be at least 1")
    if args.lora_rounds < 1:
        parser.error("--lora-rounds must be at least 1")
    spec = LoRASpec(
        model=args.model or DEFAULT_MODEL, counts=tuple(args.lora_counts), rank=args.lora_rank,
        targets=tuple(args.lora_targets), requests=args.requests or 256, concurrency=concurrency[0],
        warmup=concurrency[0] if args.warmup is None else args.warmup, prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens or 64, rounds=args.lora_rounds,
    )  # fmt: skip
    for name in ("requests", "concurrency", "prompt_tokens", "output_tokens"):
        if getattr(spec, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if spec.warmup < 0:
        parser.error("--warmup must be >= 0")
    return spec


def serve_args(args: argparse.Namespace, spec: LoRASpec, adapters: dict[str, Path]) -> list[str]:
    """`weir serve` options: the model, every adapter resident at once, and --server-args."""
    from weir_bench.targets import weir_server_args

    modules = [f"{name}={path}" for name, path in adapters.items()]
    lora = ["--enable-lora", "--max-loras", str(max(1, len(adapters))), "--max-lora-rank", str(spec.rank)]
    return ["--model", spec.model, *lora, *(["--lora-modules", *modules] if modules else []), *weir_server_args(args)]


async def _measure_count(
    args: argparse.Namespace, spec: LoRASpec, address: str, count: int, vocab: int, pid: int, round_: int = 0
) -> LoRARow:
    """Warm up, then time `spec.requests` requests where request i names adapter i % count."""
    from weir_bench.grpc_driver import GrpcDriver

    # Fresh prompts per row and round: no row is served from another's prefix cache.
    seed = args.seed * 1_000_003 + round_ * 7_919 + count
    prompts = make_prompts(spec.warmup + spec.requests, spec.prompt_tokens, vocab, seed)
    models = adapter_names(count)  # none: every request names the base model (the server's default)
    if spec.warmup:
        warm = GrpcDriver(address, timeout_s=args.timeout, models=models)
        try:
            load = LoadSpec(spec.concurrency, spec.warmup, spec.prompt_tokens, spec.output_tokens)
            await run_load(warm, load, prompts[: spec.warmup])
        finally:
            await warm.close()
    # A fresh driver, so the measured requests start at adapter 0: request i names adapter i % count.
    driver = GrpcDriver(address, name=f"{count} adapters", pid=pid, timeout_s=args.timeout, models=models)
    try:
        load = LoadSpec(spec.concurrency, spec.requests, spec.prompt_tokens, spec.output_tokens)
        logger.info("adapters %d: %d requests at concurrency %d", count, spec.requests, spec.concurrency)
        result = await run_load(driver, load, prompts[spec.warmup :])
    finally:
        await driver.close()
    return summarize_count(count, result.timings, result.duration_s)


async def run_lora(args: argparse.Namespace, spec: LoRASpec, adapter_dir: Path) -> list[LoRARow]:
    """Write the adapters, start one server holding them all, and measure each count in turn."""
    from weir_bench.grpc_driver import GrpcDriver, grpc_ready

    shape = read_model_shape(spec.model)
    adapters = {
        name: write_adapter(adapter_dir / name, shape, spec.rank, spec.targets, args.seed * 7919 + i, spec.model)
        for i, name in enumerate(adapter_names(max(spec.counts)))
    }
    logger.info(
        "wrote %d adapters of rank %d on %s to %s", len(adapters), spec.rank, ",".join(spec.targets), adapter_dir
    )
    proc, address = await start_weir_server(serve_args(args, spec, adapters), grpc_ready, args.server_timeout)
    try:
        probe = GrpcDriver(address)
        vocab = args.vocab_size or await probe.vocab_size()
        await probe.close()
        if not vocab:
            raise TargetError("the server does not report its vocabulary size; pass --vocab-size")
        rounds = []
        for round_ in range(spec.rounds):
            rows = [await _measure_count(args, spec, address, c, vocab, proc.pid, round_) for c in spec.counts]
            rounds.append(with_relative(rows))
    finally:
        proc.stop()
    return combine_rounds(rounds)


def describe(spec: LoRASpec) -> str:
    """One line saying what the rows measured, printed above the table."""
    return (
        f"lora: {spec.model}, adapters of rank {spec.rank} on {','.join(spec.targets)}; {spec.requests} requests "
        f"(+{spec.warmup} warm-up) at concurrency {spec.concurrency} per row, request i on adapter i % count; random "
        f"prompts of {spec.prompt_tokens} tokens, {spec.output_tokens} output tokens"
        + (f"; the median of {spec.rounds} rounds" if spec.rounds > 1 else "")
    )


def main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`weir bench --scenario lora`: 0 when every request succeeded, 1 when some failed, 2 on a bad target."""
    spec = spec_from_args(parser, args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        with tempfile.TemporaryDirectory(prefix="weir-bench-lora-") as adapter_dir:
            rows = asyncio.run(run_lora(args, spec, Path(adapter_dir)))
    except (TargetError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    verdict = target_verdict(rows)
    if args.json:
        print(json.dumps({"spec": asdict(spec), "rows": [asdict(r) for r in rows], "target": verdict}, indent=1))
    else:
        print(f"{describe(spec)}\n")
        print(format_lora_table(rows))
        if verdict:
            print(f"\n{verdict}")
    return 1 if any(r.errors for r in rows) else 0
