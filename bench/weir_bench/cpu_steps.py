"""`weir bench cpu-steps`: where a CPU engine step's time goes as many streams' contexts grow, in process.

N greedy streams decode together (no server, no network); the table gives the median step time at points of their
context, and `--profile-at` a cProfile of a few steps there (the C++ ops show as built-in methods). `--attention`
times the decode-attention op alone, for the model's head layout, every layer's cache its own (so reads come from
memory, as in a step) with shuffled block tables.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weir bench cpu-steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="packaged name, directory or GGUF file")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--profile-at", type=int, default=None, help="cProfile 5 decode steps from this one")
    parser.add_argument(
        "--attention", default=None, help="comma list of context lengths: time the attention op alone at each"
    )
    return parser


def _core(args: argparse.Namespace) -> Any:
    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
    from weir_server.engine.core import EngineCore
    from weir_server.models.loader import load_model

    model = ModelConfig(args.model, device="cpu")
    blocks = args.streams * (-(-(args.prompt_tokens + args.output_tokens) // 16) + 1) + 1
    tokens = max(2048, args.streams * args.prompt_tokens)
    scheduler = SchedulerConfig(max_num_seqs=args.streams, max_num_batched_tokens=tokens)
    config = EngineConfig(model, CacheConfig(num_blocks=blocks), scheduler, ExecutorConfig())
    return EngineCore(load_model(model, "generate"), config)


def step_times(core: Any, args: argparse.Namespace) -> list[float]:
    """Seconds of each engine step until every stream has its output tokens (prefill steps first)."""
    import torch

    from weir_server.engine.types import GenerationRequest, SamplingParams

    steps = args.output_tokens
    params = SamplingParams(max_tokens=steps, min_tokens=steps, ignore_eos=True, temperature=0.0)
    prompts = torch.randint(3, core.vocab_size, (args.streams, args.prompt_tokens), generator=torch.Generator())
    for i, prompt in enumerate(prompts.tolist()):
        core.add_request(core.validate(GenerationRequest(f"steps-{i}", prompt, params)))
    times: list[float] = []
    profile = cProfile.Profile()
    while core.has_unfinished():
        profiling = args.profile_at is not None and args.profile_at <= len(times) < args.profile_at + 5
        if profiling:
            profile.enable()
        started = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - started)
        if profiling:
            profile.disable()
    if args.profile_at is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    return times


def attention_ms(core: Any, contexts: list[int], block_size: int = 16) -> list[float]:
    """Milliseconds of one step's decode attention over all layers, `streams` sequences at each context length."""
    import torch

    from weir_server.kernels.cpu_ops import cpu_ops

    ops, hf = cpu_ops(), core.runner.hf_config
    layers, heads, kv_heads = hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    streams, dtype = core.config.scheduler.max_num_seqs, core.runner.dtype
    out = []
    for context in contexts:
        per_seq = context // block_size + 1
        shape = (streams * per_seq, block_size, kv_heads, head_dim)
        caches = [(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)) for _ in range(layers)]
        q = torch.randn(streams, heads, head_dim).to(dtype)
        k, v = torch.randn(streams, kv_heads, head_dim).to(dtype), torch.randn(streams, kv_heads, head_dim).to(dtype)
        cos, sin = torch.randn(streams, head_dim // 2).to(dtype), torch.randn(streams, head_dim // 2).to(dtype)
        tables = torch.randperm(streams * per_seq).to(torch.int32).view(streams, per_seq)
        lens = torch.full((streams,), context, dtype=torch.int32)
        starts = torch.arange(streams + 1, dtype=torch.int32)
        slots = tables[:, (context - 1) // block_size].long() * block_size + (context - 1) % block_size

        runs = []
        for i in range(8):  # the first a warm-up
            started = time.perf_counter()
            for kc, vc in caches:
                ops.decode_attention(q, k, v, cos, sin, kc, vc, tables, lens, starts, slots, head_dim**-0.5, 0, 0.0)
            if i:
                runs.append(time.perf_counter() - started)
        out.append(1e3 * statistics.median(runs))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run `weir bench cpu-steps` and print step milliseconds by context (and the attention op's)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    core = _core(args)
    times = step_times(core, args)
    decode = times[-args.output_tokens :]
    print(f"| context (tokens) | step ms, median of 8 ({args.streams} streams) |")
    print("|---:|---:|")
    for at in range(0, len(decode) - 7, max(8, len(decode) // 6)):
        print(f"| {args.prompt_tokens + at} | {1e3 * statistics.median(decode[at : at + 8]):.1f} |")
    print(f"whole run: {sum(times):.2f} s")
    if args.attention:
        contexts = [int(c) for c in args.attention.split(",")]
        for context, ms in zip(contexts, attention_ms(core, contexts), strict=True):
            print(f"decode attention, {args.streams} sequences at {context} tokens, all layers: {ms:.1f} ms")
    return 0
