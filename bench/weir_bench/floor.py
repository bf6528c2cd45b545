"""What the hardware allows a row of `weir bench gpu`: the floor on its time, from the shape, the batch, the context
and the GPU's own numbers, so a row reads as a fraction of the limit instead of against another framework.

A decode step must read every weight once and every running sequence's KV once (memory), and multiply 2 x params
per token (compute); it takes at least the longer of the two. A prefill must do 2 x params FLOPs per prompt token
plus its attention. A closed-loop row of B streams, P prompt tokens and O output tokens is then at best one prefill
of B x P tokens and O decode steps whose context grows from P to P + O, per B x O tokens. Everything else a server
does (scheduling, sampling, the API, idle gaps) is what the fraction leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuPeak:
    """A GPU's datasheet limits: HBM bandwidth and dense bf16 tensor-core throughput."""

    name: str
    bytes_per_s: float
    flops: float


# Dense (not sparse) bf16; bandwidth as sold. Matched against torch.cuda.get_device_name() by substring, in order.
GPU_PEAKS = (
    GpuPeak("H200", 4.8e12, 989e12),
    GpuPeak("H100 PCIe", 2.0e12, 756e12),
    GpuPeak("H100 NVL", 3.9e12, 835e12),
    GpuPeak("H100", 3.35e12, 989e12),  # SXM
    GpuPeak("A100-SXM4-80GB", 2.039e12, 312e12),
    GpuPeak("A100", 1.555e12, 312e12),
    GpuPeak("L40S", 0.864e12, 362e12),
)


def gpu_peak(device_name: str) -> GpuPeak | None:
    """The datasheet numbers of the GPU `device_name` (torch's name for it), None when it is not in the table."""
    return next((g for g in GPU_PEAKS if g.name in device_name), None)


@dataclass(frozen=True)
class ModelCost:
    """What one token costs a Llama-shaped model: weights read per step, FLOPs and KV bytes per token."""

    weight_bytes: float  # read by every decode step: every layer and the LM head (not the embedding's lookups)
    flops_per_token: float  # 2 x the multiplied parameters
    kv_bytes_per_token: float  # K and V of one position over all layers
    attn_flops_per_context: float  # QK^T and PV per query token and per context position, all layers

    @classmethod
    def of(cls, config: dict[str, Any], dtype_bytes: int = 2) -> ModelCost:
        """From transformers' LlamaConfig keywords (bench/weir_bench/gpu.py's shapes)."""
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        inter, vocab = config["intermediate_size"], config["vocab_size"]
        attn = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v
        mlp = 3 * hidden * inter
        multiplied = layers * (attn + mlp) + vocab * hidden  # the head multiplies every token too
        return cls(
            weight_bytes=multiplied * dtype_bytes,
            flops_per_token=2.0 * multiplied,
            kv_bytes_per_token=2.0 * layers * kv_heads * head_dim * dtype_bytes,
            attn_flops_per_context=4.0 * layers * heads * head_dim,
        )

    def decode_step_s(self, batch: int, context: float, gpu: GpuPeak) -> float:
        """The least time of one decode step of `batch` sequences of `context` tokens each."""
        memory = (self.weight_bytes + batch * context * self.kv_bytes_per_token) / gpu.bytes_per_s
        compute = batch * (self.flops_per_token + context * self.attn_flops_per_context) / gpu.flops
        return max(memory, compute)

    def prefill_s(self, tokens: int, prompt: int, gpu: GpuPeak) -> float:
        """The least time of prefilling `tokens` tokens in prompts of `prompt` (causal attention: half the square)."""
        flops = tokens * (self.flops_per_token + prompt / 2 * self.attn_flops_per_context)
        return max(flops / gpu.flops, self.weight_bytes / gpu.bytes_per_s)


@dataclass(frozen=True)
class Floor:
    """A row's bound: output tokens/s it cannot exceed, and the least inter-token latency at its batch."""

    output_tokens_per_s: float
    itl_ms: float


def row_floor(cost: ModelCost, gpu: GpuPeak, streams: int, prompt_tokens: int, output_tokens: int) -> Floor:
    """The floor of a closed-loop row: `streams` sequences in flight, each P prompt and O output tokens."""
    steps = [cost.decode_step_s(streams, prompt_tokens + i, gpu) for i in range(output_tokens)]
    total = cost.prefill_s(streams * prompt_tokens, prompt_tokens, gpu) + sum(steps)
    return Floor(streams * output_tokens / total, 1e3 * sum(steps) / len(steps))
