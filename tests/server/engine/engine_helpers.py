"""Test helpers for the engine: a tiny random Llama served by EngineCore, and drivers that run it to completion."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from weir_server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.types import GenerationOutput, GenerationRequest, SamplingParams
from weir_server.models.llama import LlamaForCausalLM
from weir_server.models.loader import LoadedModel

TINY_VOCAB = 384
EOS = 1


def tiny_loaded_model(tokenizer=None, vocab_size: int = TINY_VOCAB) -> LoadedModel:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads) with seeded random weights."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                std = 1.0 if "embed" in name else 0.15
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif not name.endswith("bias"):
                param.fill_(1.0)
    model.eval()
    return LoadedModel(
        model=model,
        hf_config=config,
        tokenizer=tokenizer,
        model_id="tiny-llama",
        architecture="LlamaForCausalLM",
        task="generate",
        max_model_len=config.max_position_embeddings,
        vocab_size=vocab_size,
        dtype=torch.float32,
        device=torch.device("cpu"),
        eos_token_ids=(EOS,),
        pooling="last",
    )


def make_engine(
    loaded: LoadedModel,
    num_blocks: int = 256,
    block_size: int = 4,
    max_num_batched_tokens: int = 512,
    max_num_seqs: int = 64,
    max_waiting: int = 1024,
    enable_prefix_caching: bool = True,
) -> EngineCore:
    config = EngineConfig(
        model=ModelConfig("tiny-llama", device="cpu"),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_waiting=max_waiting
        ),
    )
    return EngineCore(loaded, config)


def prompt(seed: int, length: int, vocab: int = TINY_VOCAB) -> list[int]:
    """A reproducible prompt that avoids the EOS id."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(2, vocab, (length,), generator=generator)).tolist()


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def run(
    engine: EngineCore, arrivals: dict[int, list[GenerationRequest]], max_steps: int = 10_000
) -> dict[tuple[str, int], list[GenerationOutput]]:
    """Add requests at the given step numbers, step until all finish; outputs per (request_id, index)."""
    outputs: dict[tuple[str, int], list[GenerationOutput]] = {}
    step = 0
    while step < max_steps:
        for request in arrivals.get(step, []):
            engine.add_request(engine.validate(request))
        if not engine.has_unfinished() and step >= max(arrivals, default=0):
            break
        for out in engine.step():
            outputs.setdefault((out.request_id, out.index), []).append(out)
        step += 1
    assert not engine.has_unfinished(), "engine did not finish"
    return outputs


def tokens_of(outputs: list[GenerationOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def run_alone(loaded: LoadedModel, request: GenerationRequest, **engine_kwargs) -> list[int]:
    engine = make_engine(loaded, **engine_kwargs)
    result = run(engine, {0: [request]})
    return tokens_of(result[(request.request_id, 0)])
