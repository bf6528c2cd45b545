"""The GPU sampler inside the engine, on the device: seeded choices repeat whatever else is batched, top_k=1 is
greedy, and sampled decoding keeps up with greedy decoding (no read-back per step, so the engine runs ahead).

    python scripts/gpu_sampling_check.py --tokenizer DIR

SmolLM2-135M shape, random weights (std 0.1), bf16, CUDA graphs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    args = parser.parse_args()

    from gpu_bench import greedy_shape

    from weir_bench.gpu import write_model_dir
    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
    from weir_server.engine.llm_engine import LLMEngine
    from weir_server.engine.types import GenerationRequest, SamplingParams
    from weir_server.models.loader import load_model

    model_dir = write_model_dir(greedy_shape(), args.tokenizer, Path(tempfile.mkdtemp()))
    model = ModelConfig(str(model_dir), load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=1024)
    loaded = load_model(model, "generate")
    config = EngineConfig(
        model, CacheConfig(gpu_memory_utilization=0.3), SchedulerConfig(max_num_seqs=512, max_waiting=4096),
        ExecutorConfig(),
    )  # fmt: skip
    engine = LLMEngine(loaded, config)
    print("run ahead:", engine.run_ahead, flush=True)

    def run(requests: list[GenerationRequest]) -> tuple[dict[str, list[int]], float]:
        for r in requests:
            engine.add_request(engine.validate(r))
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        started = time.perf_counter()
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(out.token_ids)
        return tokens, time.perf_counter() - started

    prompt = list(range(1000, 1032))
    seeded = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, top_k=50, seed=5, ignore_eos=True)
    alone, _ = run([GenerationRequest("s", prompt, seeded)])
    others = [
        GenerationRequest(f"o{i}", list(range(2000 + i, 2040 + i)), SamplingParams(max_tokens=32, temperature=1.0))
        for i in range(31)
    ]
    batched, _ = run([*others[:15], GenerationRequest("s", prompt, seeded), *others[15:]])
    print("seeded alone == seeded in a batch of 32:", alone["s"] == batched["s"], flush=True)
    greedy, _ = run([GenerationRequest("g", prompt, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))])
    top1_params = SamplingParams(max_tokens=32, temperature=1.5, top_k=1, ignore_eos=True)
    top1, _ = run([GenerationRequest("g", prompt, top1_params)])
    print("top_k=1 at temperature 1.5 == greedy:", top1["g"] == greedy["g"], flush=True)
    distinct = len({tuple(t) for t in batched.values()})
    print(f"distinct outputs among the 32 sampled requests: {distinct}", flush=True)

    prompts = [list(range(1000 + i, 1128 + i)) for i in range(512)]
    for name, params in (
        ("greedy", SamplingParams(max_tokens=64, min_tokens=64, temperature=0.0, ignore_eos=True)),
        ("temperature 0.8", SamplingParams(max_tokens=64, min_tokens=64, temperature=0.8, ignore_eos=True)),
        ("temperature 0.8, top_p 0.95", SamplingParams(max_tokens=64, min_tokens=64, temperature=0.8, top_p=0.95,
                                                       ignore_eos=True)),
        ("temperature 0.8, top_k 50, seeded", SamplingParams(max_tokens=64, min_tokens=64, temperature=0.8, top_k=50,
                                                             seed=1, ignore_eos=True)),
    ):  # fmt: skip
        tokens, seconds = run([GenerationRequest(f"{name}-{i}", p, params) for i, p in enumerate(prompts)])
        total = sum(len(t) for t in tokens.values())
        print(f"512 requests 128 -> 64, {name}: {total / seconds:,.0f} tok/s ({seconds:.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
