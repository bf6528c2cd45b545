"""The packaged SmolLM2 (GGUF) with a rank-8 adapter made over it by peft: Weir's greedy tokens equal transformers +
peft's, loading the same GGUF file."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import greedy_params, make_peft_model
from transformers import AutoModelForCausalLM

from weir_server.config import CacheConfig, EngineConfig, ExecutorConfig, LoRAConfig, ModelConfig, SchedulerConfig
from weir_server.engine.core import EngineCore
from weir_server.engine.types import GenerationRequest
from weir_server.models.loader import load_model
from weir_server.models.registry import resolve_source

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8


def test_smollm2_with_a_rank_8_adapter_matches_transformers_and_peft(tmp_path):
    source = resolve_source("smollm2-135m-instruct")
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(source.directory), gguf_file=source.gguf_file, dtype=torch.float32
    ).eval()
    peft_model = make_peft_model(hf_model, tmp_path / "adapter", rank=8, alpha=16, seed=5, scale=0.15)
    del hf_model
    config = EngineConfig(
        model=ModelConfig("smollm2-135m-instruct", device="cpu", dtype="float32"),  # fp32 parity
        cache=CacheConfig(block_size=16, num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256),
        executor=ExecutorConfig(enforce_eager=True),
        lora=LoRAConfig(max_lora_rank=8, max_loras=1, lora_modules=(("smol-lora", str(tmp_path / "adapter")),)),
    )
    core = EngineCore(load_model(config.model), config)
    prompt = core.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    outputs = {}
    for request_id, adapter in (("lora", "smol-lora"), ("base", None)):
        core.add_request(
            core.validate(GenerationRequest(request_id, prompt, greedy_params(MAX_TOKENS), adapter=adapter))
        )
    while core.has_unfinished():
        for out in core.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    ours = outputs["lora"]
    # peft's greedy choice at each step, teacher-forced on our tokens: equal choices mean generate() gives ours.
    with torch.no_grad():
        logits = peft_model(torch.tensor([prompt + ours[:-1]])).logits[0]
        expected = logits[len(prompt) - 1 :].argmax(-1).tolist()
        with peft_model.disable_adapter():
            base_expected = peft_model(torch.tensor([prompt + outputs["base"][:-1]])).logits[0]
    assert ours == expected
    assert outputs["base"] == base_expected[len(prompt) - 1 :].argmax(-1).tolist()
    assert ours != outputs["base"], "the adapter changes nothing: the test would prove nothing"
