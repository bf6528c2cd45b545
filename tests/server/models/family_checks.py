"""Test helpers shared by the model-family parity tests: tiny random transformers models, their logits and greedy
tokens, and the same through Weir's paged runner, its engine and two tensor-parallel ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import torch
from paged_runner import PagedRunner, save_tiny_tokenizer
from transformers import AutoModelForCausalLM

from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, ParallelConfig, SchedulerConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.models.loader import LoadedModel, load_model

VOCAB = 160
# The shape every family's tiny config starts from; each test file adds what its family needs.
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)

PROMPTS = [
    [5, 17, 33, 9, 100],
    [40, 41, 42, 7, 8, 9, 120, 3, 77, 150, 11],
    [12, 99, 23, 54, 65, 76, 87, 98, 109, 110, 121, 132, 143, 154, 4, 15, 26],
]


def random_causal_lm(hf_config, seed: int = 0, norms: Literal["scale", "offset"] | None = None) -> torch.nn.Module:
    """A transformers causal LM with seeded random weights. transformers starts norm scales at 1 (Gemma's offsets
    at 0) and biases at 0, which hides a scale or bias applied to the wrong features: `norms="scale"` draws norm
    scales and biases at random too, `norms="offset"` draws Gemma's norm offsets."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if norms == "offset" and "norm" in name:
                param.normal_(0.0, 0.5)
            elif norms == "scale" and name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif norms == "scale" and name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model


def save_tiny_model(hf_model, directory: Path) -> None:
    """The model as transformers saves it (safetensors), with a tokenizer beside it for the loader."""
    hf_model.save_pretrained(directory)
    save_tiny_tokenizer(directory, VOCAB)


def load_like_transformers(hf_model, directory: Path) -> LoadedModel:
    """Save `hf_model` into `directory` and load it with our loader, in fp32 where parity is checked."""
    save_tiny_model(hf_model, directory)
    return load_model(ModelConfig(str(directory), device="cpu", dtype="float32"))


def models_fixture(configs: dict, norms: Literal["scale", "offset"] | None = None):
    """A module-scoped fixture over `configs` (name -> config factory): (transformers model, our LoadedModel) with
    the same random weights, via save_pretrained."""

    @pytest.fixture(params=sorted(configs), scope="module")
    def models(request, tmp_path_factory):
        hf_model = random_causal_lm(configs[request.param](), norms=norms)
        return hf_model, load_like_transformers(hf_model, tmp_path_factory.mktemp(request.param))

    return models


def assert_loaded_as(loaded: LoadedModel, architecture: str, model_class: type) -> None:
    """The loader picked the family's class for generation, with the tiny config's limits."""
    assert loaded.architecture == architecture
    assert isinstance(loaded.model, model_class)
    assert loaded.task == "generate"
    assert loaded.max_model_len == 256
    assert loaded.vocab_size == VOCAB
    assert 2 in loaded.eos_token_ids


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    """transformers' logits for every position of one sequence."""
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation (it may stop early at EOS)."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def assert_greedy_matches(hf_model, prompts: list[list[int]], outputs: list[list[int]], max_new_tokens: int) -> None:
    """Each output starts with transformers' greedy continuation of its prompt (which stops early at EOS)."""
    for prompt, tokens in zip(prompts, outputs, strict=True):
        expected = hf_greedy(hf_model, prompt, max_new_tokens)
        assert tokens[: len(expected)] == expected


def assert_chunked_prefill_and_decode_match(hf_model, loaded: LoadedModel) -> None:
    """Logits of every new token through the paged runner match transformers over the whole history.

    Step 1: two whole prompts and the first chunk of the third. Step 2: two decodes and the rest of the third (a
    mixed batch). Steps 3-4: decode-only."""
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=4)
    seqs = [list(p) for p in PROMPTS]
    steps = [
        [(0, seqs[0]), (1, seqs[1]), (2, seqs[2][:7])],
        [(0, [61]), (1, [62]), (2, seqs[2][7:])],
        [(0, [63]), (1, [64]), (2, [65])],
        [(0, [66]), (1, [67]), (2, [68])],
    ]
    history: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for chunks in steps:
        for (seq_id, tokens), logits in zip(chunks, runner.step(chunks), strict=True):
            history[seq_id] += tokens
            expected = hf_logits(hf_model, history[seq_id])[-len(tokens) :]
            torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


def tiny_engine(loaded: LoadedModel, max_num_batched_tokens: int = 64) -> EngineCore:
    """An EngineCore over `loaded` with small blocks and prefix caching on."""
    config = EngineConfig(
        model=ModelConfig(loaded.model_id, device="cpu", dtype="float32"),
        cache=CacheConfig(block_size=4, num_blocks=128, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens, max_waiting=16),
        executor=ExecutorConfig(enforce_eager=True),
    )
    return EngineCore(loaded, config)


def run_greedy(engine: EngineCore, arrivals: dict[int, list[list[int]]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of each prompt, the prompts added at the given engine steps; in order of arrival."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt in arrivals.get(step, []):
            request_id = str(len(tokens))
            engine.add_request(engine.validate(GenerationRequest(request_id, prompt, params)))
            tokens[request_id] = []
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
        step += 1
    return [tokens[str(i)] for i in range(len(tokens))]


def engine_greedy(loaded: LoadedModel, arrivals: dict[int, list[list[int]]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens through a `tiny_engine` (prefix caching on), prompts added at the given steps."""
    return run_greedy(tiny_engine(loaded), arrivals, max_tokens)


def assert_engine_greedy_matches(hf_model, loaded: LoadedModel, late: list[int], max_tokens: int = 8) -> None:
    """Greedy tokens through the engine match transformers, PROMPTS added at once and `late` two steps after."""
    outputs = engine_greedy(loaded, {0: PROMPTS, 2: [late]}, max_tokens)
    assert_greedy_matches(hf_model, [*PROMPTS, late], outputs, max_tokens)


def assert_two_tensor_parallel_ranks_match(hf_model, directory: Path, max_tokens: int = 6) -> None:
    """Greedy tokens of PROMPTS from two CPU tensor-parallel ranks match transformers."""
    save_tiny_model(hf_model, directory)
    assert_checkpoint_on_two_ranks_matches(hf_model, directory, max_tokens)


def assert_checkpoint_on_two_ranks_matches(reference, directory: Path, max_tokens: int = 6) -> None:
    """Greedy tokens of PROMPTS from the checkpoint in `directory` on two CPU tensor-parallel ranks match
    `reference` (a transformers model holding the same weights)."""
    from weir_server.executor.tp_executor import launch

    config = EngineConfig(
        model=ModelConfig(str(directory), dtype="float32", device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
        executor=ExecutorConfig(num_threads=1),
        parallel=ParallelConfig(tensor_parallel_size=2, collective_timeout_s=60),
    )
    executor = launch(config, on_worker_death=lambda reason: None)
    assert executor is not None
    try:
        engine = EngineCore(load_model(config.model), config, publisher=executor)
        outputs = run_greedy(engine, {0: PROMPTS}, max_tokens)
    finally:
        executor.shutdown()
    assert_greedy_matches(reference, PROMPTS, outputs, max_tokens)


def gguf_writer(path: Path, arch: str, config, head_dim: int | None = None):
    """A `gguf.GGUFWriter` for `arch` with the metadata every family's GGUF carries, from the model's config (and
    the attention's key/value width where the family's file states it)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    return writer


def finish_gguf(writer) -> None:
    """Write the header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
