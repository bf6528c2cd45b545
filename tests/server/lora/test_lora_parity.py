"""LoRA parity: Weir's logits and greedy tokens with an adapter equal transformers + peft's, per adapter and mixed
in one batch with the base model."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import (
    PROMPTS,
    lora_core,
    lora_engine_config,
    make_peft_model,
    reference_greedy,
    reference_logits,
    run_requests,
    runner_logits,
    save_model,
    tiny_llama,
)

from weir_server.engine.core import EngineCore
from weir_server.models.loader import load_model

# name -> how its adapter is made: every projection, attention only, rslora, per-module ranks.
ADAPTERS = {
    "all": dict(rank=8, alpha=16, seed=1),
    "attn": dict(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=2),
    "rslora": dict(rank=16, alpha=4, use_rslora=True, seed=3),
    "mixed-ranks": dict(rank=8, alpha=16, rank_pattern={"k_proj": 2, "v_proj": 5, "down_proj": 3}, seed=4),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The base model saved, the peft reference of each adapter, and the adapters' folders."""
    root = tmp_path_factory.mktemp("lora")
    hf_model = tiny_llama()
    save_model(hf_model, root / "base")
    peft_models, folders = {}, {}
    for name, spec in ADAPTERS.items():
        folders[name] = root / name
        peft_models[name] = make_peft_model(hf_model, folders[name], **spec)
    return hf_model, root / "base", peft_models, folders


@pytest.fixture(scope="module")
def core(family) -> EngineCore:
    _, base, _, folders = family
    return lora_core(base, folders)


def test_adapter_logits_equal_peft_for_every_adapter(family, core):
    hf_model, _, peft_models, _ = family
    base = reference_logits(hf_model, PROMPTS[2])
    for name, reference in peft_models.items():
        slot = core.lora.acquire(core.lora.get(name))
        try:
            (logits,) = runner_logits(core.runner, [(PROMPTS[2], slot)])
        finally:
            core.lora.release(core.lora.get(name))
        expected = reference_logits(reference, PROMPTS[2])
        assert (expected - base).abs().max() > 0.1, f"adapter {name} changes nothing: the test would prove nothing"
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4, msg=name)


def test_a_batch_mixing_the_base_model_and_adapters_gives_each_row_its_own_logits(family, core):
    hf_model, _, peft_models, _ = family
    names = ["all", "attn", "rslora"]
    adapters = [core.lora.get(n) for n in names]
    slots = [core.lora.acquire(a) for a in adapters]
    try:
        rows = [(PROMPTS[0], -1), (PROMPTS[1], slots[0]), (PROMPTS[2], slots[1]), (PROMPTS[3], slots[2])]
        logits = runner_logits(core.runner, rows)
    finally:
        for adapter in adapters:
            core.lora.release(adapter)
    references = [hf_model, *(peft_models[n] for n in names)]
    for (tokens, _), got, reference in zip(rows, logits, references, strict=True):
        torch.testing.assert_close(got, reference_logits(reference, tokens), atol=2e-4, rtol=1e-4)


def test_greedy_tokens_equal_peft_per_adapter(family, core):
    _, _, peft_models, _ = family
    for name, reference in peft_models.items():
        (tokens,) = run_requests(core, [(PROMPTS[1], name)], max_tokens=6)
        assert tokens == reference_greedy(reference, PROMPTS[1], 6), name


def test_mixed_batch_greedy_equals_each_request_alone(family, core):
    hf_model, _, peft_models, _ = family
    requests = [(PROMPTS[0], None), (PROMPTS[1], "all"), (PROMPTS[2], "attn"), (PROMPTS[3], "rslora")]
    together = run_requests(core, requests, max_tokens=8)
    alone = [run_requests(core, [request], max_tokens=8)[0] for request in requests]
    assert together == alone
    references = [hf_model, peft_models["all"], peft_models["attn"], peft_models["rslora"]]
    for (prompt, _), tokens, reference in zip(requests, together, references, strict=True):
        assert tokens == reference_greedy(reference, prompt, 8)


def test_lora_off_engine_is_unchanged_and_base_rows_with_lora_on_match_it(family, tmp_path):
    hf_model, base, _, _ = family
    config = lora_engine_config(base)
    plain = EngineCore(load_model(config.model), config.__class__(**{**config.__dict__, "lora": None}))
    assert plain.lora is None and not plain.runner.lora_layers
    assert run_requests(plain, [(PROMPTS[2], None)], 6) == [reference_greedy(hf_model, PROMPTS[2], 6)]


@pytest.mark.parametrize("family_name", ["qwen2", "qwen3", "mistral"])
def test_other_llama_family_members_take_adapters_through_the_shared_layers(family_name, tmp_path):
    """Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms) and Mistral reach LoRA through the same fused layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family_name, vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers starts biases at zero, which would hide a bias applied twice or never
        for name, param in hf_model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    save_model(hf_model, tmp_path / "base")
    reference = make_peft_model(hf_model, tmp_path / "adapter", rank=4, seed=7)
    core = lora_core(tmp_path / "base", {"ft": tmp_path / "adapter"})
    slot = core.lora.acquire(core.lora.get("ft"))
    (logits,) = runner_logits(core.runner, [(PROMPTS[1], slot)])
    torch.testing.assert_close(logits, reference_logits(reference, PROMPTS[1]), atol=2e-4, rtol=1e-4)
