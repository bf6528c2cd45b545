"""Reading a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) onto a model's LoRA layers.

PEFT names a tensor by the Hugging Face module it adapts (`base_model.model.model.layers.3.self_attn.q_proj
.lora_A.weight`); ours fuse q/k/v and gate/up, so each PEFT module becomes a slice of one of our layers
(`LoRATarget`). Every check happens here, before anything reaches the device: a bad adapter is refused with one
line naming the problem, and the model keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from weir_server.errors import InvalidRequestError
from weir_server.layers.lora import FUSED_SLICES, SUPPORTED_MODULES, LoRASpec, LoRATarget

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_TENSOR = re.compile(r"^base_model\.model\.(?P<prefix>.+)\.(?P<module>[a-z_]+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoRAWeights:
    """An adapter in host memory, scaling folded into B: for each of our layers it changes, per output slice, the
    full A [r, in] and B [out, r] (None for a slice it leaves alone)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    layers: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = field(default_factory=dict)
    digest: int = 0  # of the adapter's files: equal adapters, equal digest, on every server


def _refuse(path: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError("path", f"adapter at {path!r}: {problem}")


def read_peft_config(path: str) -> dict[str, Any]:
    """The adapter's config, checked for what Weir serves: plain LoRA on linear layers, nothing saved whole."""
    file = Path(path) / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise _refuse(path, f"{CONFIG_FILE} is missing") from None
    except (OSError, ValueError) as error:
        raise _refuse(path, f"{CONFIG_FILE} is unreadable ({error})") from None
    if not isinstance(config, dict):
        raise _refuse(path, f"{CONFIG_FILE} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _refuse(path, f"peft_type {peft_type!r} is not LoRA")
    if config.get("use_dora"):
        raise _refuse(path, "DoRA adapters (use_dora) are not supported")
    if config.get("modules_to_save"):
        raise _refuse(path, f"modules_to_save {config['modules_to_save']} is not supported (only LoRA matrices)")
    if config.get("bias", "none") != "none":
        raise _refuse(path, f"bias={config['bias']!r} is not supported (only 'none')")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [m for m in SUPPORTED_MODULES if re.fullmatch(targets, m)]
    unsupported = sorted(set(targets) - set(SUPPORTED_MODULES))
    if unsupported:
        allowed = ", ".join(SUPPORTED_MODULES)
        raise _refuse(
            path,
            f"target modules {unsupported} are not supported (the embeddings and LM head stay base-only; "
            f"allowed: {allowed})",
        )
    return config


def read_peft_adapter(path: str, spec: LoRASpec, max_rank: int) -> LoRAWeights:
    """Read and check an adapter against the model's LoRA layers; raise InvalidRequestError naming the problem."""
    config = read_peft_config(path)
    file = Path(path) / WEIGHTS_FILE
    try:
        raw = file.read_bytes()
        tensors = load_file(file)
    except FileNotFoundError:
        raise _refuse(path, f"{WEIGHTS_FILE} is missing (.bin adapters are not supported)") from None
    except (OSError, SafetensorError, ValueError) as error:
        raise _refuse(path, f"{WEIGHTS_FILE} is unreadable ({error})") from None
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode() + raw).digest()
    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", rank))
    weights = LoRAWeights(rank, alpha, (), digest=int.from_bytes(digest[:8], "big") >> 1)
    pairs = _pair_tensors(path, tensors)
    by_slice = {
        (target.name, module): (target, i) for target in spec.values() for i, module in enumerate(target.slice_modules)
    }
    for (prefix, module), (a, b) in sorted(pairs.items()):
        located = _locate(by_slice, prefix, module)
        if located is None:
            raise _refuse(path, f"module {prefix}.{module} has no LoRA layer in this model")
        target, index = located
        r = a.shape[0]
        if r > max_rank:
            raise _refuse(path, f"rank {r} of {prefix}.{module} exceeds --max-lora-rank {max_rank}")
        expected_a, expected_b = (r, target.in_features), (target.slice_sizes[index], r)
        if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise _refuse(
                path,
                f"{prefix}.{module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the base model needs "
                f"{expected_a} and {expected_b}",
            )
        scale = _scaling(config, f"{prefix}.{module}", r)
        slices = weights.layers.setdefault(target.name, [None] * len(target.slice_modules))
        slices[index] = (a.float().contiguous(), (b.float() * scale).contiguous())
    if not weights.layers:
        raise _refuse(path, f"{WEIGHTS_FILE} holds no LoRA matrices")
    weights.rank = max(a.shape[0] for a, _ in pairs.values())
    weights.target_modules = tuple(sorted({module for _, module in pairs}, key=SUPPORTED_MODULES.index))
    return weights


def _pair_tensors(
    path: str, tensors: dict[str, torch.Tensor]
) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(module prefix, PEFT module) -> (A, B), every tensor accounted for."""
    halves: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR.match(name)
        if match is None:
            raise _refuse(
                path, f"tensor {name!r} is not a LoRA matrix Weir can apply (only lora_A/lora_B of linear layers)"
            )
        module = match["module"]
        if module not in SUPPORTED_MODULES:
            raise _refuse(path, f"tensor {name!r} targets {module!r}, which is not supported")
        if tensor.dim() != 2:
            raise _refuse(path, f"tensor {name!r} has shape {tuple(tensor.shape)}, not a matrix")
        halves.setdefault((match["prefix"], module), {})[match["ab"]] = tensor
    pairs = {}
    for key, found in halves.items():
        if set(found) != {"A", "B"}:
            missing = "lora_B" if "A" in found else "lora_A"
            raise _refuse(path, f"{key[0]}.{key[1]} has no {missing}")
        pairs[key] = (found["A"], found["B"])
    return pairs


def _locate(
    by_slice: dict[tuple[str, str], tuple[LoRATarget, int]], prefix: str, module: str
) -> tuple[LoRATarget, int] | None:
    for ours, modules in FUSED_SLICES.items():
        if module in modules:
            return by_slice.get((f"{prefix}.{ours}", module))
    return None


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scale of one module: lora_alpha / r, or / sqrt(r) with rslora; alpha_pattern may override alpha."""
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith(f".{pattern}") or re.fullmatch(pattern, module):
            alpha = float(value)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
