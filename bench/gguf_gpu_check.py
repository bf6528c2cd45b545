"""One call on the GPU machine for the packed-GGUF path: the `gpu` tests of tests/server/quant, the Triton
matmul against bf16 F.linear on Llama-3.2-1B shapes, and decode tokens/s of a random 1B model in a Q4_K_M mix
(packed) against the same shape in bf16, both through PagedRunner (eager), plus a CUDA-graph capture of one
packed decode step. Run from the repository root: python3 bench/gguf_gpu_check.py [OUT_DIR]."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = ["tests/server/quant", "tests/server/models"]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402
from gguf_blocks import random_rows, write_random_q4_k_m  # noqa: E402
from paged_runner import PagedRunner, save_tiny_tokenizer  # noqa: E402

from weir_server.config import ModelConfig  # noqa: E402
from weir_server.kernels.gguf_dequant import Q4_0, Q4_K, Q6_K, Q8_0, dequantize  # noqa: E402
from weir_server.kernels.gguf_matmul import gguf_matmul  # noqa: E402
from weir_server.models.loader import load_model  # noqa: E402

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "gguf-gpu-out")
HIDDEN, FFN, LAYERS, HEADS, KV, VOCAB = 2048, 8192, 16, 32, 8, 128256
rows: list[dict] = []


def time_matmul(layer: str, qtype, raw: torch.Tensor, dense: torch.Tensor, m: int) -> None:
    x = torch.randn(m, dense.shape[1], device="cuda", dtype=torch.bfloat16)
    want = x.double() @ dense.double().t()
    err = ((gguf_matmul(x, raw, qtype).double() - want).norm() / want.norm()).item()
    t_q = triton.testing.do_bench(lambda: gguf_matmul(x, raw, qtype), return_mode="median")
    t_d = triton.testing.do_bench(lambda: F.linear(x, dense), return_mode="median")
    row = dict(
        kind="matmul",
        layer=layer,
        qtype=qtype.name,
        m=m,
        packed_ms=t_q,
        bf16_ms=t_d,
        packed_gbps=raw.numel() / t_q / 1e6,
        rel_err=err,
    )
    rows.append(row)
    print(json.dumps(row), flush=True)


def kernels() -> None:
    shapes = {"gate_up": (2 * FFN, HIDDEN), "down": (HIDDEN, FFN), "lm_head": (VOCAB, HIDDEN)}
    for name, (n, k) in shapes.items():
        for qtype in (Q4_K, Q6_K, Q4_0, Q8_0) if name == "gate_up" else (Q4_K, Q6_K):
            raw = random_rows(qtype, n, k, scale=1e-4).cuda()
            dense = dequantize(raw, qtype).to(torch.bfloat16)
            for m in (1, 256):
                time_matmul(name, qtype, raw, dense, m)
            del raw, dense
            torch.cuda.empty_cache()


def write_gguf(folder: Path) -> Path:
    return write_random_q4_k_m(
        folder / "random-1b-Q4_K_M.gguf",
        hidden=HIDDEN,
        ffn=FFN,
        layers=LAYERS,
        heads=HEADS,
        kv_heads=KV,
        vocab=VOCAB,
        context=4096,
        rope_base=500000.0,
    )


def decode_speed(label: str, loaded, batch: int, steps: int = 32) -> None:
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=16, num_blocks=batch * 8 + 8)
    ids = list(range(batch))
    runner.step([(i, list(range(3, 35))) for i in ids])  # 32-token prompts
    runner.step([(i, [5]) for i in ids])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        runner.step([(i, [7]) for i in ids])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = dict(
        kind="decode",
        model=label,
        batch=batch,
        tok_per_s=batch * steps / seconds,
        ms_per_step=seconds / steps * 1e3,
        gpu_mem_gib=torch.cuda.memory_allocated() / 2**30,
    )
    rows.append(row)
    print(json.dumps(row), flush=True)


def graph_capture(loaded) -> None:
    """One packed decode step captured in a CUDA graph and replayed: same logits as eager."""
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=16, num_blocks=16)
    runner.step([(0, list(range(3, 20)))])
    from weir_server.layers.attention_metadata import AttentionMetadata

    ids = torch.tensor([7], device="cuda")
    pos = torch.tensor([17], device="cuda")
    block = runner.blocks[0]
    attn = AttentionMetadata(
        slot_mapping=torch.tensor([block[1] * 16 + 1], device="cuda"),
        block_tables=torch.tensor([block], dtype=torch.int32, device="cuda"),
        context_lens=torch.tensor([18], dtype=torch.int32, device="cuda"),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
        max_query_len=1,
        max_context_len=18,
        block_size=16,
        query_lens_cpu=[1],
        context_lens_cpu=[18],
    )
    model = loaded.model
    with torch.inference_mode():
        eager = model.compute_logits(model(ids, pos, runner.kv_caches, attn))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model.compute_logits(model(ids, pos, runner.kv_caches, attn))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model.compute_logits(model(ids, pos, runner.kv_caches, attn))
        graph.replay()
        torch.cuda.synchronize()
    row = dict(kind="cuda_graph", captured=True, max_abs_diff=(out - eager).abs().max().item())
    rows.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "-m",
            "gpu",
            "tests/server/quant/",
        ],
        capture_output=True,
        text=True,
    )
    (OUT / "pytest.txt").write_text(tests.stdout + tests.stderr)
    print(
        "gpu tests:",
        tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-2000:],
        flush=True,
    )
    kernels()
    folder = OUT / "model"
    folder.mkdir(exist_ok=True)
    save_tiny_tokenizer(folder, VOCAB)
    path = write_gguf(folder)
    print("gguf MiB", path.stat().st_size / 2**20, flush=True)
    packed = load_model(
        ModelConfig(str(path), device="cuda", dtype="bfloat16", tokenizer=str(folder), keep_quantized=True)
    )
    for batch in (1, 32):
        decode_speed("gguf-packed", packed, batch)
    try:
        graph_capture(packed)
    except Exception as error:  # report and go on: the table matters more
        print("cuda graph capture failed:", repr(error)[:500], flush=True)
    del packed
    torch.cuda.empty_cache()
    dense = load_model(
        ModelConfig(str(path), device="cuda", dtype="bfloat16", tokenizer=str(folder), load_format="dummy")
    )
    for batch in (1, 32):
        decode_speed("bf16-dummy", dense, batch)
    (OUT / "rows.json").write_text(json.dumps(rows, indent=1))
    path.unlink()


if __name__ == "__main__":
    main()
