"""EngineCore with constraints: a tiny random Llama over SmolLM2's vocabulary, so only the grammar shapes the text."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch
from structured_support import SMOLLM2_EOS, SMOLLM2_VOCAB_SIZE
from transformers import LlamaConfig

from weir_server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.types import Constraint, FinishReason, GenerationOutput, GenerationRequest, SamplingParams
from weir_server.errors import InvalidRequestError
from weir_server.models.llama import LlamaForCausalLM
from weir_server.models.loader import LoadedModel

PROMPT = [1, 9690, 198, 2683, 314, 253, 2, 198]


@pytest.fixture(scope="module")
def tiny_smollm_vocab(smollm2_tokenizer: Any) -> LoadedModel:
    """A 1-layer random Llama whose vocabulary is SmolLM2's."""
    config = LlamaConfig(
        vocab_size=SMOLLM2_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, eos_token_id=SMOLLM2_EOS,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    return LoadedModel(
        model=model, hf_config=config, tokenizer=smollm2_tokenizer, model_id="tiny", architecture="LlamaForCausalLM",
        task="generate", max_model_len=256, vocab_size=SMOLLM2_VOCAB_SIZE, dtype=torch.float32,
        device=torch.device("cpu"), eos_token_ids=(SMOLLM2_EOS,), pooling="last",
    )  # fmt: skip


def make_engine(loaded: LoadedModel, num_blocks: int = 64) -> EngineCore:
    config = EngineConfig(
        model=ModelConfig("tiny", device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256),
    )
    return EngineCore(loaded, config)


def request(request_id: str, constraint: Constraint | None, max_tokens: int = 40, **params: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id,
        PROMPT,
        SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0} | params),
        constraint=constraint,
    )


def run(engine: EngineCore, *requests: GenerationRequest) -> dict[tuple[str, int], list[GenerationOutput]]:
    for r in requests:
        engine.add_request(engine.validate(r))
    outputs: dict[tuple[str, int], list[GenerationOutput]] = {}
    for _ in range(500):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs.setdefault((out.request_id, out.index), []).append(out)
    assert not engine.has_unfinished()
    return outputs


def text_of(outputs: list[GenerationOutput]) -> str:
    return "".join(o.text for o in outputs)


def test_choice_output_is_one_of_the_choices_and_finishes_with_stop(tiny_smollm_vocab: LoadedModel) -> None:
    choices = ("alpha", "beta gamma")
    outputs = run(make_engine(tiny_smollm_vocab), request("c", Constraint("choice", choices)))[("c", 0)]
    assert text_of(outputs) in choices
    assert outputs[-1].finish_reason is FinishReason.STOP


def test_constrained_and_free_requests_share_steps(tiny_smollm_vocab: LoadedModel) -> None:
    engine = make_engine(tiny_smollm_vocab)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
    }
    outputs = run(
        engine,
        request("json", Constraint("json_schema", json.dumps(schema))),
        request("free", None, max_tokens=12, ignore_eos=True),
        request("digits", Constraint("regex", "[0-9]{3}")),
    )
    jsonschema.validate(json.loads(text_of(outputs[("json", 0)])), schema)
    assert len([t for o in outputs[("free", 0)] for t in o.token_ids]) == 12
    assert len(text_of(outputs[("digits", 0)])) == 3 and text_of(outputs[("digits", 0)]).isdigit()
    assert engine.num_steps < 40  # they ran side by side, not one after another


def test_each_of_n_choices_follows_the_grammar(tiny_smollm_vocab: LoadedModel) -> None:
    outputs = run(
        make_engine(tiny_smollm_vocab),
        request("n", Constraint("regex", "(yes|no)-[a-c]{2}"), n=3, temperature=1.0, seed=7),
    )
    for index in range(3):
        text = text_of(outputs[("n", index)])
        assert text[:3] in ("yes", "no-") and len(text.split("-")[1]) == 2


def test_a_constraint_not_met_within_max_tokens_finishes_with_length(tiny_smollm_vocab: LoadedModel) -> None:
    schema = json.dumps({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
    outputs = run(make_engine(tiny_smollm_vocab), request("short", Constraint("json_schema", schema), max_tokens=2))
    assert outputs[("short", 0)][-1].finish_reason is FinishReason.LENGTH
    assert text_of(outputs[("short", 0)]).startswith("{")


def test_min_tokens_does_not_push_past_a_complete_grammar(tiny_smollm_vocab: LoadedModel) -> None:
    outputs = run(make_engine(tiny_smollm_vocab), request("m", Constraint("choice", ("ok",)), min_tokens=8))
    assert text_of(outputs[("m", 0)]) == "ok"
    assert outputs[("m", 0)][-1].finish_reason is FinishReason.STOP


def test_invalid_constraint_is_refused_before_admission(tiny_smollm_vocab: LoadedModel) -> None:
    engine = make_engine(tiny_smollm_vocab)
    with pytest.raises(InvalidRequestError) as error:
        engine.validate(request("bad", Constraint("regex", "[z-a]")))
    assert error.value.field == "regex"
    assert not engine.has_unfinished()


def test_the_mask_is_filled_while_the_model_runs(
    tiny_smollm_vocab: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_smollm_vocab)
    events: list[str] = []
    execute, submit = engine.runner.execute, engine.structured.submit

    def recording_execute(*args: Any) -> Any:
        events.append("execute")
        return execute(*args)

    def recording_submit(*args: Any) -> Any:
        events.append("submit")
        return submit(*args)

    monkeypatch.setattr(engine.runner, "execute", recording_execute)
    monkeypatch.setattr(engine.structured, "submit", recording_submit)
    run(engine, request("x", Constraint("choice", ("a", "b"))))
    assert events[:2] == ["submit", "execute"]
