"""PEFT LoRA adapters made in the tests: peft's `get_peft_model` over a randomly initialised transformers model of the
base model's shape, with random non-zero B matrices (peft starts them at zero, which would change nothing), saved with
`save_pretrained` (adapter_config.json + adapter_model.safetensors). Importable from every test folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


def make_adapter(
    model_dir: Path,
    out: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    targets: Sequence[str] = ATTENTION,
    seed: int = 0,
    scale: float = 0.5,
    gguf_file: str | None = None,
    config_overrides: dict[str, int] | None = None,
) -> Path:
    """An adapter for the model whose config is in `model_dir` (`gguf_file` there for a GGUF model), saved in `out`.
    `config_overrides` changes the shape (to make an adapter that does not fit the base model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = (
        AutoConfig.from_pretrained(model_dir, gguf_file=gguf_file)
        if gguf_file
        else AutoConfig.from_pretrained(model_dir)
    )
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)
    return out
