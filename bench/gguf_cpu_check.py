"""Resident memory and single-stream decode tokens/s of a GGUF on the CPU, for the packed path against the
dequantize-at-load one (run once with and once without --keep-quantized). Optionally writes a random Q4_K_M-style file
first. Usage: python bench/gguf_cpu_check.py MODEL [--write-q4km PATH] [--steps 32] [--repeats 3]"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).parents[1] / "tests/server/quant"),
    str(Path(__file__).parents[1] / "tests/server/models"),
]


def rss_mib() -> dict[str, int]:
    """Resident MiB, all and anonymous (the heap: weights); freed heap is handed back to the OS first."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) // 1024 for key in ("VmRSS", "RssAnon", "RssFile")}


def write_q4km(path: Path) -> None:
    """A random 12-layer model (hidden 768, ffn 2048, vocab 32000) in Q4_K_M's mix of Q4_K and Q6_K."""
    from gguf_blocks import write_random_q4_k_m
    from paged_runner import save_tiny_tokenizer

    save_tiny_tokenizer(path.parent, 32000)
    write_random_q4_k_m(
        path, hidden=768, ffn=2048, layers=12, heads=12, kv_heads=4, vocab=32000, context=2048, rope_base=10000.0
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tokenizer")
    parser.add_argument("--write-q4km", action="store_true", help="write a random Q4_K_M-style file at MODEL first")
    parser.add_argument("--keep-quantized", action="store_true", help="GGUF blocks kept packed (--quantization gguf)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    from paged_runner import PagedRunner

    import weir_server
    from weir_server.config import ModelConfig
    from weir_server.models.loader import load_model

    if args.write_q4km and not Path(args.model).exists():
        write_q4km(Path(args.model))
    torch.set_num_threads(os.cpu_count() or 1)
    gc.collect()
    before = rss_mib()
    started = time.perf_counter()
    config = ModelConfig(args.model, device="cpu", tokenizer=args.tokenizer, keep_quantized=args.keep_quantized)
    loaded = load_model(config)
    load_s = time.perf_counter() - started
    gc.collect()
    after = rss_mib()
    if loaded.dtype == torch.bfloat16:  # what the model runner does to a bf16 CPU model before serving it
        from weir_server.layers.cpu_linear import pack_linear_layers

        pack_linear_layers(loaded.model)
        gc.collect()
    after = rss_mib()
    held = sum(
        t.numel() * t.element_size()
        for t in {**dict(loaded.model.named_parameters()), **dict(loaded.model.named_buffers())}.values()
    )
    speeds = []
    for repeat in range(args.repeats):
        runner = PagedRunner(loaded.model, loaded.hf_config, block_size=16, num_blocks=16)
        runner.step([(repeat, list(range(3, 19)))])
        start = time.perf_counter()
        for _ in range(args.steps):
            runner.step([(repeat, [7])])
        speeds.append(args.steps / (time.perf_counter() - start))
    from weir_server.models.registry import resolve_source

    source = resolve_source(args.model)
    weights = source.directory / str(source.gguf_file)
    file_mib = weights.stat().st_size / 2**20 if source.is_gguf else float("nan")
    print(
        json.dumps(
            dict(
                tree=str(Path(weir_server.__file__).parents[2]),
                model=args.model,
                dtype=str(loaded.dtype),
                file_mib=round(file_mib, 1),
                tensors_mib=round(held / 2**20, 1),
                rss_before_load_mib=before,
                rss_after_load_mib=after,
                anon_model_mib=after["RssAnon"] - before["RssAnon"],
                load_s=round(load_s, 1),
                decode_tok_s=[round(s, 2) for s in speeds],
                loadavg=os.getloadavg(),
            )
        )
    )


if __name__ == "__main__":
    main()
