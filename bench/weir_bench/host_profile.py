"""`weir bench host-profile`: where an engine step's host time goes at a large decode batch, measured on the CPU
with a model so small that its forward costs little: what is left is the per-sequence Python work that bounds a
GPU step.

Decode steps run through the CUDA-graph input preparation (replayed eagerly here), as on the GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weir_bench.engines import engine_core


def tiny_model_dir(tokenizer_dir: Path, out: Path, vocab_size: int) -> Path:
    """A one-layer Llama of hidden size 16 over the given tokenizer's files (dummy weights)."""
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab_size,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def build_core(model_dir: Path, args: argparse.Namespace) -> Any:
    """The engine core on the CPU, its decode steps through eagerly replayed CUDA-graph buffers."""
    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
    from weir_server.executor.cuda_graphs import DecodeGraphs
    from weir_server.models.loader import load_model

    model = ModelConfig(str(model_dir), load_format="dummy", dtype="float32", device="cpu", max_model_len=1024)
    config = EngineConfig(
        model,
        CacheConfig(num_blocks=args.seqs * 16),
        SchedulerConfig(max_num_seqs=args.seqs, max_num_batched_tokens=8192, max_waiting=args.seqs),
        ExecutorConfig(),
    )
    core = engine_core(load_model(model, "generate"), config, detokenize_all=not args.no_detokenize)
    runner = core.runner
    graphs = DecodeGraphs(runner._graph_forward, runner.device, args.seqs, runner.block_size, 1024)
    # No graphs on a CPU: the prepared static inputs run eagerly instead of a replay.
    graphs.replay = lambda d: graphs.run_eager(d.padded)[: d.num_seqs]  # type: ignore[method-assign,assignment]
    runner.graphs = graphs
    core.overlap_outputs = True
    core.run_ahead = args.run_ahead
    return core


def prefill(core: Any, args: argparse.Namespace) -> None:
    """Add --seqs requests of random prompts and step until every one is decoding."""
    import torch

    from weir_server.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=args.output_tokens, min_tokens=args.output_tokens, ignore_eos=True,
                            temperature=0.0)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for i in range(args.seqs):
        prompt = torch.randint(3, args.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
        core.add_request(core.validate(GenerationRequest(f"r{i}", prompt, params)))
    while any(s.num_uncomputed_tokens > 1 for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()


def time_parts(core: Any) -> dict[str, float]:
    """Wrap the parts of a step in timers; the returned dict accumulates seconds per part as steps run."""
    spent: dict[str, float] = {}
    graphs = core.runner.graphs

    def timed(name: str, owner: object, attr: str) -> None:
        fn = getattr(owner, attr)

        def wrapper(*a: object, **k: object) -> object:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, wrapper)

    timed("schedule", core.scheduler, "schedule")
    timed("prepare inputs", graphs, "prepare")
    timed("model (eager here)", graphs, "replay")
    timed("logits", core.runner.model, "compute_logits")
    timed("update", core.scheduler, "update")
    timed("flush (detokenize, outputs)", core, "_flush")
    timed("sampler", core.sampler, "sample")
    timed("read back + append", core, "_take")
    return spent


def build_parser(prog: str = "weir bench host-profile") -> argparse.ArgumentParser:
    """The options of `weir bench host-profile`."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tokenizer", type=Path, required=True, help="a tokenizer folder (e.g. `weir bench gpu tokenizer`'s)"
    )
    p.add_argument("--seqs", type=int, default=512, help="sequences decoding together (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--profile", action="store_true", help="also print cProfile's 30 costliest functions")
    p.add_argument("--no-gc-freeze", action="store_true", help="leave the startup objects to the collector")
    p.add_argument("--run-ahead", action="store_true", help="launch each step before reading the last's tokens")
    p.add_argument("--no-detokenize", action="store_true", help="as in an engine-core process")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run `weir bench host-profile` and print milliseconds per decode step, part by part."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from weir_server.process_lifetime import freeze_startup_objects

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        core = build_core(tiny_model_dir(args.tokenizer, Path(tmp), args.vocab_size), args)
        if not args.no_gc_freeze:
            freeze_startup_objects()  # as the engine's loop does once the model is loaded
        prefill(core, args)
        spent = time_parts(core)  # decode steps only from here
        profiler = cProfile.Profile() if args.profile else None
        steps, started = 0, time.perf_counter()
        if profiler:
            profiler.enable()
        while core.has_unfinished():
            core.step()
            steps += 1
        if profiler:
            profiler.disable()
        elapsed = time.perf_counter() - started
        for name, total in spent.items():
            print(f"  {name:32s} {total / steps * 1e3:7.2f} ms/step")
        model = spent["model (eager here)"] + spent["logits"]
        print(
            f"{steps} decode steps at {args.seqs} seqs: {elapsed / steps * 1e3:.2f} ms/step, "
            f"host (all but the model's forward and logits) {(elapsed - model) / steps * 1e3:.2f} ms/step"
        )
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return 0
