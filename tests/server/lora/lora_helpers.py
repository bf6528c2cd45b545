"""Test helpers for LoRA: a tiny random Llama saved like transformers saves it, PEFT adapters made over that very
model (random non-zero B), the reference logits of transformers + peft, and Weir's through its model runner."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, LoRAConfig, ModelConfig, SchedulerConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.executor.batch import ScheduledSeq, StepSeq, TokenWindow
from weir_server.executor.model_runner import ModelRunner
from weir_server.models.loader import LoadedModel, load_model

VOCAB = 160
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [
    [5, 17, 33, 9, 100],
    [40, 41, 42, 7, 8, 9, 120, 3, 77, 150, 11],
    [12, 99, 23, 54, 65, 76, 87, 98, 109, 110, 121, 132, 143, 154, 4, 15, 26],
    [3, 4, 5, 6, 7, 8, 9, 10, 11],
]


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with GQA (4 query heads, 2 KV heads) and seeded random fp32 weights."""
    shape = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, initializer_range=0.1,
    )  # fmt: skip
    config = LlamaConfig(**(shape | overrides))
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_model(hf_model: LlamaForCausalLM, directory: Path) -> Path:
    """The model as transformers saves it, with a word-level tokenizer beside it for the loader."""
    hf_model.save_pretrained(directory)
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[PAD]"
    ).save_pretrained(directory)
    return directory


def make_peft_model(
    hf_model: torch.nn.Module,
    directory: Path | None = None,
    *,
    rank: int = 8,
    alpha: float = 16,
    targets: Sequence[str] = ALL_MODULES,
    seed: int = 0,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    scale: float = 0.3,
):
    """peft's LoRA over a copy of `hf_model`, with random B (peft starts B at zero); saved in `directory` if given.
    Returns the peft model (the reference)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
    )  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(hf_model), config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    if directory is not None:
        peft_model.save_pretrained(directory)
    return peft_model


def write_adapter(
    hf_config, directory: Path, *, rank: int = 8, alpha: float = 16, targets: Sequence[str] = ALL_MODULES,
    seed: int = 0, use_rslora: bool = False, scale: float = 0.3,
) -> Path:  # fmt: skip
    """A PEFT-format adapter with random A and B for a Llama config, written without peft (for machines without it)."""
    import json

    from safetensors.torch import save_file

    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = hidden // hf_config.num_attention_heads
    kv = hf_config.num_key_value_heads * head_dim
    shapes = {
        "q_proj": ("self_attn", hidden, hidden), "k_proj": ("self_attn", hidden, kv),
        "v_proj": ("self_attn", hidden, kv), "o_proj": ("self_attn", hidden, hidden),
        "gate_proj": ("mlp", hidden, inter), "up_proj": ("mlp", hidden, inter), "down_proj": ("mlp", inter, hidden),
    }  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for module in targets:
            block, fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * scale
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "use_rslora": use_rslora,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def reference_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


_GREEDY: dict[tuple[int, tuple[int, ...], int], list[int]] = {}


def reference_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by re-running the whole sequence (works for peft and plain models alike); remembered."""
    key = (id(model), tuple(prompt), max_new_tokens)
    if key not in _GREEDY:
        _GREEDY[key] = _greedy(model, prompt, max_new_tokens)
    return list(_GREEDY[key])


def _greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(reference_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt) :]


def lora_engine_config(
    directory: Path, lora: LoRAConfig | None = None, num_blocks: int = 256, **scheduler
) -> EngineConfig:
    """A small fp32 CPU engine with LoRA on and prefix caching on."""
    return EngineConfig(
        model=ModelConfig(str(directory), device="cpu", dtype="float32"),
        cache=CacheConfig(block_size=4, num_blocks=num_blocks, enable_prefix_caching=True),
        scheduler=SchedulerConfig(**({"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_waiting": 64} | scheduler)),
        executor=ExecutorConfig(enforce_eager=True, num_threads=1),
        lora=lora if lora is not None else LoRAConfig(max_lora_rank=16, max_loras=4),
    )


def lora_core(
    directory: Path, adapters: dict[str, Path], lora: LoRAConfig | None = None, num_blocks: int = 256, **scheduler
) -> EngineCore:
    """An EngineCore over the saved model with `adapters` (name -> folder) loaded."""
    config = lora_engine_config(directory, lora, num_blocks, **scheduler)
    core = EngineCore(load_model(config.model), config)
    for name, path in adapters.items():
        core.add_adapter(core.read_adapter(name, str(path)))
    return core


def greedy_params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_requests(core: EngineCore, requests: list[tuple[list[int], str | None]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of each (prompt, adapter), all added at once, in order."""
    tokens: dict[str, list[int]] = {}
    for i, (prompt, adapter) in enumerate(requests):
        request = GenerationRequest(str(i), prompt, greedy_params(max_tokens), adapter=adapter)
        core.add_request(core.validate(request))
        tokens[str(i)] = []
    while core.has_unfinished():
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
    return [tokens[str(i)] for i in range(len(requests))]


def runner_logits(
    runner: ModelRunner, sequences: list[tuple[list[int], int]], block_size: int = 4
) -> list[torch.Tensor]:
    """Weir's logits at every position of each (tokens, LoRA slot), all in one step of the model runner."""
    batch = []
    next_block = 0
    for seq_id, (tokens, slot) in enumerate(sequences):
        blocks = -(-len(tokens) // block_size)
        table = list(range(next_block, next_block + blocks))
        next_block += blocks
        seq = StepSeq(seq_id, TokenWindow(0, tokens), table, len(tokens), True, slot)
        batch.append(ScheduledSeq(seq, len(tokens), 0))
    out = runner.execute(batch)
    prompt = {s.seq.seq_id: logits for s, logits in out.prompt_logits}
    sample = {s.seq.seq_id: out.sample_logits[i] for i, s in enumerate(out.sample_seqs)}
    return [torch.cat([prompt[i], sample[i][None]]) for i in range(len(sequences))]


def loaded_fp32(directory: Path) -> LoadedModel:
    return load_model(ModelConfig(str(directory), device="cpu", dtype="float32"))
