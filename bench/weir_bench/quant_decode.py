"""FP8 against bf16 decode on random weights of a Llama shape, in process: tokens/s of decode-only steps at each
batch size, for bf16 weights, FP8 weights (`--quantization fp8`, torch._scaled_mm) and FP8 weights with an FP8 KV
cache (`--kv-cache-dtype fp8`). Issue 15's "FP8 vs bf16 for the 1B and 8B Llama shapes" row.

    python -m weir_bench.quant_decode --shape Llama-3.2-1B --batch-sizes 1,256 --out DIR
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from weir_bench.engines import engine_core
from weir_bench.gpu import SHAPES, save_report, write_model_dir

VARIANTS = (("bf16", None, "auto"), ("fp8", "fp8", "auto"), ("fp8 + fp8 KV", "fp8", "fp8"))


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
    return tokens / elapsed


def _blocks_needed(batch: int, args: argparse.Namespace, block_size: int = 16) -> int:
    per_sequence = -(-(args.prompt_tokens + args.steps + 16) // block_size)
    return batch * per_sequence + 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weir_bench.quant_decode", description=__doc__)
    parser.add_argument("--shape", default="Llama-3.2-1B", choices=sorted(SHAPES))
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
    shape = SHAPES[args.shape]
    scratch = Path(tempfile.mkdtemp(prefix="weir-quant-decode-"))
    model_dir = write_model_dir(shape, _tokenizer_dir(args.tokenizer_dir, scratch), scratch / "model")
    rows: list[dict[str, Any]] = []
    variants = VARIANTS if args.device != "cpu" else VARIANTS[:2]  # an fp8 KV cache is refused on CPU
    for name, quantization, kv_dtype in variants:
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
            rate = decode_rate(core, batch, args.prompt_tokens, args.steps, shape.config["vocab_size"], seed=batch)
            rows.append({"weights": name, "batch": batch, "tokens_per_s": round(rate, 1), "weights_gib": weights_gib})
            print(f"{name:>14}  batch {batch:>4}  {rate:10.1f} tok/s  (model {weights_gib:.2f} GiB)", flush=True)
        del core, loaded
        gc.collect()
        if args.device != "cpu":
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if args.device != "cpu" else "CPU"
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["weights"] == "bf16"}
    lines = [
        f"FP8 vs bf16 decode, {shape.name} shape, random weights, {device_name}, "
        f"prompts of {args.prompt_tokens} tokens, {args.steps} decode steps timed",
        "",
        "| weights | batch | tokens/s | vs bf16 | model GiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / base[r["batch"]] if base.get(r["batch"]) else float("nan")
        lines.append(
            f"| {r['weights']} | {r['batch']} | {r['tokens_per_s']:.0f} | {ratio:.2f}x | {r['weights_gib']:.2f} |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    save_report(args.out, "quant-decode", markdown, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
