"""Test helper: tiny random Llama checkpoints in AWQ, GPTQ and FP8 form, written as their tools write them
(safetensors + config.json's quantization_config), beside a transformers model whose weights are the dequantized
values (the reference their logits are checked against)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from family_checks import VOCAB, random_causal_lm
from paged_runner import save_tiny_tokenizer
from safetensors.torch import save_file
from transformers import LlamaConfig

from weir_server.kernels.fp8_matmul import FP8, quantize_weight_per_channel
from weir_server.layers.int4_checkpoint import pack_awq, pack_gptq

# Llama's projections, and Phi-3's fused ones (its checkpoint stores q/k/v and gate/up as one tensor each).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")


def tiny_llama_config() -> LlamaConfig:
    """Hidden 128 and MLP 256 (several groups of 32 or 64 per input), 4 heads of 32, 2 KV heads."""
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip


def _projections(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in PROJECTIONS
    }


def _random_int4(k: int, n: int, group_size: int, gen: torch.Generator, zero_low: int) -> dict[str, torch.Tensor]:
    groups = k // group_size
    return {
        "q": torch.randint(0, 16, (k, n), generator=gen),
        "zeros": torch.randint(zero_low, 16, (groups, n), generator=gen),
        # Scales of the order real ones have for weights of std ~0.05; stored in fp16 as the tools do.
        "scales": (torch.rand((groups, n), generator=gen) * 0.01 + 0.004).half(),
    }


def tiny_phi3_config() -> Any:
    """tiny_llama_config's shape as a Phi-3 (fused q/k/v and gate/up in the checkpoint)."""
    from transformers import Phi3Config

    return Phi3Config(**{k: v for k, v in tiny_llama_config().to_dict().items() if k in _SHARED_KEYS}, pad_token_id=0)


_SHARED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "tie_word_embeddings",
)  # fmt: skip


def write_int4_checkpoint(
    directory: Path,
    method: str,
    group_size: int = 128,
    fmt: str = "gptq",
    desc_act: bool = False,
    sym: bool = False,
    hf_config: Any = None,
) -> torch.nn.Module:
    """A tiny Llama (or `hf_config`'s model) in AWQ (GEMM) or GPTQ (`fmt` gptq / gptq_v2) form; returns the
    transformers reference."""
    hf_config = hf_config or tiny_llama_config()
    model = random_causal_lm(hf_config)
    gen = torch.Generator().manual_seed(11)
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    orders: dict[str, torch.Tensor] = {}
    for name, linear in _projections(model).items():
        k, n = linear.in_features, linear.out_features
        # `gptq` stores zero - 1, so a zero of 0 cannot be written (its historical packing bug): zeros from 1.
        w = _random_int4(k, n, group_size, gen, zero_low=1)
        if sym:
            w["zeros"].fill_(8)
        groups = torch.arange(k) // group_size
        # Act-order sorts the input rows by the Hessian of the layer's input, so projections of one input (q, k, v;
        # gate, up) share it.
        source = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        if source not in orders:
            orders[source] = groups[torch.randperm(k, generator=gen)] if desc_act else groups
        g_idx = orders[source]
        with torch.no_grad():
            dequantized = (w["q"] - w["zeros"][g_idx]) * w["scales"].float()[g_idx]
            linear.weight.copy_(dequantized.t())
        del tensors[f"{name}.weight"]
        if method == "awq":
            packed = pack_awq(w["q"], w["zeros"], w["scales"])
        else:
            packed = pack_gptq(w["q"], w["zeros"], w["scales"], g_idx, zero_offset=1 if fmt == "gptq" else 0)
        tensors |= {f"{name}.{kind}": t for kind, t in packed.items()}
    if method == "awq":
        quant = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    else:
        quant = {
            "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "checkpoint_format": fmt,
        }  # fmt: skip
    _save(directory, hf_config, tensors, quant)
    return model


def write_fp8_checkpoint(
    directory: Path, per_channel: bool, static: bool = False, hf_config: Any = None
) -> torch.nn.Module:
    """A tiny Llama (or `hf_config`'s model) with e4m3 projection weights and per-tensor or per-channel scales;
    returns the reference."""
    hf_config = hf_config or tiny_llama_config()
    model = random_causal_lm(hf_config)
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    for name, linear in _projections(model).items():
        weight = linear.weight.detach()
        if per_channel:
            q, scale = quantize_weight_per_channel(weight)
            stored_scale = scale.view(-1, 1)  # compressed-tensors' [N, 1]
        else:
            scale = weight.abs().amax().clamp(min=1e-12) / 448.0
            q = (weight / scale).to(FP8)
            stored_scale = scale.reshape(())
        with torch.no_grad():
            linear.weight.copy_(q.float() * stored_scale.float().reshape(-1, 1) if per_channel else q.float() * scale)
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale"] = stored_scale.float()
        if static:
            tensors[f"{name}.input_scale"] = torch.tensor(0.01)
    quant = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    _save(directory, hf_config, tensors, quant)
    return model


def fp8_on_load_reference(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with each projection replaced by its per-channel e4m3 quantize-dequantize (--quantization fp8)."""
    for linear in _projections(model).values():
        q, scale = quantize_weight_per_channel(linear.weight.detach())
        with torch.no_grad():
            linear.weight.copy_(q.float() * scale.view(-1, 1))
    return model


def _save(directory: Path, hf_config: Any, tensors: dict[str, torch.Tensor], quant: dict[str, Any] | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config.to_dict()
    if quant is not None:
        config["quantization_config"] = quant
    (directory / "config.json").write_text(json.dumps(config))
    save_tiny_tokenizer(directory, VOCAB)


def rewrite_config(directory: Path, **quant: Any) -> None:
    """Change keys of the checkpoint's quantization_config (bad-input tests)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] |= quant
    path.write_text(json.dumps(config))
