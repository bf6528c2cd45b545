"""`weir bench gpu sampling`: sampled decoding against greedy decoding in the engine core on a GPU.

The GPU sampler reads nothing back per step, so the engine runs ahead for sampled requests too; this measures
whether sampled decoding keeps up. SmolLM2-135M shape, random weights (std 0.1), bf16, CUDA graphs, 512 requests
of 128 -> 64 tokens per row, rows run one after the other. Its correctness (seeded requests repeat, top_k=1 is
greedy) is tested in tests/server/gpu.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from weir_bench.engines import engine_core, run_to_completion
from weir_bench.gpu import write_model_dir
from weir_bench.greedy import greedy_shape

NUM_REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 512, 128, 64


def sampling_modes() -> list[tuple[str, dict[str, Any]]]:
    """The rows, as SamplingParams keyword arguments on top of a fixed length with EOS ignored."""
    return [
        ("greedy", {"temperature": 0.0}),
        ("temperature 0.8", {"temperature": 0.8}),
        ("temperature 0.8, top_p 0.95", {"temperature": 0.8, "top_p": 0.95}),
        ("temperature 0.8, top_k 50, seeded", {"temperature": 0.8, "top_k": 50, "seed": 1}),
    ]


def build_core(tokenizer_dir: Path) -> Any:
    """The engine core over the SmolLM2 shape with dummy weights on the GPU, with room for every request."""
    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
    from weir_server.models.loader import load_model

    model_dir = write_model_dir(greedy_shape(), tokenizer_dir, Path(tempfile.mkdtemp(prefix="weir-sampling-")))
    model = ModelConfig(str(model_dir), load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=1024)
    config = EngineConfig(
        model, CacheConfig(gpu_memory_utilization=0.3), SchedulerConfig(max_num_seqs=512, max_waiting=4096),
        ExecutorConfig(),
    )  # fmt: skip
    return engine_core(load_model(model, "generate"), config)


def measure(tokenizer_dir: Path) -> list[tuple[str, float]]:
    """Output tokens per second of each sampling mode, after a warm-up of 32 sampled requests."""
    from weir_server.engine.types import GenerationRequest, SamplingParams

    core = build_core(tokenizer_dir)
    warmup = SamplingParams(max_tokens=32, temperature=1.0, ignore_eos=True)
    run_to_completion(core, [GenerationRequest(f"w{i}", list(range(2000 + i, 2040 + i)), warmup) for i in range(32)])
    prompts = [list(range(1000 + i, 1000 + i + PROMPT_TOKENS)) for i in range(NUM_REQUESTS)]
    rows = []
    for name, options in sampling_modes():
        params = SamplingParams(max_tokens=OUTPUT_TOKENS, min_tokens=OUTPUT_TOKENS, ignore_eos=True, **options)
        started = time.perf_counter()
        tokens = run_to_completion(core, [GenerationRequest(f"{name}-{i}", p, params) for i, p in enumerate(prompts)])
        seconds = time.perf_counter() - started
        rows.append((name, sum(map(len, tokens.values())) / seconds))
        print(f"{NUM_REQUESTS} requests {PROMPT_TOKENS} -> {OUTPUT_TOKENS}, {name}: {rows[-1][1]:,.0f} tok/s "
              f"({seconds:.2f} s)", flush=True)  # fmt: skip
    return rows


def table(rows: list[tuple[str, float]]) -> str:
    """The rows as the Markdown table of bench/RESULTS.md."""
    return "\n".join(["| sampling | tok/s |", "|---|---:|", *(f"| {name} | {rate:,.0f} |" for name, rate in rows)])
