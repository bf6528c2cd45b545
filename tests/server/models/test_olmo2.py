"""OLMo 2 (post-norms, q/k norms over all heads), loaded by our loader from safetensors, matches transformers.

transformers 5.x reads no OLMo 2 GGUF metadata, so only the safetensors path is checked.
"""

from __future__ import annotations

import pytest
import torch
from paged_runner import PagedRunner, save_tiny_tokenizer
from transformers import AutoModelForCausalLM, Olmo2Config

from weir_server.config import (
    CacheConfig,
    EngineConfig,
    ExecutorConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from weir_server.engine.core import EngineCore
from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.executor.tp_executor import launch
from weir_server.models.loader import load_model
from weir_server.models.olmo2 import Olmo2ForCausalLM

VOCAB = 160
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    "olmo2-gqa": lambda: Olmo2Config(**COMMON, tie_word_embeddings=False),
    "olmo2-bias-linear-rope-tied": lambda: Olmo2Config(
        **COMMON,
        attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
}

PROMPTS = [
    [5, 17, 33, 9, 100],
    [40, 41, 42, 7, 8, 9, 120, 3, 77, 150, 11],
    [12, 99, 23, 54, 65, 76, 87, 98, 109, 110, 121, 132, 143, 154, 4, 15, 26],
]


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def models(request, tmp_path_factory):
    """(transformers model, our LoadedModel) with the same random weights, via save_pretrained."""
    torch.manual_seed(0)
    hf_config = CONFIGS[request.param]()
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():  # norm scales start at 1; random ones show a scale applied to the wrong features
        for name, param in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    save_tiny_tokenizer(directory, VOCAB)
    loaded = load_model(ModelConfig(str(directory), device="cpu", dtype="float32"))  # parity is checked in fp32
    return hf_model, loaded


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_loader_builds_olmo2_for_its_architecture(models):
    hf_model, loaded = models
    assert loaded.architecture == "Olmo2ForCausalLM"
    assert isinstance(loaded.model, Olmo2ForCausalLM)
    assert loaded.task == "generate"
    assert loaded.vocab_size == VOCAB
    assert 2 in loaded.eos_token_ids


def test_chunked_prefill_and_decode_logits_match_transformers(models):
    hf_model, loaded = models
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=4)
    seqs = [list(p) for p in PROMPTS]
    steps = [
        [(0, seqs[0]), (1, seqs[1]), (2, seqs[2][:7])],
        [(0, [61]), (1, [62]), (2, seqs[2][7:])],
        [(0, [63]), (1, [64]), (2, [65])],
    ]
    history: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for chunks in steps:
        ours = runner.step(chunks)
        for (seq_id, tokens), logits in zip(chunks, ours, strict=True):
            history[seq_id] += tokens
            expected = hf_logits(hf_model, history[seq_id])[-len(tokens) :]
            torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


def test_engine_greedy_tokens_match_transformers_with_prefix_caching(models):
    hf_model, loaded = models
    config = EngineConfig(
        model=ModelConfig(loaded.model_id, device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=128, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_waiting=16),
    )
    engine = EngineCore(loaded, config)
    # The last prompt shares its first 8 tokens (two blocks) with the second and arrives after it has run.
    prompts = [*PROMPTS, PROMPTS[1][:8] + [90, 91, 92]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    arrivals = {0: [0, 1, 2], 2: [3]}
    tokens: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i in arrivals.get(step, []):
            engine.add_request(engine.validate(GenerationRequest(str(i), prompts[i], params)))
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    for i, prompt in enumerate(prompts):
        expected = hf_greedy(hf_model, prompt, 8)
        assert tokens[str(i)][: len(expected)] == expected  # transformers stops early at EOS


def test_two_tensor_parallel_ranks_match_transformers_with_a_replicated_kv_head(tmp_path):
    """q/k norms span all heads, so each rank's norm needs the other rank's sum of squares; with one KV head
    both ranks hold the same k, and its norm must not count it twice."""
    torch.manual_seed(1)
    hf_config = Olmo2Config(**(COMMON | {"num_key_value_heads": 1}), tie_word_embeddings=False)
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    hf_model.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path, VOCAB)
    config = EngineConfig(
        model=ModelConfig(str(tmp_path), dtype="float32", device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
        executor=ExecutorConfig(num_threads=1),
        parallel=ParallelConfig(tensor_parallel_size=2, collective_timeout_s=60),
    )
    executor = launch(config, on_worker_death=lambda reason: None)
    assert executor is not None
    try:
        engine = EngineCore(load_model(config.model), config, publisher=executor)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(GenerationRequest(str(i), prompt, params))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
    finally:
        executor.shutdown()
    for i, prompt in enumerate(PROMPTS):
        expected = hf_greedy(hf_model, prompt, 6)
        assert tokens[str(i)][: len(expected)] == expected
