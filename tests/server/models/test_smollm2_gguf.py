"""The packaged SmolLM2 GGUF through our loader and paged model against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch
from paged_runner import PagedRunner
from transformers import AutoModelForCausalLM

from weir_server.config import ModelConfig
from weir_server.models.loader import load_model
from weir_server.models.registry import resolve_source

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model(ModelConfig("smollm2-135m-instruct", device="cpu", dtype="float32"))  # fp32 parity
    source = resolve_source("smollm2-135m-instruct")
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(source.directory), gguf_file=source.gguf_file, dtype=torch.float32
    ).eval()
    prompt = loaded.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt, list):
        prompt = prompt["input_ids"]
    return loaded, hf_model, list(prompt)


def test_packaged_model_metadata(smollm2):
    loaded, _, _ = smollm2
    assert loaded.architecture == "LlamaForCausalLM"
    assert loaded.task == "generate"
    assert loaded.max_model_len == 8192
    assert loaded.vocab_size == 49152
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.eos_token_ids


def test_prompt_logits_match_transformers(smollm2):
    loaded, hf_model, prompt = smollm2
    ours = PagedRunner(loaded.model, loaded.hf_config, block_size=16, num_blocks=64).step([(0, prompt)])[0]
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(ours, expected, atol=2e-3, rtol=1e-3)


def test_greedy_answer_matches_transformers_and_names_paris(smollm2):
    loaded, hf_model, prompt = smollm2
    runner = PagedRunner(loaded.model, loaded.hf_config, block_size=16, num_blocks=64)
    ours = runner.greedy([prompt], max_new_tokens=12)[0]
    # transformers' greedy choice at each step, teacher-forced on our tokens: if every choice equals ours,
    # generate() would produce exactly our tokens, and this costs one forward instead of twelve.
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + ours[:-1]])).logits[0]
    expected = logits[len(prompt) - 1 :].argmax(-1).tolist()
    assert ours == expected
    assert "Paris" in loaded.tokenizer.decode(ours, skip_special_tokens=True)


def test_bf16_cpu_head_reads_the_files_q8_0_rows_for_one_token_steps():
    """The packaged file's head (its tied Q8_0 embedding) stays int8 beside the bf16 copy: a one-token step's
    logits come from the file's values, and agree with the bf16 head to bf16's rounding."""
    from weir_server.kernels.cpu_ops import cpu_ops
    from weir_server.layers.cpu_linear import PackedLMHead, pack_linear_layers
    from weir_server.layers.gguf_weights import INT8_OP_MAX_ROWS

    loaded = load_model(ModelConfig("smollm2-135m-instruct", device="cpu", dtype="bfloat16"))
    model = loaded.model
    assert model.lm_head.int8_rows.qtype.name == "Q8_0"
    if pack_linear_layers(model) == 0 or cpu_ops() is None:
        pytest.skip("no oneDNN packing or C++ ops in this torch build")
    head = model.lm_head
    assert isinstance(head, PackedLMHead)
    assert head.int8_packed is not None  # Q8_0's groups of 32 take the integer-dot op's layout
    rows = INT8_OP_MAX_ROWS + 1
    hidden = torch.randn(rows, 576, generator=torch.Generator().manual_seed(0)).bfloat16()
    batched = head.compute_logits(hidden).float()  # more rows than the op takes: the packed bf16 weight
    for i in range(rows):
        one = head.compute_logits(hidden[i : i + 1]).float()[0]  # one row: the int8 rows
        torch.testing.assert_close(one, batched[i], atol=0.1, rtol=2**-7)
        assert one.argmax() == batched[i].argmax()


def test_bf16_cpu_tied_embedding_looks_its_rows_up_in_the_heads_int8_layout_bit_for_bit():
    """Packing drops the tied embedding's bf16 matrix: its rows come from the head's copy of the file's Q8_0 rows,
    equal to the loaded bf16 weight for every token, in any order and with repeats."""
    from weir_server.kernels.cpu_ops import cpu_ops
    from weir_server.layers.cpu_linear import PackedRowsEmbedding, pack_linear_layers

    model = load_model(ModelConfig("smollm2-135m-instruct", device="cpu", dtype="bfloat16")).model
    weight = model.model.embed_tokens.weight.detach().clone()
    if pack_linear_layers(model) == 0 or cpu_ops() is None:
        pytest.skip("no oneDNN packing or C++ ops in this torch build")
    embedding = model.model.embed_tokens
    assert isinstance(embedding, PackedRowsEmbedding)
    assert embedding.packed is model.lm_head.int8_packed
    ids = torch.cat([torch.arange(weight.shape[0]).flip(0), torch.tensor([7, 7, 0, 49151])]).view(2, -1)
    assert torch.equal(embedding(ids), weight[ids])
