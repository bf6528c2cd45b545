"""`weir bench tp`: tensor parallelism on the GPUs of one host: greedy tokens of tp=2 against tp=1, then decode
speed of each.

1. Llama-3.2-1B shape, float32, dummy weights (seed 0): the greedy tokens with --tensor-parallel-size 2 must
   equal those of one GPU (exit code 1 otherwise).
2. Llama-3.2-1B and Llama-3-8B shapes, bfloat16, dummy weights: output tokens/s and inter-token latency for
   batches of 1 and 32 (128-token prompts, 128 new tokens each), one GPU against two; the table is printed
   (and written to --out-dir). bf16 greedy agreement is reported too (sums in another order may flip near-ties).

Runs the scheduler, the model runner (with its CUDA graphs) and greedy argmax; imports no gRPC code.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from weir_bench.gpu import save_report

if TYPE_CHECKING:
    from weir_server.config import EngineConfig
    from weir_server.executor.model_runner import ModelRunner

# NVLink multicast stays off in this process and, by inheritance, in the workers it starts: a program that uses
# it can put a shared host's GPUs out of service.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
    ),
}  # fmt: skip
BATCHES = (1, 32)
PROMPT_LEN, OUTPUT_LEN = 128, 128
T = TypeVar("T")


def write_model_dir(root: Path, name: str) -> Path:
    """config.json of the shape and a small tokenizer (dummy weights need no tokenizer of the full vocabulary)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
        initializer_range=0.02, bos_token_id=0, eos_token_id=1, **SHAPES[name],
    ).save_pretrained(directory)  # fmt: skip
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(directory)
    return directory


def engine_config(directory: Path, dtype: str, tp: int, num_blocks: int | None, eager: bool) -> EngineConfig:
    from weir_server.config import (
        CacheConfig,
        EngineConfig,
        ExecutorConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
    )

    return EngineConfig(
        model=ModelConfig(str(directory), load_format="dummy", dtype=dtype, device="cuda", seed=0),
        cache=CacheConfig(block_size=16, num_blocks=num_blocks, gpu_memory_utilization=0.5),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192),
        executor=ExecutorConfig(enforce_eager=eager, cuda_graph_max_batch=64),
        parallel=ParallelConfig(tensor_parallel_size=tp, collective_timeout_s=120),
    )


@dataclass
class Run:
    tokens: list[list[int]]
    seconds: float
    itl_ms: float  # mean gap between consecutive tokens of a sequence


def generate(runner: ModelRunner, prompts: list[list[int]], max_tokens: int) -> Run:
    """Greedy decoding through the scheduler and the model runner, as the engine steps them."""
    from weir_server.config import SchedulerConfig
    from weir_server.engine.block_manager import BlockManager
    from weir_server.engine.scheduler import Scheduler
    from weir_server.engine.sequence import Sequence as Seq
    from weir_server.engine.types import FinishReason, SamplingParams

    block_manager = BlockManager(runner.num_blocks, runner.block_size, enable_prefix_caching=False)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192), block_manager)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    seqs = [Seq(f"r{i}", 0, prompt, params) for i, prompt in enumerate(prompts)]
    stamps: dict[int, list[float]] = {seq.seq_id: [] for seq in seqs}
    started = time.perf_counter()
    scheduler.add(seqs)
    while scheduler.has_unfinished():
        output = scheduler.schedule()
        result = runner.execute(output.scheduled)
        scheduler.update(output)
        if not result.sample_seqs:
            continue
        chosen = result.sample_logits.argmax(dim=-1).tolist()
        now = time.perf_counter()
        for scheduled, token in zip(result.sample_seqs, chosen, strict=True):
            seq = scheduled.seq
            seq.append_token(token, None)
            stamps[seq.seq_id].append(now)
            if seq.num_output_tokens >= max_tokens:
                seq.finish(FinishReason.LENGTH)
                scheduler.finish(seq)
    seconds = time.perf_counter() - started
    gaps = [b - a for times in stamps.values() for a, b in zip(times, times[1:], strict=False)]
    return Run([seq.output_token_ids for seq in seqs], seconds, 1000 * sum(gaps) / max(1, len(gaps)))


def random_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128000, (length,), generator=generator).tolist() for _ in range(count)]


class Group:
    """One model at one tensor-parallel size: workers started, rank 0's shard loaded, its runner built."""

    def __init__(self, config: EngineConfig) -> None:
        from weir_server.executor.model_runner import ModelRunner
        from weir_server.executor.tp_executor import launch
        from weir_server.models.loader import load_model

        started = time.perf_counter()
        self.exit_on_worker_death = False  # off while setting up, so a failed CUDA-graph capture can be retried
        self.executor = launch(config, on_worker_death=self._worker_died)
        try:
            self.loaded = load_model(config.model, "generate")
            self.runner = ModelRunner(self.loaded, config, self.executor)  # rank 0 sends each batch to the workers
            if self.executor is not None and self.executor.failure:
                raise RuntimeError(self.executor.failure)
        except BaseException:
            if self.executor is not None:
                self.executor.shutdown()
            raise
        self.exit_on_worker_death = True
        self.setup_s = time.perf_counter() - started

    def _worker_died(self, message: str) -> None:
        print(f"!! {message}", flush=True)
        if self.exit_on_worker_death:
            os._exit(3)  # rank 0 may wait forever in a collective with the dead worker

    def close(self) -> None:
        import torch

        del self.runner, self.loaded  # graphs and weights go before the group they were captured with
        gc.collect()
        torch.cuda.empty_cache()
        if self.executor is not None:
            self.executor.shutdown()


def with_group(config: EngineConfig, work: Callable[[Group], T]) -> T:
    """Run `work(group)`; if CUDA-graph capture fails under tensor parallelism, say so and retry eagerly."""
    try:
        group = Group(config)
    except Exception:
        if config.executor.enforce_eager:
            raise
        traceback.print_exc()
        print("!! setup with CUDA graphs failed; retrying with --enforce-eager", flush=True)
        config = replace(config, executor=replace(config.executor, enforce_eager=True))
        group = Group(config)
    try:
        print(
            f"   tp={config.parallel.tensor_parallel_size} {config.model.dtype}: set up in {group.setup_s:.1f}s, "
            f"{group.runner.num_blocks} KV blocks, graphs={'on' if group.runner.graphs is not None else 'off'}",
            flush=True,
        )
        return work(group)
    finally:
        group.close()


def check_equality(root: Path) -> bool:
    """The 1B shape in float32: tp=2's greedy tokens equal tp=1's."""
    directory = write_model_dir(root, "llama-3.2-1b")
    prompts = [p[:n] for p, n in zip(random_prompts(4, 250, seed=1), (7, 33, 100, 250), strict=True)]
    outputs = {}
    for tp in (1, 2):
        config = engine_config(directory, "float32", tp, num_blocks=None, eager=False)
        outputs[tp] = with_group(config, lambda g: generate(g.runner, prompts, 32).tokens)
    equal = outputs[1] == outputs[2]
    print(f"== 1B shape, float32, 4 prompts x 32 greedy tokens: tp=2 {'EQUALS' if equal else 'DIFFERS FROM'} tp=1")
    if not equal:
        for a, b in zip(outputs[1], outputs[2], strict=True):
            print("   tp1", a, "\n   tp2", b)
    return equal


def measure(group: Group, name: str, tp: int, rows: list[dict[str, Any]]) -> list[list[int]]:
    """Time each batch size; returns the greedy tokens of the largest batch."""
    tokens: list[list[int]] = []
    for batch in BATCHES:
        generate(group.runner, random_prompts(batch, PROMPT_LEN, seed=99), 4)  # warm-up: kernels of these shapes
        run = generate(group.runner, random_prompts(batch, PROMPT_LEN, seed=batch), OUTPUT_LEN)
        row = {
            "model": name, "tp": tp, "batch": batch, "out_tok_s": sum(map(len, run.tokens)) / run.seconds,
            "itl_ms": run.itl_ms, "seconds": run.seconds, "graphs": group.runner.graphs is not None,
        }  # fmt: skip
        rows.append(row)
        print(f"   {json.dumps(row)}", flush=True)
        tokens = run.tokens
    return tokens


def bench(root: Path, rows: list[dict[str, Any]]) -> None:
    """Every shape at tp 1 and 2, in bf16; appends the timing rows and each shape's greedy agreement."""
    for name in SHAPES:
        directory = write_model_dir(root, name)
        tokens = {
            tp: with_group(
                engine_config(directory, "bfloat16", tp, num_blocks=2048, eager=False),
                functools.partial(measure, name=name, tp=tp, rows=rows),
            )
            for tp in (1, 2)
        }
        prefixes = [_common_prefix(a, b) for a, b in zip(tokens[1], tokens[2], strict=True)]
        agreement = (
            f"{sum(p == OUTPUT_LEN for p in prefixes)}/{len(prefixes)} identical, first token equal in "
            f"{sum(p > 0 for p in prefixes)}/{len(prefixes)}, mean common prefix {sum(prefixes) / len(prefixes):.1f}"
        )
        print(f"== {name} bf16 greedy tokens at tp 1 vs 2: {agreement}", flush=True)
        rows.append({"model": name, "bf16_agreement": agreement})


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def table(rows: list[dict[str, Any]], device: str) -> str:
    """The speed table of bench/RESULTS.md's tensor-parallel section, and the bf16 agreement under it."""
    lines = [
        f"Device: {device}. Dummy weights (seed 0), bf16, {PROMPT_LEN}-token prompts, {OUTPUT_LEN} new tokens "
        "per sequence, greedy; the batch starts together, prefill included in tokens/s; ITL = mean gap between "
        "a sequence's consecutive tokens. Each shape is warmed up first.",
        "",
        "| model | batch | tp=1 out tok/s | tp=2 out tok/s | speed-up | tp=1 ITL ms | tp=2 ITL ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["model"], r["tp"], r["batch"]): r for r in rows if "tp" in r}
    for name in SHAPES:
        for batch in BATCHES:
            one, two = by_key.get((name, 1, batch)), by_key.get((name, 2, batch))
            if one is None or two is None:
                continue
            speedup = float(two["out_tok_s"]) / float(one["out_tok_s"])
            lines.append(
                f"| {name} | {batch} | {one['out_tok_s']:.0f} | {two['out_tok_s']:.0f} | {speedup:.2f}x | "
                f"{one['itl_ms']:.2f} | {two['itl_ms']:.2f} |"
            )
    agreement = [f"{r['model']}: {r['bf16_agreement']}" for r in rows if "bf16_agreement" in r]
    if agreement:
        lines += ["", f"bf16 greedy tokens of the batch-{max(BATCHES)} run, tp 1 vs 2: " + "; ".join(agreement) + "."]
    return "\n".join(lines)


def build_parser(prog: str = "weir bench tp") -> argparse.ArgumentParser:
    """The options of `weir bench tp`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-bench", action="store_true", help="only the equality check")
    parser.add_argument("--out-dir", type=Path, help="also write the table to OUT_DIR/tp.md and the rows to tp.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `weir bench tp`: 0 when tp=2 gives tp=1's float32 greedy tokens, 1 when not, 2 without two GPUs."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.update(NO_MULTICAST)  # before any collective starts, and inherited by the workers
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    if torch.cuda.device_count() < 2:
        print(f"weir bench tp needs 2 GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    device = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    print(device, flush=True)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        equal = check_equality(root)
        print(f"   ({time.perf_counter() - started:.0f}s so far)", flush=True)
        if not args.skip_bench:
            try:
                bench(root, rows)
            finally:
                report = table(rows, device)
                verdict = "equal" if equal else "NOT equal"
                report += f"\n\nGreedy tokens, 1B shape in float32, tp=2 vs tp=1: {verdict}.\n"
                print(report, flush=True)
                save_report(args.out_dir, "tp", report, rows)
    print(f"done in {time.perf_counter() - started:.0f}s", flush=True)
    return 0 if equal else 1
