"""Speculative decoding on a GPU: verify steps replay CUDA graphs of 1 + K rows a sequence, the draft model's steps
graphs of 1 and 2 rows, and the engine runs ahead while speculation backs off; greedy tokens stay those of eager
decoding without speculation. (The CPU checks of the same layouts are in tests/server/spec_decode.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, SchedulerConfig
from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.engine.types import GenerationRequest, SamplingParams
from weir_server.models.loader import LoadedModel, load_model

pytestmark = pytest.mark.gpu

VOCAB = 320  # tiny_model's
NGRAM = SpeculativeConfig(
    "ngram", 4, prompt_lookup_min=1, prompt_lookup_max=3, disable_by_batch_size=None, adaptive=False
)


def spec_core(loaded: LoadedModel, spec: SpeculativeConfig | None, enforce_eager: bool, **executor: Any) -> Any:
    from weir_server.engine.core import EngineCore

    config = EngineConfig(
        ModelConfig(loaded.model_id, device="cuda"),
        CacheConfig(block_size=16, num_blocks=256),
        SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512),
        ExecutorConfig(enforce_eager=enforce_eager, cuda_graph_max_batch=16, **executor),
        speculative=spec,
    )
    return EngineCore(loaded, config)


def repeating_requests(num_requests: int, max_tokens: int = 40, stagger: int = 0) -> list[GenerationRequest]:
    """Greedy requests whose prompts repeat a random phrase, so n-gram lookup finds proposals; request i asks for
    `max_tokens + i * stagger` tokens."""
    generator = torch.Generator().manual_seed(11)
    requests = []
    for i in range(num_requests):
        params = SamplingParams(max_tokens=max_tokens + i * stagger, temperature=0.0, ignore_eos=True)
        phrase = torch.randint(2, VOCAB, (3 + i % 5,), generator=generator).tolist()
        requests.append(GenerationRequest(f"r{i}", (phrase * 8)[: 12 + 3 * i], params))
    return requests


def verify_replays(core: Any) -> list[int]:
    """Record the query length of each graph replay of `core`'s target."""
    graphs = core.runner.graphs
    assert graphs is not None
    replay, seen = graphs.replay, []

    def recorded(decode):
        seen.append(decode.query_len)
        return replay(decode)

    graphs.replay = recorded
    return seen


def test_ngram_verify_steps_replay_graphs_and_keep_the_eager_greedy_tokens(tiny_model, run) -> None:
    loaded = tiny_model("cuda")
    base = run(spec_core(loaded, None, enforce_eager=True), repeating_requests(12))
    graphed = spec_core(loaded, NGRAM, enforce_eager=False)
    seen = verify_replays(graphed)
    assert run(graphed, repeating_requests(12)) == base
    assert 5 in seen, "no verify step replayed a graph"
    assert run(spec_core(loaded, NGRAM, enforce_eager=True), repeating_requests(12)) == base
    assert graphed.stats().spec_num_accepted_tokens > 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama on disk (a draft model is loaded by path) with a word tokenizer over its ids."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, eos_token_id=1,
        tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(directory)
    return directory


def test_draft_model_steps_replay_graphs_and_keep_the_eager_greedy_tokens(model_dir, run) -> None:
    target = load_model(ModelConfig(str(model_dir), device="cuda", dtype="float32"), "generate")
    spec = SpeculativeConfig("draft_model", 4, model=str(model_dir), disable_by_batch_size=None, adaptive=False)
    base = run(spec_core(target, None, enforce_eager=True), repeating_requests(8))
    graphed = spec_core(target, spec, enforce_eager=False)
    draft_runner = graphed.spec.proposer.runner
    assert draft_runner.graphs is not None and draft_runner.graph_query_lens == (1, 2)
    seen = verify_replays(graphed)
    assert run(graphed, repeating_requests(8)) == base
    assert 5 in seen
    stats = graphed.stats()
    assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens > 0  # the target as its own draft


def test_the_engine_runs_ahead_while_speculation_backs_off(tiny_model, run) -> None:
    loaded = tiny_model("cuda")
    base = run(spec_core(loaded, None, enforce_eager=True), repeating_requests(12, 8, stagger=4))
    spec = SpeculativeConfig(
        "ngram", 4, prompt_lookup_min=1, prompt_lookup_max=3, disable_by_batch_size=4, adaptive=False
    )
    core = spec_core(loaded, spec, enforce_eager=False)
    assert core.run_ahead
    ahead = []
    step = core.step

    def watched():
        outputs = step()
        ahead.append(core._launched is not None)
        return outputs

    core.step = watched
    assert run(core, repeating_requests(12, 8, stagger=4)) == base  # the batch shrinks through 4 as requests end
    assert any(ahead) and core.stats().spec_num_drafts > 0


def test_draft_steps_launched_ahead_of_the_device_read_their_own_inputs(model_dir, run) -> None:
    """A draft's steps are launched back to back, so with the device behind the host each graph's input copy runs
    after the next step is prepared: the host mirrors it copies from must not have been overwritten by then (with
    one mirror, a 1B draft of itself accepted 3% of its tokens on an H100)."""
    target = load_model(ModelConfig(str(model_dir), device="cuda", dtype="float32"), "generate")
    spec = SpeculativeConfig("draft_model", 4, model=str(model_dir), disable_by_batch_size=None, adaptive=False)
    base = run(spec_core(target, None, enforce_eager=True), repeating_requests(4))
    graphed = spec_core(target, spec, enforce_eager=False)
    draft_runner = graphed.spec.proposer.runner
    execute = draft_runner.execute

    def behind(batch, feed=None):
        torch.cuda._sleep(2_000_000)  # keep the device busy while the host prepares the next step
        return execute(batch, feed)

    draft_runner.execute = behind
    assert run(graphed, repeating_requests(4)) == base
    stats = graphed.stats()
    assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens > 0
