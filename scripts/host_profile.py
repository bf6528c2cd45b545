"""Where an engine step's host time goes at a large decode batch, measured on the CPU with a model so small
that its forward costs little: what is left is the per-sequence Python work that bounds a GPU step.

    python scripts/host_profile.py --tokenizer DIR [--seqs 512] [--profile]

Decode steps run through the CUDA-graph input preparation (replayed eagerly here), as on the GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path


def tiny_model_dir(tokenizer_dir: Path, out: Path, vocab_size: int) -> Path:
    import shutil

    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab_size,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--seqs", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-gc-freeze", action="store_true")
    parser.add_argument("--run-ahead", action="store_true", help="launch each step before reading the last's tokens")
    parser.add_argument("--no-detokenize", action="store_true", help="as in an engine-core process")
    args = parser.parse_args()

    import torch

    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
    from weir_server.engine.llm_engine import LLMEngine
    from weir_server.engine.types import GenerationRequest, SamplingParams
    from weir_server.executor.cuda_graphs import DecodeGraphs
    from weir_server.models.loader import load_model
    from weir_server.process_lifetime import freeze_startup_objects

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(args.tokenizer, Path(tmp), args.vocab_size)
        model = ModelConfig(str(model_dir), load_format="dummy", dtype="float32", device="cpu", max_model_len=1024)
        loaded = load_model(model, "generate")
        config = EngineConfig(
            model,
            CacheConfig(num_blocks=args.seqs * 16),
            SchedulerConfig(max_num_seqs=args.seqs, max_num_batched_tokens=8192, max_waiting=args.seqs),
            ExecutorConfig(),
        )
        engine = LLMEngine(loaded, config)
        runner = engine.runner
        graphs = DecodeGraphs(runner._graph_forward, runner.device, args.seqs, runner.block_size, 1024)
        graphs.replay = lambda d: graphs.run_eager(d.padded)[: d.num_seqs]  # type: ignore[method-assign]
        runner.graphs = graphs
        engine.overlap_outputs = True
        engine.detokenize_all = not args.no_detokenize
        engine.run_ahead = args.run_ahead
        if not args.no_gc_freeze:
            freeze_startup_objects()  # as EngineLoop.run does
        params = SamplingParams(
            max_tokens=args.output_tokens, min_tokens=args.output_tokens, ignore_eos=True, temperature=0.0
        )
        gen = torch.Generator().manual_seed(0)
        for i in range(args.seqs):
            prompt = torch.randint(3, args.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
            engine.add_request(engine.validate(GenerationRequest(f"r{i}", prompt, params)))
        while any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        # Decode steps only from here.
        spent: dict[str, float] = {}

        def timed(name: str, owner: object, attr: str) -> None:
            fn = getattr(owner, attr)

            def wrapper(*a: object, **k: object) -> object:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

            setattr(owner, attr, wrapper)

        timed("schedule", engine.scheduler, "schedule")
        timed("prepare inputs", graphs, "prepare")
        timed("model (eager here)", graphs, "replay")
        timed("logits", runner.model, "compute_logits")
        timed("update", engine.scheduler, "update")
        timed("flush (detokenize, outputs)", engine, "_flush")
        timed("sampler", engine.sampler, "sample")
        timed("read back + append", engine, "_take")
        profiler = cProfile.Profile() if args.profile else None
        steps, started = 0, time.perf_counter()
        if profiler:
            profiler.enable()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        if profiler:
            profiler.disable()
        elapsed = time.perf_counter() - started
        for name, total in spent.items():
            print(f"  {name:32s} {total / steps * 1e3:7.2f} ms/step")
        model = spent["model (eager here)"] + spent["logits"]
        print(f"{steps} decode steps at {args.seqs} seqs: {elapsed / steps * 1e3:.2f} ms/step, "
              f"host (all but the model's forward and logits) {(elapsed - model) / steps * 1e3:.2f} ms/step")
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
