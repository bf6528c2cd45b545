"""Speculative decoding under tensor parallelism (two CPU ranks over gloo, the worker started by the real launcher):
greedy outputs are those of the same group without speculation, with n-gram proposals and with a draft model,
which runs whole on rank 0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_helpers import TINY_VOCAB, run
from spec_helpers import NGRAM, assert_same, random_workload
from tiny_models import save_tiny_llama, save_word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, ModelConfig, ParallelConfig, SchedulerConfig
from weir_server.distributed import parallel_state
from weir_server.engine.core import EngineCore
from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.executor.tp_executor import launch
from weir_server.models.loader import load_model

Outputs = dict[tuple[str, int], list]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The target (two layers, grouped-query attention) and a draft of another shape over the same words."""
    target = save_tiny_llama(tmp_path_factory.mktemp("target"), TINY_VOCAB)
    draft = tmp_path_factory.mktemp("draft")
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.2, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(draft)
    save_word_tokenizer(draft, TINY_VOCAB)
    return target, draft


def two_rank_run(target: Path, spec: SpeculativeConfig | None, seed: int) -> tuple[Outputs, EngineCore]:
    """The random workload through a fresh two-rank group, speculating with `spec` (None: without)."""
    config = EngineConfig(
        model=ModelConfig(str(target), dtype="float32", device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64),
        executor=ExecutorConfig(num_threads=1),
        parallel=ParallelConfig(tensor_parallel_size=2, collective_timeout_s=60),
        speculative=spec,
    )
    deaths: list[str] = []
    executor = launch(config, on_worker_death=deaths.append)
    assert executor is not None
    try:
        engine = EngineCore(load_model(config.model), config, publisher=executor)
        outputs = run(engine, random_workload(seed))
    finally:
        executor.shutdown()
    assert not deaths and not parallel_state.get().is_parallel
    return outputs, engine


@pytest.fixture(scope="module")
def without_speculation(model_dirs: tuple[Path, Path]) -> Iterator[Outputs]:
    yield two_rank_run(model_dirs[0], None, seed=5)[0]


def test_ngram_speculation_under_two_ranks_gives_the_same_greedy_outputs(model_dirs, without_speculation) -> None:
    outputs, engine = two_rank_run(model_dirs[0], NGRAM, seed=5)
    assert_same(without_speculation, outputs)
    stats = engine.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_num_accepted_tokens > 0


def test_a_draft_model_under_two_ranks_runs_whole_on_rank_0_and_gives_the_same_outputs(
    model_dirs, without_speculation
) -> None:
    spec = SpeculativeConfig("draft_model", 3, model=str(model_dirs[1]), disable_by_batch_size=None, adaptive=False)
    outputs, engine = two_rank_run(model_dirs[0], spec, seed=5)
    assert_same(without_speculation, outputs)
    draft = engine.spec.proposer.draft.model  # type: ignore[union-attr]
    assert draft.model.layers[0].self_attn.num_heads == 2, "the draft is not sharded"
    assert engine.stats().spec_num_drafts > 0


def test_the_draft_as_its_own_target_is_accepted_in_full_under_two_ranks(model_dirs) -> None:
    spec = SpeculativeConfig("draft_model", 3, model=str(model_dirs[0]), disable_by_batch_size=None, adaptive=False)
    _, engine = two_rank_run(model_dirs[0], spec, seed=6)
    stats = engine.stats()
    # The same weights unsharded and sharded: equal but for float sums in another order.
    assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens > 0
