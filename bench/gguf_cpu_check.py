"""Resident memory and single-stream decode tokens/s of a GGUF on the CPU, for the packed path against the
dequantize-at-load one (run once with each tree on PYTHONPATH). Optionally writes a random Q4_K_M-style file
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
    import gguf
    import numpy as np
    from gguf_blocks import random_rows
    from paged_runner import save_tiny_tokenizer

    from weir_server.kernels.gguf_dequant import Q4_K, Q6_K

    hidden, ffn, layers, heads, kv, vocab = 768, 2048, 12, 12, 4, 32000
    save_tiny_tokenizer(path.parent, vocab)
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in (
        (writer.add_context_length, 2048),
        (writer.add_block_count, layers),
        (writer.add_feed_forward_length, ffn),
        (writer.add_embedding_length, hidden),
        (writer.add_rope_dimension_count, hidden // heads),
        (writer.add_rope_freq_base, 10000.0),
        (writer.add_head_count, heads),
        (writer.add_head_count_kv, kv),
        (writer.add_layer_norm_rms_eps, 1e-5),
        (writer.add_vocab_size, vocab),
        (writer.add_bos_token_id, 1),
        (writer.add_eos_token_id, 2),
    ):
        add(value)
    ones = np.ones(hidden, dtype=np.float32)
    writer.add_tensor(
        "token_embd.weight", random_rows(Q6_K, vocab, hidden, 1, 1e-3).numpy(), raw_dtype=gguf.GGMLQuantizationType.Q6_K
    )
    writer.add_tensor("output_norm.weight", ones)
    head_dim = hidden // heads
    for layer in range(layers):
        big = Q6_K if layer % 2 == 0 else Q4_K
        for name, qtype, (n, k) in (
            ("attn_q", Q4_K, (hidden, hidden)),
            ("attn_k", Q4_K, (kv * head_dim, hidden)),
            ("attn_v", big, (kv * head_dim, hidden)),
            ("attn_output", Q4_K, (hidden, hidden)),
            ("ffn_gate", Q4_K, (ffn, hidden)),
            ("ffn_up", Q4_K, (ffn, hidden)),
            ("ffn_down", big, (hidden, ffn)),
        ):
            raw = random_rows(qtype, n, k, seed=layer * 10 + len(name), scale=2e-4).numpy()
            writer.add_tensor(f"blk.{layer}.{name}.weight", raw, raw_dtype=gguf.GGMLQuantizationType(qtype.id))
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", ones)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tokenizer")
    parser.add_argument("--write-q4km", action="store_true", help="write a random Q4_K_M-style file at MODEL first")
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
    loaded = load_model(ModelConfig(args.model, device="cpu", tokenizer=args.tokenizer))
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
