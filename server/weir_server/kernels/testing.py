"""Random paged-attention batches for the kernel tests and the GPU check script (no Triton needed), and a runner
for kernel tests in Triton's CPU interpreter."""

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

# Whether the Triton interpreter tests can run here: Triton installed, whether or not this process imported it
# (`HAS_TRITON` is false without a CUDA device; the interpreter runs in a subprocess of its own).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
POISON = 1.0e4  # fills block 0, which no sequence owns: a kernel that reads past a context blows up


@dataclass
class PagedBatch:
    """One step's attention inputs: queries, a layer's cache and the metadata the kernels take."""

    q: torch.Tensor  # [T, H, D]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    max_query_len: int


def random_paged_batch(
    context_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> PagedBatch:
    """Sequences whose blocks are scattered at random over a cache with spare blocks; tables padded by one."""
    if any(q > c for q, c in zip(query_lens, context_lens, strict=True)):
        raise ValueError("a sequence cannot have more query tokens than context tokens")
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    total = sum(blocks_per_seq)
    num_blocks = 1 + total + max(total // 4, 1)  # block 0 is the poisoned padding block
    owned = (torch.randperm(num_blocks - 1, generator=gen, device=device)[:total] + 1).tolist()
    width = max(blocks_per_seq, default=0) + 1
    table = torch.zeros((len(context_lens), width), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = torch.tensor(owned[used : used + n], dtype=torch.int32)
        used += n
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    kv_cache[:, 0] = POISON
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn((starts[-1], num_heads, head_dim), generator=gen, dtype=dtype, device=device)
    return PagedBatch(
        q=q,
        kv_cache=kv_cache,
        block_tables=table.to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        max_query_len=max(query_lens, default=0),
    )


def run_in_triton_interpreter(script: str, test_dir: str, timeout: float = 300) -> None:
    """Run `script` in a fresh Python with TRITON_INTERPRET=1 (read when a kernel is defined, so not in this
    process) and `test_dir` importable; AssertionError with the end of its stderr unless it prints "ok"."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([test_dir, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
