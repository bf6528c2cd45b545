"""A draft model proposes: greedy output stays the target's token for token (a random draft, most proposals
rejected; the target itself as its draft, almost all accepted), through preemption and aborts; a draft with another
vocabulary is refused at start-up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from engine_helpers import greedy, run
from spec_helpers import assert_same, grounded_prompt, random_workload, spec_engine, summary
from tiny_models import save_tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from weir_server.config import ModelConfig
from weir_server.engine.spec_decode.config import SpeculativeConfig
from weir_server.engine.spec_decode.draft_model import DraftVocabularyError, check_same_vocabulary
from weir_server.engine.types import GenerationRequest
from weir_server.models.loader import load_model


def draft_spec(directory: Path, k: int = 3) -> SpeculativeConfig:
    return SpeculativeConfig(
        "draft_model", num_speculative_tokens=k, model=str(directory), disable_by_batch_size=None, adaptive=False
    )


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama over the tiny target's 384 ids: a weak draft, other weights."""
    return save_tiny_llama(tmp_path_factory.mktemp("draft"), 384)


def test_greedy_output_is_identical_with_a_random_draft_model(tiny_loaded, draft_dir):
    base = run(spec_engine(tiny_loaded, None), random_workload(5))
    engine = spec_engine(tiny_loaded, draft_spec(draft_dir))
    assert_same(base, run(engine, random_workload(5)))
    stats = engine.stats()
    assert stats.spec_num_draft_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_preemption_and_a_small_budget_keep_draft_outputs_identical(tiny_loaded, draft_dir):
    kwargs = {"num_blocks": 40, "max_num_batched_tokens": 16}
    base = run(spec_engine(tiny_loaded, None, **kwargs), random_workload(6))
    engine = spec_engine(tiny_loaded, draft_spec(draft_dir), **kwargs)
    assert_same(base, run(engine, random_workload(6)))
    assert engine.stats().num_preemptions > 0


def test_the_target_as_its_own_draft_is_accepted_almost_always(draft_dir):
    target = load_model(ModelConfig(str(draft_dir), device="cpu", dtype="float32"), "generate")
    requests = {0: [GenerationRequest(f"t{i}", grounded_prompt(60 + i, 20), greedy(30)) for i in range(4)]}
    base = run(spec_engine(target, None), requests)
    engine = spec_engine(target, draft_spec(draft_dir, k=4))
    assert_same(base, run(engine, requests))
    stats = engine.stats()
    assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens > 0
    assert stats.spec_mean_acceptance_length > 4.0


def test_abort_with_a_draft_model_frees_every_block(tiny_loaded, draft_dir):
    engine = spec_engine(tiny_loaded, draft_spec(draft_dir))
    for i in range(3):
        engine.add_request(engine.validate(GenerationRequest(f"a{i}", grounded_prompt(i, 20), greedy(30))))
    for _ in range(3):
        engine.step()
    engine.abort_request("a1")
    outputs = run(engine, {})
    assert summary(outputs[("a0", 0)])[2].value == "length"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks


def test_a_draft_model_with_another_vocabulary_size_is_refused(tiny_loaded, tmp_path):
    other = save_tiny_llama(tmp_path / "other", 400)
    with pytest.raises(DraftVocabularyError, match="vocabulary of 400 tokens .* one of 384: a draft model must share"):
        spec_engine(tiny_loaded, draft_spec(other))


def test_a_draft_tokenizer_with_other_tokens_is_refused(tiny_loaded):
    def words(prefix: str) -> PreTrainedTokenizerFast:
        backend = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(384)}, unk_token=f"{prefix}0"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=f"{prefix}0")

    target = dataclasses.replace(tiny_loaded, tokenizer=words("w"))
    check_same_vocabulary(dataclasses.replace(tiny_loaded, tokenizer=words("w")), target)
    with pytest.raises(DraftVocabularyError, match="different tokenizer"):
        check_same_vocabulary(dataclasses.replace(tiny_loaded, tokenizer=words("v")), target)
