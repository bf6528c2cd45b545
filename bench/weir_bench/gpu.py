"""GPU comparison pieces: the two model shapes, random-weight model folders, and the Hugging Face peers.

Weir runs with `--load-format dummy` over a folder holding only a config and a tokenizer; the transformers
peers build the same config with random weights, so every target computes the same shapes.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weir_bench.load import LoadResult, LoadSpec, RequestTiming
from weir_bench.peers import process_tree

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """A model shape, as the keyword arguments of its transformers config (LlamaConfig unless `model_type` says)."""

    name: str
    config: dict[str, Any]
    model_type: str = "llama"
    architecture: str = "LlamaForCausalLM"


SMOLLM2_135M = Shape(
    "SmolLM2-135M",
    dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1, eos_token_id=2,
    ),
)  # fmt: skip
LLAMA_32_1B = Shape(
    "Llama-3.2-1B",
    dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    ),
)  # fmt: skip
SHAPES = {s.name: s for s in (SMOLLM2_135M, LLAMA_32_1B)}


def hf_config(shape: Shape) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(shape.model_type, architectures=[shape.architecture], **shape.config)


def write_model_dir(shape: Shape, tokenizer_dir: Path, out: Path) -> Path:
    """A folder `weir serve --load-format dummy` can load: the shape's config.json and a tokenizer's files.

    The tokenizer only turns ids into text here; ids past its vocabulary decode to nothing.
    """
    out.mkdir(parents=True, exist_ok=True)
    hf_config(shape).save_pretrained(out)
    for file in tokenizer_dir.iterdir():
        if file.is_file() and file.name != "config.json":
            (out / file.name).write_bytes(file.read_bytes())
    return out


def cuda_missing(command: str) -> str | None:
    """Why `command` cannot run here (no CUDA device), or None when it can."""
    import torch

    return None if torch.cuda.is_available() else f"{command} needs a CUDA device; none is visible here"


# ---- GPU memory ---------------------------------------------------------------------------------------------


def gpu_memory_of(pid: int) -> float | None:
    """MiB of GPU memory a process and its children (an engine-core process) hold now (nvidia-smi), or None
    when it cannot be read."""
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed: %s", exc)
        return None
    family = {str(p) for p in process_tree(pid)}
    rows = (line.split(",") for line in text.splitlines())
    used = [float(f[1]) for f in rows if len(f) == 2 and f[0].strip() in family]
    return sum(used) if used else None


# ---- Hugging Face peers -------------------------------------------------------------------------------------


def hf_model(shape: Shape, seed: int = 0) -> Any:
    """transformers' LlamaForCausalLM of the shape, random bf16 weights, on the GPU."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_config(shape))
    return model.to(torch.bfloat16).eval()


def _generation_config(new_tokens: int, min_tokens: bool = True) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens if min_tokens else None, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip


def hf_static(model: Any, prompts: list[list[int]], batch_size: int, spec: LoadSpec) -> LoadResult:
    """`generate` over fixed batches, one after another. Per-token times are not observable inside `generate`:
    TTFT is a batch's 1-token `generate` time, ITL (batch time - TTFT) / (tokens - 1), for each request."""
    import torch

    def run(chunk: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(chunk, device="cuda")
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=_generation_config(new_tokens)
            )
        torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
        return time.perf_counter() - started

    run(prompts[:batch_size], 4)  # warm-up
    ttft = run(prompts[:batch_size], 1)
    timings: list[RequestTiming] = []
    started = time.perf_counter()
    for first in range(0, spec.num_requests, batch_size):
        chunk = prompts[first : min(first + batch_size, spec.num_requests)]
        t0 = time.perf_counter()
        elapsed = run(chunk, spec.output_tokens)
        itl = (elapsed - ttft) / max(spec.output_tokens - 1, 1)
        for _ in chunk:
            timing = RequestTiming(start=started)  # every request was there from the start, as for the others
            timing.events = [(t0 + ttft + i * itl, 1) for i in range(spec.output_tokens)]
            timing.end = t0 + elapsed
            timings.append(timing)
    return LoadResult(spec, timings, time.perf_counter() - started)


def hf_continuous(model: Any, prompts: list[list[int]], spec: LoadSpec) -> LoadResult:
    """transformers' continuous batching (`generate_batch`), every request submitted at once."""
    config = _generation_config(spec.output_tokens, min_tokens=False)
    model.generate_batch(inputs=prompts[:8], generation_config=_generation_config(4, min_tokens=False))
    started = time.perf_counter()
    results = model.generate_batch(inputs=prompts[: spec.num_requests], generation_config=config)
    duration = time.perf_counter() - started
    timings: list[RequestTiming] = []
    for output in results.values():
        timing = RequestTiming(start=started)
        count = len(output.generated_tokens)
        stamps = getattr(output, "timestamps", None) or []
        if len(stamps) == count and count:
            timing.events = [(t, 1) for t in stamps]
        elif count:
            timing.events = [(started + duration, count)]  # no per-token times: all at the end
        timing.end = started + duration
        timing.error = getattr(output, "error", None)
        timings.append(timing)
    return LoadResult(spec, timings, duration)


def greedy_agreement(want: dict[str, list[int]], got: dict[str, list[int]]) -> dict[str, Any]:
    """Compare two runs' greedy tokens per prompt: how many match fully, and where the first differs."""
    mismatches = {}
    for key, tokens in want.items():
        other = got.get(key, [])
        first = next((i for i, (a, b) in enumerate(zip(tokens, other, strict=False)) if a != b), None)
        if first is None and len(tokens) != len(other):
            first = min(len(tokens), len(other))
        if first is not None:
            mismatches[key] = first
    return {"prompts": len(want), "identical": len(want) - len(mismatches), "first_difference": mismatches}


def save_report(out_dir: Path | None, stem: str, markdown: str, rows: list[dict[str, Any]] | None = None) -> None:
    """Write OUT_DIR/STEM.md (and the rows as STEM.json, NaN as null) when an output folder was asked for."""
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(markdown + "\n")
    if rows is not None:
        clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        (out_dir / f"{stem}.json").write_text(json.dumps(clean, indent=1))
