"""Greedy equality of the GPU path against Weir's CPU float32 path: `weir bench gpu reference` (CPU) writes the
reference's tokens, `weir bench gpu greedy` (GPU) compares against them, and `weir bench gpu run --reference`
does the same before the benchmark.

The SmolLM2 shape runs with seeded dummy weights (the packaged GGUF is too large to carry to a GPU machine; real
weights can be given as a .gguf file), 8 chat prompts x 48 tokens.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from weir_bench.engines import engine_core, run_to_completion
from weir_bench.gpu import SMOLLM2_135M, Shape, greedy_agreement

GREEDY_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
GREEDY_TOKENS = 48
Top2 = dict[str, list[list[float]]]  # per request, per position: [best id, its logprob, runner-up id, its logprob]


def greedy_shape() -> Shape:
    """SmolLM2's shape with wider random weights (std 0.1): at the default 0.02 every prompt greedily repeats
    one token, which would make the comparison trivially pass."""
    return Shape(SMOLLM2_135M.name, {**SMOLLM2_135M.config, "initializer_range": 0.1})


def greedy_prompt_ids(tokenizer_dir: Path) -> list[list[int]]:
    """GREEDY_PROMPTS through the SmolLM2 chat template and tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prompts = []
    for prompt in GREEDY_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def greedy_tokens(
    model_dir: Path,
    prompts: list[list[int]],
    device: str,
    dtype: str,
    enforce_eager: bool = False,
    top2: Top2 | None = None,
) -> dict[str, list[int]]:
    """Greedy tokens for `prompts` through the whole engine core: the SmolLM2 shape with seed-0 dummy weights, or
    real weights when `model_dir` is a .gguf file or holds safetensors. With `top2`, also each position's best two
    candidates, to tell near-ties apart."""
    import torch

    from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
    from weir_server.engine.types import GenerationRequest, SamplingParams
    from weir_server.models.loader import load_model

    # Weights are loaded (or, dummy, drawn) on the CPU and then moved, so every device and dtype computes with the
    # same ones (the loader would draw dummy weights with the target device's generator).
    load_format = "auto" if model_dir.suffix == ".gguf" or (model_dir / "model.safetensors").exists() else "dummy"
    model = ModelConfig(str(model_dir), load_format=load_format, dtype="float32", device="cpu", max_model_len=1024)
    loaded = load_model(model, "generate")
    loaded.dtype, loaded.device = getattr(torch, dtype), torch.device(device)
    loaded.model.to(device=loaded.device, dtype=loaded.dtype)
    config = EngineConfig(
        model,
        CacheConfig(num_blocks=512, gpu_memory_utilization=0.5),
        SchedulerConfig(max_num_seqs=16),
        ExecutorConfig(enforce_eager=enforce_eager, cuda_graph_max_batch=16),
    )
    params = SamplingParams(
        max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2 if top2 is not None else None
    )

    def keep_top2(out: Any) -> None:
        if top2 is not None:
            top2.setdefault(out.request_id, []).extend(
                [e.top[0].token_id, e.top[0].logprob, e.top[1].token_id, e.top[1].logprob] for e in out.logprobs or []
            )

    requests = [GenerationRequest(str(i), ids, params) for i, ids in enumerate(prompts)]
    return run_to_completion(engine_core(loaded, config), requests, keep_top2)


def describe_differences(want: dict[str, list[int]], got: dict[str, list[int]], top2: Top2 | None) -> str:
    """Each first difference, with the reference's margin there (its best minus its second logprob) and whether
    the other path took the reference's runner-up: a small margin and the runner-up is a near-tie broken the
    other way."""
    parts = []
    for key, index in greedy_agreement(want, got)["first_difference"].items():
        text = f"prompt {key}: token {index}"
        entry = (top2 or {}).get(key, [])
        if index < len(entry) and index < len(got[key]):
            _, best, second_id, second = entry[index]
            taken = "runner-up" if got[key][index] == second_id else "another token"
            text += f" (reference margin {best - second:.3f} nats, took the {taken})"
        parts.append(text)
    return "; ".join(parts) or "-"


def greedy_check(model_dir: Path, reference: Path) -> list[str]:
    """The GPU path (fp32 with CUDA graphs, fp32 eager, bf16) against the reference file and this host's CPU path;
    one line per comparison, printed as it comes."""
    saved = json.loads(reference.read_text())
    prompts = saved["prompt_ids"]
    top2 = saved.get("top2")
    references = {"CPU fp32 reference (file)": saved["tokens"]}
    references["CPU fp32 on this machine"] = greedy_tokens(model_dir, prompts, "cpu", "float32")
    cpu_bf16 = greedy_tokens(model_dir, prompts, "cpu", "bfloat16")
    lines = []
    for dtype, eager in (("float32", False), ("float32", True), ("bfloat16", False)):
        got = greedy_tokens(model_dir, prompts, "cuda", dtype, enforce_eager=eager)
        compared = {**references, **({"CPU bf16 on this machine": cpu_bf16} if dtype == "bfloat16" else {})}
        for name, want in compared.items():
            result = greedy_agreement(want, got)
            margins = top2 if name.startswith("CPU fp32") else None
            lines.append(
                f"greedy GPU {dtype} {'eager' if eager else 'CUDA graphs'} vs {name}: {result['identical']}/"
                f"{result['prompts']} prompts identical over {GREEDY_TOKENS} tokens; first differences: "
                + describe_differences(want, got, margins)
            )
            print(lines[-1], flush=True)
        gc.collect()
    return lines


def write_reference(tokenizer_dir: Path, model: Path, out: Path) -> None:
    """The CPU float32 path's greedy tokens (and each position's best two candidates) for GREEDY_PROMPTS."""
    prompts = greedy_prompt_ids(tokenizer_dir)
    top2: Top2 = {}
    tokens = greedy_tokens(model, prompts, "cpu", "float32", top2=top2)
    out.write_text(json.dumps({"prompts": GREEDY_PROMPTS, "prompt_ids": prompts, "tokens": tokens, "top2": top2}))
