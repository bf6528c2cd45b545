"""Decode on random weights of a model shape, in process: tokens/s of decode-only steps at each batch size, for bf16
weights, FP8 weights (`--quantization fp8`, torch._scaled_mm) and FP8 weights with an FP8 KV cache
(`--kv-cache-dtype fp8`). Issue 15's "FP8 vs bf16 for the 1B and 8B Llama shapes" rows, and with a mixture-of-experts
shape (`--variants bf16`) its "Mixtral- and Qwen3-MoE-shaped models at batch 1 and 256, tokens/s and the expert
kernel's share of a step" rows. `--layers N` keeps the first N layers of a shape too large for the card.

    python -m weir_bench.quant_decode --shape Llama-3.2-1B --batch-sizes 1,256 --out DIR
    python -m weir_bench.quant_decode --shape Qwen3-30B-A3B --layers 12 --variants bf16 --batch-sizes 1,256
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from weir_bench.engines import engine_core
from weir_bench.gpu import SHAPES, Shape, save_report, write_model_dir

VARIANTS = {"bf16": (None, "auto"), "fp8": ("fp8", "auto"), "fp8+fp8kv": ("fp8", "fp8")}  # quantization, KV dtype

# Shapes beside the GPU harness's two: the config.json fields of Llama-3.1-8B, Mixtral-8x7B and Qwen3-30B-A3B.
LLAMA_31_8B = Shape(
    "Llama-3.1-8B",
    dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    ),
)  # fmt: skip
MIXTRAL_8X7B = Shape(
    "Mixtral-8x7B",
    dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    model_type="mixtral",
    architecture="MixtralForCausalLM",
)  # fmt: skip
QWEN3_30B_A3B = Shape(
    "Qwen3-30B-A3B",
    dict(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645,
    ),
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
)  # fmt: skip
DECODE_SHAPES = {**SHAPES, **{s.name: s for s in (LLAMA_31_8B, MIXTRAL_8X7B, QWEN3_30B_A3B)}}


def _tokenizer_dir(given: Path | None, scratch: Path) -> Path:
    """The tokenizer to copy beside config.json: the one given, else a word-level one (ids only matter here)."""
    if given is not None and given.is_dir():
        return given
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    out = scratch / "tokenizer"
    tokenizer.save_pretrained(out)
    return out


def decode_rate(core: Any, batch: int, prompt_tokens: int, steps: int, vocab: int, seed: int) -> float:
    """Tokens/s over `steps` decode-only steps of `batch` sequences, after their prefill and a few warm steps."""
    import torch

    from weir_server.engine.types import GenerationRequest, SamplingParams

    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    ids = [f"{seed}-{i}" for i in range(batch)]
    for request_id in ids:
        prompt = torch.randint(3, vocab, (prompt_tokens,), generator=gen).tolist()
        core.add_request(core.validate(GenerationRequest(request_id, prompt, params)))
    seen: set[str] = set()
    warm = 0
    while len(seen) < batch or warm < 4:
        outputs = core.step()
        seen.update(out.request_id for out in outputs if out.token_ids)
        warm += len(seen) == batch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += sum(len(out.token_ids) for out in core.step())
    elapsed = time.perf_counter() - started
    for request_id in ids:
        core.abort_request(request_id)
    while core.has_unfinished():
        core.step()
    return tokens / elapsed, elapsed / steps


def experts_ms(model: Any, batch: int, iters: int = 20) -> tuple[float, int]:
    """(ms of one layer's routed experts on `batch` random tokens, replayed from a CUDA graph as the decode step
    runs them and timed with CUDA events; MoE layers). The share of a step is the first times the second over the
    step's time: the routing is random, as it is on random weights. (Timed eagerly, the launches' host time made
    one layer's experts look longer than a whole graphed step at batch 1.)"""
    import torch

    from weir_server.layers.fused_moe import FusedMoE

    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    if not layers or not torch.cuda.is_available():
        return float("nan"), len(layers)
    moe = layers[0]
    weight = moe.w13_weight
    hidden = torch.randn(batch, moe.hidden_size, dtype=weight.dtype, device=weight.device)
    logits = torch.randn(batch, moe.num_experts, dtype=weight.dtype, device=weight.device)
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (Triton compiles here)
            for _ in range(3):
                moe(hidden, logits)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            moe(hidden, logits)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, len(layers)


def _blocks_needed(batch: int, args: argparse.Namespace, block_size: int = 16) -> int:
    per_sequence = -(-(args.prompt_tokens + args.steps + 16) // block_size)
    return batch * per_sequence + 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weir_bench.quant_decode", description=__doc__)
    parser.add_argument("--shape", default="Llama-3.2-1B", choices=sorted(DECODE_SHAPES))
    parser.add_argument("--layers", type=int, help="keep the shape's first N layers (a model too large for the card)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per row")
    parser.add_argument("--tokenizer-dir", type=Path, default=Path(".gpu_assets/tokenizer"))
    parser.add_argument("--out", type=Path, help="folder for quant-decode.md and .json")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement); cpu only checks that it runs")
    args = parser.parse_args(argv)

    import torch

    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
    from weir_server.models.loader import load_model

    batches = [int(b) for b in args.batch_sizes.split(",")]
    shape = DECODE_SHAPES[args.shape]
    layers = shape.config["num_hidden_layers"]
    if args.layers:
        layers = min(args.layers, layers)
        shape = dataclasses.replace(shape, config={**shape.config, "num_hidden_layers": layers})
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {', '.join(sorted(unknown))}; choose among {', '.join(VARIANTS)}")
    scratch = Path(tempfile.mkdtemp(prefix="weir-quant-decode-"))
    model_dir = write_model_dir(shape, _tokenizer_dir(args.tokenizer_dir, scratch), scratch / "model")
    rows: list[dict[str, Any]] = []
    names = [v for v in args.variants.split(",") if args.device != "cpu" or v != "fp8+fp8kv"]  # refused on CPU
    for name in names:
        quantization, kv_dtype = VARIANTS[name]
        model = ModelConfig(
            str(model_dir), load_format="dummy", dtype="bfloat16", device=args.device, quantization=quantization
        )
        config = EngineConfig(
            model=model,
            # Blocks for every sequence's prompt and tokens, not a share of the GPU: rows never wait on the memory
            # an earlier variant may still hold.
            cache=CacheConfig(cache_dtype=kv_dtype, num_blocks=_blocks_needed(max(batches), args)),
            scheduler=SchedulerConfig(max_num_seqs=max(batches), max_num_batched_tokens=8192),
            executor=ExecutorConfig(cuda_graph_max_batch=max(batches)),
        )
        loaded = load_model(model)
        weights_gib = torch.cuda.memory_allocated() / 2**30 if args.device != "cpu" else float("nan")
        core = engine_core(loaded, config)
        for batch in batches:
            rate, step_s = decode_rate(core, batch, args.prompt_tokens, args.steps, shape.config["vocab_size"], batch)
            moe_ms, moe_layers = experts_ms(loaded.model, batch)
            share = moe_ms * moe_layers / (step_s * 1e3) if moe_layers else float("nan")
            rows.append({
                "weights": name, "batch": batch, "tokens_per_s": round(rate, 1), "weights_gib": weights_gib,
                "step_ms": round(step_s * 1e3, 3), "experts_ms_per_layer": moe_ms, "experts_share": share,
            })  # fmt: skip
            experts = f"experts {moe_ms:.3f} ms x {moe_layers} = {share:.0%}" if moe_layers else ""
            print(f"{name:>14}  batch {batch:>4}  {rate:10.1f} tok/s  step {step_s * 1e3:.2f} ms  {experts}  "
                  f"(model {weights_gib:.2f} GiB)", flush=True)  # fmt: skip
        del core, loaded
        gc.collect()
        if args.device != "cpu":
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if args.device != "cpu" else "CPU"
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["weights"] == "bf16"}
    of_layers = f" ({layers} of {DECODE_SHAPES[args.shape].config['num_hidden_layers']} layers)" if args.layers else ""
    lines = [
        f"Decode, {shape.name} shape{of_layers}, random weights, {device_name}, "
        f"prompts of {args.prompt_tokens} tokens, {args.steps} decode steps timed",
        "",
        "| weights | batch | tokens/s | vs bf16 | step ms | experts' share | model GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / base[r["batch"]] if base.get(r["batch"]) else float("nan")
        share = "" if math.isnan(r["experts_share"]) else f"{r['experts_share']:.0%}"
        lines.append(
            f"| {r['weights']} | {r['batch']} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | {r['step_ms']:.2f} | {share} "
            f"| {r['weights_gib']:.2f} |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    save_report(args.out, "quant-decode", markdown, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
